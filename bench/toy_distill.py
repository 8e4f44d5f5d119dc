"""opd against TRL's GKDTrainer on the toy task: same models, prompts, steps and machine, one run.

    pip install -e '.[bench]'
    python -m bench.toy_distill [--steps 60] [--batch-size 128] [--engine torch] [--out runs/toy-bench]
    python -m bench.toy_distill --device cuda --engine torch ...   # both systems on the GPU (bench/device.sh)

1. Builds (or reuses) the toy teacher and SFT'd student (`examples/toy/prepare.py`).
2. Distils the student with opd, the embedded default (local sampler + grader, `--engine`), the
   learner and its servers on `--device`.
3. Distils the same student with TRL `GKDTrainer` fully on-policy with reverse KL (lmbda=1,
   beta=1), same prompts in the same order, batch, steps, learning rate, optimizer and clipping,
   on the same device.
4. Scores teacher, student before and both students after with one in-process greedy evaluator.

Writes `<out>/results.json`, `<out>/toy_distill.png` (reverse KL and eval reward over steps for
both) and each run's metrics.jsonl under `<out>/opd-ppo{K}` and `<out>/trl`; prints every run
step by step (reverse KL, eval reward, tokens/s, time per phase), then the tables that
BENCHMARKS.md quotes. The methods differ in their loss: opd's per-token advantage
`logp_teacher - logp_student` on the sampled token with a PPO clip; GKD's exact reverse KL over the
whole vocabulary at every position. Step times include everything one step does in each system.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.toy.evaluate import MAX_NEW_TOKENS, greedy_rewards
from examples.toy.prepare import NUM_EVAL, ToyFiles, distill_problems, prepare, sft_summary
from examples.toy.task import SortItem, eval_problems, to_items
from learner import OnPolicyDistillationTrainer
from learner.metrics import read_metrics
from learner.plot import plot_runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per step, one sample each, both systems")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate, both systems")
    parser.add_argument("--eval-steps", type=int, default=10, help="evaluate every N steps (N > 0)")
    parser.add_argument(
        "--ppo-steps",
        type=int,
        nargs="+",
        default=[1, 2],
        help="one opd run per value: clipped updates per batch (GKD takes one)",
    )
    parser.add_argument(
        "--losses", nargs="+", choices=["sampled", "topk"], default=["sampled", "topk"],
        help="opd's train.loss: one run per loss and ppo_steps value",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=16, help="train.top_k of the topk runs")
    parser.add_argument("--top-k-head", choices=["teacher", "both"], default="teacher", help="train.top_k_head")
    parser.add_argument("--max-staleness", type=int, default=0, help="train.max_staleness of every opd run")
    parser.add_argument("--engine", choices=["auto", "vllm", "torch"], default="auto", help="opd's local servers")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="where both systems run: opd's learner and local servers, TRL's student and teacher (cuda: the first GPU)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true", help="opd only (TRL not installed)")
    parser.add_argument("--models", type=Path, default=Path("runs/toy"), help="toy models cache (prepare --out)")
    parser.add_argument("--out", type=Path, default=Path("runs/toy-bench"))
    args = parser.parse_args()
    if args.eval_steps <= 0:
        parser.error("--eval-steps must be positive: the plot and table need the eval curve")
    return args


def run_opd(
    files: ToyFiles,
    train: list[SortItem],
    eval_: list[SortItem],
    args: argparse.Namespace,
    ppo_steps: int,
    loss: str,
    run_dir: Path,
) -> dict:
    """Distil with opd's Python API; returns wall times and the final checkpoint."""
    start = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own run: a run dir holds one run
    trainer = OnPolicyDistillationTrainer(
        student=str(files.student), teacher=str(files.teacher), train_dataset=train, eval_dataset=eval_,
        run_dir=str(run_dir), data={"shuffle": False},
        sampling={"n": 1, "temperature": 1.0, "max_tokens": MAX_NEW_TOKENS},
        train={"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "ppo_steps": ppo_steps, "loss": loss, "top_k": args.top_k, "top_k_head": args.top_k_head,
               "max_staleness": args.max_staleness, "device": args.device},
        eval={"eval_steps": args.eval_steps, "n": 1, "max_tokens": MAX_NEW_TOKENS}, services=services(args),
        logging={"progress": True},
    )  # fmt: skip
    trainer.train()
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "run_dir": str(run_dir),
        "final_dir": str(run_dir / "checkpoints" / f"step_{args.steps:06d}"),
    }


def services(args: argparse.Namespace) -> dict:
    """opd's local servers: `--engine` on `--device`; vLLM servers sharing a GPU with the learner
    each take a fifth of it (the toy models need a few MB, the rest is KV cache)."""
    shared_gpu = args.device != "cpu" and args.engine != "torch"
    return {"engine": args.engine, "device": args.device} | ({"gpu_memory_utilization": 0.2} if shared_gpu else {})


def step_stats(rows: list[dict], batch_size: int) -> dict:
    """Per-step means over the training steps after the first (which pays one-time warm-up)."""
    steps = [row for row in rows if "time/step" in row][1:]
    seconds = statistics.mean(row["time/step"] for row in steps)
    phases = {key: statistics.mean(row[key] for row in steps)
              for key in steps[0] if key.startswith("time/") and key != "time/step"}  # fmt: skip
    tokens = statistics.mean(row["throughput/tokens_per_s"] for row in steps)
    return {"step_s": seconds, "samples_per_s": batch_size / seconds, "tokens_per_s": tokens, "phases": phases}


def final_rewards(files: ToyFiles, eval_: list[SortItem], finals: dict[str, str]) -> dict[str, float]:
    """Mean greedy eval reward of the teacher, the student before, and each distilled student, all
    scored on the CPU whatever `--device` trained them: one table across CPU and GPU runs (the
    in-run eval curves are scored where each system trains)."""
    tokenizer = AutoTokenizer.from_pretrained(files.student)
    dirs = {"teacher": str(files.teacher), "student before": str(files.student), **finals}
    scores = {}
    for name, path in dirs.items():
        rewards = greedy_rewards(AutoModelForCausalLM.from_pretrained(path), tokenizer, eval_)
        scores[name] = sum(rewards) / len(rewards)
    return scores


def gap_closed(after: float, before: float, teacher: float) -> float:
    """Share of the teacher-student reward gap that distillation closed, in percent."""
    return 100.0 * (after - before) / (teacher - before) if teacher != before else float("nan")


def per_step(name: str, rows: list[dict]) -> str:
    """One line per step of a run: reverse KL, tokens/s and phase times; eval columns where evaluated."""
    lines = [f"{name}:", "  step  train KL  eval KL  reward  tok/s  s/step  phases"]
    for row in rows:
        evals = (f"{row['eval/reverse_kl_per_token']:7.3f}  {row['eval/reward']:6.3f}" if "eval/reward" in row
                 else " " * 15)  # fmt: skip
        if "time/step" not in row:
            lines.append(f"  {row['step']:4d}  {'':8s}  {evals}")
            continue
        phases = " ".join(f"{k.removeprefix('time/')} {v:.3f}" for k, v in row.items()
                          if k.startswith("time/") and k != "time/step")  # fmt: skip
        lines.append(f"  {row['step']:4d}  {row['kl/reverse_per_token']:8.3f}  {evals}  "
                     f"{row['throughput/tokens_per_s']:5.0f}  {row['time/step']:6.3f}  {phases}")  # fmt: skip
    return "\n".join(lines)


def report(results: dict) -> str:
    """The markdown tables BENCHMARKS.md quotes."""
    scores, systems = results["rewards"], results["systems"]
    lines = ["| model | eval reward | gap closed |", "|---|---|---|"]
    before, teacher = scores["student before"], scores["teacher"]
    for name, value in scores.items():
        closed = f"{gap_closed(value, before, teacher):.0f}%" if name not in ("teacher", "student before") else ""
        lines.append(f"| {name} | {value:.3f} | {closed} |")
    lines += ["", "| system | s/step | samples/s | completion tok/s | wall (incl. start) | phases (s/step) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, info in systems.items():
        stats = info["stats"]
        phases = ", ".join(f"{k.removeprefix('time/')} {v:.3f}" for k, v in stats["phases"].items())
        lines.append(f"| {name} | {stats['step_s']:.3f} | {stats['samples_per_s']:.1f} | "
                     f"{stats['tokens_per_s']:.0f} | {info['wall_s']:.0f} s | {phases} |")  # fmt: skip
    return "\n".join(lines)


def machine(device: str) -> str:
    """CPU model, core count and torch threads (and the GPU, when the run used one), for the record."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    gpu = f"{torch.cuda.get_device_name(torch.device(device))}, " if device.startswith("cuda") else ""
    return f"{gpu}{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    args = parse_args()
    files = prepare(args.models)
    tokenizer = AutoTokenizer.from_pretrained(files.student)
    held_out = eval_problems(NUM_EVAL)
    prompts = distill_problems(held_out)
    if args.steps * args.batch_size > len(prompts):
        # past one epoch opd's batches run across the epoch boundary and TRL's last one is short
        raise SystemExit(f"--steps x --batch-size must be at most {len(prompts)} (one pass over the prompts)")
    train, eval_ = to_items(prompts, tokenizer), to_items(held_out, tokenizer)
    systems = {
        run_name(loss, k): run_opd(files, train, eval_, args, k, loss, args.out / run_dir_name(loss, k))
        for loss in args.losses
        for k in args.ppo_steps
    }
    if not args.skip_trl:
        from bench.toy_trl import run_trl  # the bench extra: TRL is not an opd dependency

        systems["trl gkd"] = run_trl(files, prompts, eval_, args)
    for info in systems.values():
        info["stats"] = step_stats(read_metrics(Path(info["run_dir"]) / "metrics.jsonl"), args.batch_size)
    finals = {f"{name} after": info["final_dir"] for name, info in systems.items()}
    results = {
        "date": date.today().isoformat(), "machine": machine(args.device),
        "args": {k: str(v) for k, v in vars(args).items()},
        "sft": {name: sft_summary(getattr(files, name)) for name in ("teacher", "student")},
        "rewards": final_rewards(files, eval_, finals), "systems": systems,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    curves = [(name, read_metrics(Path(info["run_dir"]) / "metrics.jsonl")) for name, info in systems.items()]
    title = "toy task (sort 8 digits): opd vs TRL GKD (lmbda=1, beta=1)"
    plot = plot_runs(curves, args.out / "toy_distill.png", title=title)
    wall = plot_runs(curves, args.out / "toy_distill_wall.png", title=title, x="wall")
    for name, rows in curves:
        print(per_step(name, rows), end="\n\n")
    print(report(results))
    print(f"\nwrote {args.out / 'results.json'}, {plot} and {wall}")


def run_name(loss: str, ppo_steps: int) -> str:
    return f"opd ppo_steps={ppo_steps}" if loss == "sampled" else f"opd {loss} ppo_steps={ppo_steps}"


def run_dir_name(loss: str, ppo_steps: int) -> str:
    return f"opd-ppo{ppo_steps}" if loss == "sampled" else f"opd-{loss}-ppo{ppo_steps}"


if __name__ == "__main__":
    main()
