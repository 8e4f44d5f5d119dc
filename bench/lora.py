"""Full fine-tuning against a LoRA student: push bytes and seconds, learner memory and step time.

    python -m bench.lora                # CPU: the tiny student and a random-init Qwen2.5-0.5B shape
    python -m bench.lora --smoke        # the tiny student only, seconds (CI)

For each model and mode (full, LoRA r 16 on every attention and MLP projection):
  - the learner: a process of its own builds the student as `opd run` does (`student_policy`),
    takes 1 + `--steps` PPO updates on synthetic samples (`--samples` x (`--prompt-len` +
    `--completion-len`) tokens) and reports its peak RSS (`ru_maxrss`) and seconds per update;
  - the push: a local torch sampler (`--max-lora-rank 16` for LoRA) takes `--pushes` pushes of
    what the learner sends (the float32 parameters, or the adapter with its config), median time.
Full and LoRA are measured in the same run, one after the other, on the same machine.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_results
from bench.models import QWEN25_SHAPES, random_model

MODES = ("full", "lora")
RANK = 16


def model_path(name: str, models: Path) -> str:
    if name == "tiny":
        return "tiny:student"
    return str(random_model(models, "qwen2.5-0.5b", QWEN25_SHAPES["0.5b"], seed=0))


def spec(path: str, mode: str):
    from learner.config import LoraSpec, ModelSpec

    return ModelSpec(path=path, lora=LoraSpec(r=RANK, alpha=2 * RANK) if mode == "lora" else None)


def measure_learner(path: str, mode: str, args: argparse.Namespace) -> dict:
    """In this (fresh) process: peak RSS and seconds per update of the learner."""
    import resource

    from bench.learner_scale import synthetic_batches
    from learner.config import TrainConfig
    from learner.distributed import Processes
    from learner.policy import student_policy
    from learner.update import adamw, ppo_update

    train, processes = TrainConfig(), Processes(False, "cpu")
    policy = student_policy(spec(path, mode), train, "cpu").train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw(trainable, train)
    vocab = policy.lm.config.vocab_size
    batches = synthetic_batches(args.samples, args.prompt_len, args.completion_len, vocab, train.micro_batch_tokens,
                                "cpu")  # fmt: skip
    ppo_update(policy, optimizer, batches, train=train, processes=processes)  # warm-up; AdamW state allocated
    start = time.perf_counter()
    for _ in range(args.steps):
        ppo_update(policy, optimizer, batches, train=train, processes=processes)
    return {
        "update_s": (time.perf_counter() - start) / args.steps,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable_params": sum(p.numel() for p in trainable),
        "params": sum(p.numel() for p in policy.parameters()),
    }


def measure_push(path: str, mode: str, args: argparse.Namespace) -> dict:
    from learner.clients import SamplerClient
    from learner.config import TrainConfig
    from learner.distributed import Processes
    from learner.policy import push_bytes, student_policy, tensors_to_push
    from opd.launch import local_server

    policy = student_policy(spec(path, mode), TrainConfig(), "cpu")
    tensors, metadata = tensors_to_push(Processes(False, "cpu"), policy, "float32")
    flags = ["--model", path, "--engine", "torch"] + (["--max-lora-rank", str(RANK)] if mode == "lora" else [])

    async def pushes(url: str) -> list[float]:
        client, seconds = SamplerClient(url), []
        try:
            for version in range(1, args.pushes + 1):
                start = time.perf_counter()
                await client.push_weights(tensors, version, metadata)
                seconds.append(time.perf_counter() - start)
        finally:
            await client.aclose()
        return seconds

    with local_server("sampler", flags, Path(tempfile.mkdtemp(prefix="opd-bench-lora-"))) as url:
        seconds = asyncio.run(pushes(url))
    return {"push_bytes": push_bytes(tensors, metadata, "float32"), "push_s": statistics.median(seconds)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--models-list", nargs="+", default=["tiny", "qwen2.5-0.5b"], dest="names")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench-models")
    parser.add_argument("--learner-only", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.names, args.steps, args.pushes = ["tiny"], 1, 1
    return args


def learner_in_subprocess(name: str, mode: str, args: argparse.Namespace) -> dict:
    """A fresh process per measurement, so one model's peak memory never counts in another's."""
    cmd = [sys.executable, "-m", "bench.lora", "--learner-only", name, mode, "--samples", str(args.samples),
           "--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len),
           "--steps", str(args.steps), "--models", str(args.models)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=os.environ)
    if result.returncode != 0:
        raise SystemExit(f"{name} {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.learner_only:
        name, mode = args.learner_only
        print(json.dumps(measure_learner(model_path(name, args.models), mode, args)))
        return {}
    settings = {k: str(v) for k, v in vars(args).items()}
    results: dict = {"date": time.strftime("%Y-%m-%d"), "rank": RANK, "args": settings, "runs": {}}
    for name in args.names:
        path = model_path(name, args.models)
        for mode in MODES:
            row = learner_in_subprocess(name, mode, args) | measure_push(path, mode, args)
            results["runs"][f"{name} {mode}"] = row
            print(f"{name} {mode}: {row}", flush=True)
    report(results, args.names)
    write_results(results, args.out, "smoke-lora.json" if args.smoke else "lora.json")
    return results


def report(results: dict, names: list[str]) -> None:
    print("\n| model | mode | trainable params | push MB | push s | learner peak RSS | s/update |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        for mode in MODES:
            r = results["runs"][f"{name} {mode}"]
            print(f"| {name} | {mode} | {r['trainable_params']:,} | {r['push_bytes'] / 1e6:.2f} | {r['push_s']:.3f} | "
                  f"{r['peak_rss_gb']:.2f} GB | {r['update_s']:.2f} |")  # fmt: skip
        full, lora = results["runs"][f"{name} full"], results["runs"][f"{name} lora"]
        print(f"{name}: LoRA/full push bytes {lora['push_bytes'] / full['push_bytes']:.4f}, push time "
              f"{lora['push_s'] / full['push_s']:.3f}, memory {lora['peak_rss_gb'] / full['peak_rss_gb']:.2f}, "
              f"update time {lora['update_s'] / full['update_s']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
