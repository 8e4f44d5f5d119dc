"""A full weight push on the host at real shapes, each part against what it replaced, measured in
the same run: the sampler's check (`sampler.weights.check_weights` against a per-value
finiteness check), and the wire format at both ends (`sampler/wire.py` against the safetensors
library's `save` on the learner and `load` on the sampler), in seconds and in peak memory. Then
a small push (the tiny student, 1.4 MB) into a torch sampler over HTTP, back to back and after the
sampler idled, checked and copied on every thread (as before) against one thread
(`opd.torch_thread.alone_if_small`). With `--transports SHAPE`, a push of that shape into a real
sampler (`--engine`) by every transport: over HTTP (on vLLM: the body staged as an in-memory
file for the worker, `sampler/staging.py`, against the body passed through vLLM's
collective_rpc), by path through /dev/shm, through an in-memory file (`memory`), and on torch
copied from the learner's buffer (`shared`).

    python -m bench.push_check [--shapes 0.5b 1.5b] [--repeats 3]
    python -m bench.push_check --shapes          # the small push alone
    python -m bench.push_check --shapes --transports 0.5b [--engine torch]
    python -m bench.push_check --shared cuda     # a shared push on the GPU, by CUDA IPC (bench/device.sh)

Every full push is serialised, sent, decoded and checked before it touches the served model;
all of it runs on the host's CPU whatever the engine, so its cost is paid on every step of the
strictly on-policy loop. The tensors are random bf16 ones of Qwen2.5's parameter shapes (the
sampler's dtype on a GPU); the model is built on the meta device for its shapes only. Peak memory
is the growth of the process's resident set during one call (Linux: VmHWM after resetting it).
"""

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save
from transformers import AutoModelForCausalLM

from bench.common import median_seconds, write_results
from bench.models import QWEN25_SHAPES, qwen2_config, random_model
from learner.clients import RetryPolicy, SamplerPool
from learner.config import Transport
from opd.client import SamplerClient
from opd.launch import LocalServer, local_servers
from opd.tiny import ensure_tiny_model
from sampler.engine import WeightSpec
from sampler.weights import check_weights
from sampler.wire import decode, encode


def parameter_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen2_config(shape))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def per_value_check(tensors: dict[str, torch.Tensor]) -> None:
    """The reference: what check_weights did before, `isfinite(t).all()` per tensor."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} has non-finite values")


def random_push(name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in parameter_shapes(QWEN25_SHAPES[name]).items()
    }


def measure_check(name: str, tensors: dict[str, torch.Tensor], repeats: int) -> dict:
    specs = {n: WeightSpec(shape=tuple(t.shape), dtype=t.dtype) for n, t in tensors.items()}
    check_weights(tensors, specs)  # warm-up, and proof the tensors pass
    ours = median_seconds(lambda: check_weights(tensors, specs), repeats)
    reference = median_seconds(lambda: per_value_check(tensors), repeats)
    row = {"shape": name, "parameters": sum(t.numel() for t in tensors.values()), "tensors": len(tensors),
           "check_weights_s": ours, "per_value_s": reference, "speedup": reference / ours}  # fmt: skip
    print(row, flush=True)
    return row


def _status_bytes(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_growth(fn: Callable[[], object]) -> int:
    """Bytes the resident set grew by at its peak during `fn()` (its result held until measured)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM") - before
    del result
    return peak


def sent_by_us(tensors: dict[str, torch.Tensor]) -> int:
    """What the learner's HTTP client is handed, piece by piece: the bytes of every chunk."""
    return sum(len(chunk) for chunk in encode(tensors).chunks())


def measure_wire(name: str, tensors: dict[str, torch.Tensor], repeats: int) -> dict:
    received = save(tensors)  # the library's reader takes bytes; sampler/app.py now receives into a bytearray
    payload = bytearray(received)
    assert sent_by_us(tensors) == len(payload)
    sides = {
        "send": (lambda: save(tensors), lambda: sent_by_us(tensors)),
        "receive": (lambda: load(received), lambda: decode(payload)),
    }
    row: dict = {"shape": name, "bytes": len(payload)}
    for side, (library, ours) in sides.items():
        ours(), library()  # warm-up
        row[f"{side}_library_s"] = median_seconds(library, repeats)
        row[f"{side}_ours_s"] = median_seconds(ours, repeats)
        row[f"{side}_library_peak_bytes"] = peak_growth(library)
        row[f"{side}_ours_peak_bytes"] = peak_growth(ours)
        row[f"{side}_speedup"] = row[f"{side}_library_s"] / row[f"{side}_ours_s"]
    print(row, flush=True)
    return row


class _ServerBefore(LocalServer):
    """A server as it was before a change: `patch` (Python) runs in its process before the CLI."""

    def __init__(self, patch: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.patch = patch

    @property
    def cmd(self) -> list[str]:
        run_cli = "import runpy; runpy.run_module('opd.cli', run_name='__main__')"
        return [sys.executable, "-c", f"{self.patch}; {run_cli}", *super().cmd[3:]]  # super: python -m opd.cli ...


EVERY_THREAD = "import opd.torch_thread as t; t.SMALL_WORK_BYTES = 0"
"""Small pushes checked and copied on every thread: `alone_if_small` never applies."""
THROUGH_RPC = "import sampler.engines.vllm as v; v.stage = lambda payload: None"
"""A body handed to vLLM's worker through collective_rpc, as if staging had failed."""


def measure_after_idle(repeats: int, idle_s: float) -> dict:
    """The tiny student's push into a torch sampler, back to back and after the sampler idled
    (as it does in the loop while the teacher grades and the learner learns), on every thread
    (before) and on one thread (now)."""
    model_dir = ensure_tiny_model("student")
    tensors = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}
    row: dict = {"bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "idle_s": idle_s}
    with tempfile.TemporaryDirectory(prefix="push-check-") as logs:
        args = ["--model", str(model_dir), "--engine", "torch"]
        for label, before in (("every_thread", True), ("one_thread", False)):
            server = (
                _ServerBefore(EVERY_THREAD, "sampler", args, Path(logs))
                if before
                else LocalServer("sampler", args, Path(logs))
            )
            with local_servers([server]) as urls:
                for key, idle in (("back_to_back", 0.0), ("after_idle", idle_s)):
                    times = asyncio.run(_pushes(urls[0], tensors, "http", repeats, idle_s=idle))
                    row[f"{label}_{key}_s"] = statistics.median(times)
    print(row, flush=True)
    return row


async def _pushes(
    url: str, tensors: dict[str, torch.Tensor], how: Transport, repeats: int,
    idle_s: float = 0.0,
) -> list:  # fmt: skip
    """Seconds of each push by the learner's own pool after a warm-up push, each after `idle_s`
    of the sampler idling; `how`: http, path (through /dev/shm), memory or shared."""
    pool, times = SamplerPool([url], timeout_s=600, retry=RetryPolicy()), []
    try:
        with tempfile.TemporaryDirectory(prefix="push-check-", dir="/dev/shm") as shared:
            for version in range(1, repeats + 2):  # the first is a warm-up
                await asyncio.sleep(idle_s)
                start = time.perf_counter()
                await pool.push_weights_by(how, tensors, version, shared_dir=Path(shared))
                times.append(time.perf_counter() - start)
    finally:
        await pool.aclose()
    return times[1:]


def measure_transports(models: Path, shape: str, engine: str, repeats: int) -> dict:
    """A push of a Qwen2.5 shape into a sampler of `engine` on this host (bf16 on vLLM, float32 on
    torch, what each serves on CPU): over HTTP, by path through /dev/shm (`weight_transport:
    path`), through an in-memory file (`memory`), and on torch copied from the learner's buffer
    (`shared`, sampler/shared.py); on vLLM also over HTTP as before, the body passed to the worker
    through collective_rpc instead of staged in memory."""
    model_dir = random_model(models, f"qwen2.5-{shape}", QWEN25_SHAPES[shape], seed=0)
    dtype = "bfloat16" if engine == "vllm" else "float32"
    tensors = {n: t.to(getattr(torch, dtype)) for n, t in load_file(model_dir / "model.safetensors").items()}
    row: dict = {"shape": shape, "engine": engine, "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    args = ["--model", str(model_dir), "--engine", engine, "--dtype", dtype]
    args += ["--max-model-len", "1024"] if engine == "vllm" else []  # the KV cache of 32k tokens needs more than CPU's
    with tempfile.TemporaryDirectory(prefix="push-check-") as logs:
        if engine == "vllm":
            with local_servers([_ServerBefore(THROUGH_RPC, "sampler", args, Path(logs))], timeout=900) as urls:
                row["http_rpc_s"] = asyncio.run(_pushes(urls[0], tensors, "http", repeats))
        with local_servers([LocalServer("sampler", args, Path(logs))], timeout=900) as urls:
            # (a vLLM sampler refuses shared pushes: its weights live in its worker process)
            for how in ("http", "path", "memory", *(("shared",) if engine == "torch" else ())):
                row[f"{how}_s"] = asyncio.run(_pushes(urls[0], tensors, how, repeats))
    print(row, flush=True)
    return row


def measure_shared(device: str, repeats: int) -> dict:
    """The tiny student, perturbed, pushed from `device` into a torch sampler on `device` over
    HTTP and then shared (`weight_transport: shared`): seconds per push, the sampler's greedy
    completions after each (the same weights, so the same completions, not those of the weights
    it started with), and where the sampler says each push came from (on a GPU: the learner's
    cuda buffer, opened by CUDA IPC; a push that fell back to HTTP says "the request body").
    Raises when the shared push did not arrive through the buffer or served other weights."""
    model_dir = ensure_tiny_model("student")
    torch.manual_seed(0)
    tensors = {n: (p.detach() + 0.05 * torch.randn_like(p)).to(device)
               for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}  # fmt: skip
    prompts = [[1, 365, 201, 89], [1, 67, 360, 201]]
    row: dict = {"device": device, "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    with tempfile.TemporaryDirectory(prefix="push-check-") as logs:
        args = ["--model", str(model_dir), "--engine", "torch", "--device", device]
        with local_servers([LocalServer("sampler", args, Path(logs))], timeout=300) as urls, SamplerClient(
            urls[0]
        ) as client:  # fmt: skip
            served = {"before": _greedy(client, prompts)}
            for how in ("http", "shared"):
                row[f"{how}_s"] = asyncio.run(_pushes(urls[0], tensors, how, repeats))
                served[how] = _greedy(client, prompts)
        log = (Path(logs) / "sampler.log").read_text()
    origins = re.findall(r"loaded \d+ weight tensors from (.+), policy_version=", log)
    row["origins"] = sorted(set(origins))
    row["served"] = served
    print(row, flush=True)
    buffer = f"the learner's {'memfd' if device == 'cpu' else 'cuda'} buffer"
    if buffer not in origins or served["shared"] != served["http"] or served["http"] == served["before"]:
        raise SystemExit(f"the shared push did not serve the pushed weights through {buffer}: {row}")
    return row


def _greedy(client: SamplerClient, prompts: list[list[int]]) -> list[list[int]]:
    reply = client.generate(prompt_ids=prompts, n=1, temperature=0.0, max_tokens=8)
    return [r.completions[0].completion_ids for r in reply.results]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", choices=list(QWEN25_SHAPES), default=["0.5b", "1.5b"],
                        help="none: the small push alone")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=0.15, help="the small push's idle spell (the toy loop's)")
    parser.add_argument("--small-repeats", type=int, default=30)
    parser.add_argument("--transports", choices=list(QWEN25_SHAPES), default=None,
                        help="push this shape by every transport into a real sampler (minutes on CPU)")  # fmt: skip
    parser.add_argument("--engine", choices=["vllm", "torch"], default="vllm", help="that sampler's engine")
    parser.add_argument("--transport-repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench-models")
    parser.add_argument("--shared", metavar="DEVICE", default=None,
                        help="only the shared push's check on DEVICE (cpu, cuda; bench/device.sh)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.shared:
        shared = measure_shared(args.shared, args.transport_repeats)
        write_results({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "shared": shared}, args.out,
                      "push_shared.json")  # fmt: skip
        return
    rows, wire = [], []
    for name in args.shapes:
        tensors = random_push(name)
        rows.append(measure_check(name, tensors, args.repeats))
        wire.append(measure_wire(name, tensors, args.repeats))
        del tensors
    small = measure_after_idle(args.small_repeats, args.idle_s)
    transports = (measure_transports(args.models, args.transports, args.engine, args.transport_repeats)
                  if args.transports else None)  # fmt: skip
    results = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "rows": rows, "wire": wire, "small_push": small, "transports": transports}  # fmt: skip
    write_results(results, args.out, "push_check.json")


if __name__ == "__main__":
    main()
