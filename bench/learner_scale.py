"""Learner memory and speed at a real vocabulary: one micro-batch holding everything vs micro-batches,
and the sampled loss vs the top-k loss.

    python -m bench.learner_scale                       # CPU: `opd run` processes at vocab 151,936
    python -m bench.learner_scale --gpu                 # GPU: Qwen2.5-0.5B shape, bf16, tokens/s + MFU
    python -m bench.learner_scale --smoke               # both modes on tiny shapes in seconds (CI)

Process mode (the default) measures what a user sees: the whole `opd run` process, started once
per (batch size, mode) against one external torch sampler and grader, 2 steps of n=1 samples of
`--max-tokens` tokens. Its models have tiny bodies (hidden 128, 2 layers) and Qwen2.5's
151,936-row vocabulary (our 456-token tokenizer: every id past it is a padded id), so the
vocabulary dominates memory. It reports peak RSS (the child's `ru_maxrss`) and learner tokens/s
(completion tokens / `time/learn`, which includes scoring) for
  before-style: `train.micro_batch_tokens` and `train.logprob_chunk_tokens` so large that the
                whole batch is one forward with full logits (what the learner did before);
  micro-batched: `micro_batch_tokens` 512 with the default 512-position LM-head chunks,
  micro-batched topk: the same with `train.loss: topk` (the grader's top 16 at every position,
                at this vocabulary: the head's logprobs and the exact head KL in each LM-head chunk),
and the ratios between them, measured in the same run (`--modes` picks some).

GPU mode runs the update in process on synthetic samples (random tokens, teacher logprobs and,
for the top-k loss, a random teacher top-16 at every position): a random-init model of
Qwen2.5-0.5B's shape, bf16 autocast with float32 master weights, 8k-token micro-batches, once per
`--losses` entry; it reports update tokens/s, peak GPU memory and MFU (6 x parameters x tokens/s
over the device's dense bf16 peak; attention FLOPs and the head's extra work left out, so MFU is a
lower bound).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_results
from bench.models import QWEN25_SHAPES, random_model
from learner.metrics import read_metrics
from opd.launch import LocalServer, local_servers

VOCAB = 151_936
BODY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
MODES = {
    "before-style": ["--train.micro_batch_tokens", "1000000000", "--train.logprob_chunk_tokens", "1000000000"],
    "micro-batched": ["--train.micro_batch_tokens", "512"],
    "micro-batched topk": ["--train.micro_batch_tokens", "512", "--train.loss", "topk", "--train.top_k", "16"],
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 peak by device name (no sparsity), for MFU."""


def run_learner(config: Path, run_dir: Path, batch: int, mode: str, args: argparse.Namespace) -> dict:
    """One `opd run` process; its peak RSS and per-step metrics."""
    cmd = [sys.executable, "-m", "opd.cli", "run", str(config), "--run_dir", str(run_dir),
           "--train.batch_size", str(batch), *MODES[mode]]  # fmt: skip
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"error": f"exit status {status}; log {run_dir.parent / run_dir.name}.log"}
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "time/learn" in m]
    tokens = sum(m["completion/mean_length"] * batch for m in steps)

    def mean(key: str) -> float:
        return sum(m[key] for m in steps) / len(steps)

    return {
        "peak_rss_gb": usage.ru_maxrss / 2**20,  # KiB on Linux
        "learner_tokens_per_s": tokens / sum(m["time/learn"] for m in steps),
        "completion_tokens_per_step": tokens / len(steps),
        "seconds_per_step": {phase: mean(f"time/{phase}") for phase in ("step", "generate", "grade", "learn")},
    }


def process_mode(args: argparse.Namespace, root: Path) -> dict:
    student = random_model(args.models, "scale-student", dict(BODY, vocab_size=args.vocab), seed=1)
    teacher = random_model(args.models, "scale-teacher", dict(BODY, vocab_size=args.vocab), seed=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort {i} {i * 7} {i * 13}"}) + "\n" for i in range(64)))
    servers = [LocalServer("sampler", ["--model", str(student), "--engine", "torch"], root / "logs"),
               LocalServer("grader", ["--model", str(teacher), "--engine", "torch"], root / "logs")]  # fmt: skip
    results: dict = {}
    with local_servers(servers) as (sampler_url, grader_url):
        config = root / "config.yml"
        config.write_text(json.dumps({
            "student": {"path": str(student)}, "teacher": {"path": str(teacher)},
            "data": {"train_path": str(prompts)},
            "sampling": {"n": 1, "temperature": 1.0, "max_tokens": args.max_tokens},
            "train": {"steps": args.steps, "lr": 1e-5},
            "services": {"sampler_url": sampler_url, "grader_url": grader_url},
            "checkpoint": {"save_steps": 0, "keep_last": 1}, "logging": {"progress": False},
        }))  # fmt: skip
        for batch in args.batches:
            for mode in args.modes:
                row = run_learner(config, root / f"run-{mode}-{batch}", batch, mode, args)
                results.setdefault(mode, {})[batch] = row
                print(f"batch {batch:3d} {mode:14s} {row}", flush=True)
    return results


def report_process(results: dict, batches: list[int]) -> None:
    if {"before-style", "micro-batched"} <= set(results):
        print("\n| batch | peak RSS before-style | peak RSS micro-batched | memory ratio | learner tok/s before | "
              "learner tok/s micro | speed ratio |")  # fmt: skip
        _ratio_rows(results["before-style"], results["micro-batched"], batches)
    if {"micro-batched", "micro-batched topk"} <= set(results):
        print("\n| batch | peak RSS sampled | peak RSS topk | memory ratio | learner tok/s sampled | "
              "learner tok/s topk | speed ratio |")  # fmt: skip
        _ratio_rows(results["micro-batched"], results["micro-batched topk"], batches)
    for mode, rows in results.items():
        ok = [b for b in batches if "error" not in rows[b]]
        if len(ok) >= 2:
            growth = rows[ok[-1]]["peak_rss_gb"] / rows[ok[0]]["peak_rss_gb"]
            print(f"{mode}: peak RSS x{growth:.2f} from batch {ok[0]} to {ok[-1]} (x{ok[-1] // ok[0]} the batch)")


def _ratio_rows(reference: dict, other: dict, batches: list[int]) -> None:
    """Table rows of `other` against `reference` (memory and speed ratios other / reference)."""
    print("|---|---|---|---|---|---|---|")
    rss, tok_s = "peak_rss_gb", "learner_tokens_per_s"
    for batch in batches:
        ref, row = reference[batch], other[batch]
        if "error" in ref or "error" in row:
            print(f"| {batch} | {ref.get('error', '')} | {row.get('error', '')} | | | | |")
            continue
        print(f"| {batch} | {ref[rss]:.2f} GB | {row[rss]:.2f} GB | {row[rss] / ref[rss]:.2f} | "
              f"{ref[tok_s]:.0f} | {row[tok_s]:.0f} | {row[tok_s] / ref[tok_s]:.2f} |")  # fmt: skip


def synthetic_batches(
    samples: int, prompt_len: int, completion_len: int, vocab: int, budget: int, device: str, top_k: int = 0
):  # fmt: skip
    """Random samples packed into micro-batches, graded with random teacher logprobs and, with
    `top_k`, a random teacher top-k at each position (k consecutive ids from a random start,
    logprobs descending): the shapes and work of a real top-k step, not its values."""
    from grader.tensors import ScoredBatch
    from learner.rollout import Rollouts
    from learner.update import micro_batches

    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    completions = [ids(completion_len) for _ in range(samples)]
    rollouts = Rollouts([ids(prompt_len) for _ in range(samples)], completions,
                        [[-1.0] * completion_len for _ in completions], versions=[0] * samples)  # fmt: skip
    positions = samples * completion_len
    top_ids = top_logprobs = None
    if top_k:
        top_ids = torch.randint(0, vocab - top_k, (positions, 1), generator=gen) + torch.arange(top_k)
        top_logprobs = -(torch.rand(positions, top_k, generator=gen) * 8).sort(dim=1).values
    graded = ScoredBatch(torch.full((samples,), completion_len, dtype=torch.long),
                         -3 * torch.rand(positions, generator=gen), top_ids, top_logprobs, None)  # fmt: skip
    return micro_batches(rollouts, graded, pad_id=0, max_tokens=budget, device=device)


def in_process_mode(args: argparse.Namespace) -> dict:
    """Update throughput on one device: forward + backward over micro-batches + optimizer step."""
    from learner.config import TrainConfig
    from learner.distributed import Processes
    from learner.policy import Policy
    from learner.update import adamw, ppo_update
    from opd.modeling import load_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = QWEN25_SHAPES["0.5b"] if args.gpu else dict(BODY, vocab_size=args.vocab)
    path = random_model(args.models, "update-student", shape, seed=1)
    lm = load_causal_lm(str(path), "float32", device)
    params = sum(p.numel() for p in lm.parameters())
    precision = "bf16" if device == "cuda" else "fp32"
    policy = Policy(lm, precision, args.chunk, args.gradient_checkpointing).train()
    optimizer = adamw(list(policy.parameters()), TrainConfig())
    processes = Processes(False, device)
    rows = []
    for loss, samples in ((loss, samples) for loss in args.losses for samples in args.samples):
        train = TrainConfig(micro_batch_tokens=args.micro_batch_tokens, logprob_chunk_tokens=args.chunk, loss=loss,
                            top_k=args.top_k)  # fmt: skip
        batches = synthetic_batches(samples, args.prompt_len, args.completion_len, shape["vocab_size"],
                                    args.micro_batch_tokens, device, args.top_k if loss == "topk" else 0)  # fmt: skip
        tokens = samples * (args.prompt_len + args.completion_len)
        ppo_update(policy, optimizer, batches, train=train, processes=processes)  # warm-up
        held_gb = None  # what stays allocated between updates (weights, grads, AdamW state, the batch)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held_gb = torch.cuda.memory_allocated() / 2**30
        start = time.perf_counter()
        for _ in range(args.repeats):
            ppo_update(policy, optimizer, batches, train=train, processes=processes)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        row = {"loss": loss, "samples": samples, "tokens": tokens, "micro_batches": len(batches), "seconds": seconds,
               "tokens_per_s": tokens / seconds}  # fmt: skip
        if device == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
            row["held_gpu_gb"] = held_gb
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
            row["mfu"] = 6 * params * row["tokens_per_s"] / peak if peak else None
        rows.append(row)
        print(row, flush=True)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "parameters": params,
            "precision": precision, "micro_batch_tokens": args.micro_batch_tokens, "rows": rows}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="in-process update at Qwen2.5-0.5B shape (needs CUDA)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds: checks the benchmark runs")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="process mode's runs")
    parser.add_argument("--losses", nargs="+", choices=["sampled", "topk"], default=["sampled", "topk"],
                        help="in-process (GPU) mode: one update per loss and sample count")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=16, help="train.top_k of the topk loss (in-process mode)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 32, 64], help="GPU mode: samples per update")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--completion-len", type=int, default=1024)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench-models")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.smoke:
        # one batch size: each (batch, mode) is an `opd run` process of its own, ~6 s here (CI's time)
        args.batches, args.steps, args.max_tokens, args.vocab = [1], 1, 8, 4096
        args.samples, args.prompt_len, args.completion_len, args.micro_batch_tokens, args.repeats = [2], 8, 16, 32, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="opd-learner-scale-"))
    args.models.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d")}
    if args.gpu or args.smoke:
        results["in_process"] = in_process_mode(args)
    if not args.gpu:
        results["process"] = process_mode(args, root)
        report_process(results["process"], args.batches)
    name = (
        "gpu-learner_scale.json" if args.gpu else ("smoke-learner_scale.json" if args.smoke else "learner_scale.json")
    )
    write_results(results, args.out, name)


if __name__ == "__main__":
    main()
