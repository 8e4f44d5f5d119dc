"""Time per step at Qwen2.5's shapes: opd (sampled and top-k loss) against TRL's GKD, in one run.

    python -m bench.gkd_scale [--steps 4] [--batch-size 4] [--prompt-digits 48] [--max-tokens 64]
    python -m bench.gkd_scale --smoke            # tiny models: checks the bench runs

The toy task (bench/toy_distill.py) compares quality, with 1M-parameter models whose steps last
0.2 s, where a step's fixed costs (a weight push, HTTP round trips, three processes taking turns)
are a tenth of it. This compares time only, at the shapes users distil (a Qwen2.5-0.5B-shaped
student, a 1.5B-shaped teacher, 151,936 vocabulary rows; random weights, bench/models.py): the
same prompts, one sample each at temperature 1 up to `--max-tokens`, one update per batch, AdamW
at the same settings, float32 on the CPU (bf16 weights for the servers and autocast for the
learner on a GPU, `--device cuda`). opd runs its torch servers (the same HF kernels as TRL) on
the same device. Time per step is the median over steps 2..N (the first warms up). Random models
rarely emit their stop token, so every completion runs to `--max-tokens` in both systems.
"""

import argparse
import gc
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from bench.common import RESULTS, exit_on_sigterm, logs_kept_on_failure, write_results
from bench.models import QWEN25_SHAPES, random_model
from bench.toy_trl import MeasuredGKDTrainer, finish_gpu_work, gkd_config
from learner.config import OpdConfig
from learner.metrics import NullLogger
from learner.trainer import OnPolicyDistillationTrainer
from opd.tiny import ensure_tiny_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step, one sample each")
    parser.add_argument("--prompt-digits", type=int, default=48, help="each prompt: 'sort' and this many digits")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--losses", nargs="+", choices=["sampled", "topk"], default=["sampled", "topk"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench-models")
    parser.add_argument("--smoke", action="store_true", help="tiny models, two steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.prompt_digits, args.max_tokens = 2, 2, 8, 8
    return args


def chats(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    rng = random.Random(0)
    digits = [
        "".join(rng.choice("0123456789") for _ in range(args.prompt_digits))
        for _ in range(args.steps * args.batch_size)
    ]
    return [[{"role": "user", "content": f"sort {d}"}] for d in digits]


def median_step(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


class StepsOnly(OnPolicyDistillationTrainer):
    """The loop as users run it, without the final checkpoint: at 0.5B with AdamW's state that is
    6 GB written after the timed steps, which TRL's run (save_strategy "no") does not write."""

    def _maybe_save(self) -> None:
        return None


def run_opd(student: Path, teacher: Path, loss: str, args: argparse.Namespace) -> dict:
    out = args.out or RESULTS / f"{'smoke-' if args.smoke else ''}gkd_scale.json"
    logs = out.parent / f"{out.stem}-logs-{loss}"
    with tempfile.TemporaryDirectory(prefix="opd-gkd-scale-") as run_dir, logs_kept_on_failure(run_dir, logs):
        return _run_opd(student, teacher, loss, args, run_dir)


def _run_opd(student: Path, teacher: Path, loss: str, args: argparse.Namespace, run_dir: str) -> dict:
    gpu = args.device == "cuda"
    model_dtype = "bfloat16" if gpu else "float32"
    config = OpdConfig.model_validate({
        "student": {"path": str(student), "dtype": model_dtype},
        "teacher": {"path": str(teacher), "dtype": model_dtype},
        "run_dir": run_dir,
        "sampling": {"n": 1, "temperature": 1.0, "max_tokens": args.max_tokens},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "loss": loss, "top_k": args.top_k, "ppo_steps": 1,
                  "lr": 1e-5, "device": args.device, "precision": "bf16" if gpu else "fp32"},
        "services": {"engine": "torch", "device": args.device},
        "eval": {"eval_steps": 0}, "checkpoint": {"save_steps": 0},
        "logging": {"progress": False, "tensorboard": False},
    })  # fmt: skip
    start = time.perf_counter()
    items = [{"messages": chat} for chat in chats(args)]
    history = StepsOnly(config, train_dataset=items, eval_dataset=[], metrics=NullLogger()).train()
    phases = ["time/generate", "time/generate_engine", "time/grade", "time/grade_engine", "time/learn", "time/push"]
    row = {"s_per_step": median_step([h["time/step"] for h in history]),
           "steps_s": [h["time/step"] for h in history], "wall_s": time.perf_counter() - start,
           "tokens_per_step": statistics.mean(h["throughput/tokens_per_s"] * h["time/step"] for h in history),
           **{p: median_step([h[p] for h in history]) for p in phases}}  # fmt: skip
    print(f"opd {loss}: {row['s_per_step']:.2f} s/step", {p: round(row[p], 2) for p in phases}, flush=True)
    return row


class StepClock(TrainerCallback):
    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.rows, self.start = trainer_ref, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.trainer_ref[0].record = {}
        finish_gpu_work(args.device)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        finish_gpu_work(args.device)
        self.rows.append({"time/step": time.perf_counter() - self.start, **self.trainer_ref[0].record})


def run_gkd(student: Path, teacher: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="gkd-scale-") as out:
        return _run_gkd(student, teacher, args, out)


def _run_gkd(student: Path, teacher: Path, args: argparse.Namespace, out: str) -> dict:
    gpu = args.device == "cuda"
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(student)
    rows = [{"messages": [*chat, {"role": "assistant", "content": ""}]} for chat in chats(args)]
    config = gkd_config(out, batch_size=args.batch_size, steps=args.steps, lr=1e-5, max_new_tokens=args.max_tokens,
                        seed=0, device=args.device, bf16=gpu)  # fmt: skip
    ref: list = [None]
    clock = StepClock(ref)
    trainer = MeasuredGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),  # master weights, as opd's
        # on a GPU the teacher scores in bf16, as opd's grader does; the student trains in float32 under autocast
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16 if gpu else torch.float32),
        args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock],
    )  # fmt: skip
    ref[0] = trainer
    trainer.train()
    times = [r["time/step"] for r in clock.rows]
    row = {"s_per_step": median_step(times), "steps_s": times, "wall_s": time.perf_counter() - start,
           "tokens_per_step": statistics.mean(r["tokens"] for r in clock.rows),
           "time/generate": median_step([r["time/generate"] for r in clock.rows])}  # fmt: skip
    print(f"trl gkd: {row['s_per_step']:.2f} s/step, generate {row['time/generate']:.2f}", flush=True)
    # GKD runs first: its models and AdamW state go before opd's servers start on the same device
    ref[0] = None
    del trainer
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        student, teacher = ensure_tiny_model("student"), ensure_tiny_model("teacher")
    else:
        # bf16 files on a GPU (what its servers load; half the bytes to build and read, and the
        # models gpu_bench and pipeline build), float32 on the CPU; the learners train float32 copies
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        student = random_model(args.models, "qwen2.5-0.5b", QWEN25_SHAPES["0.5b"], seed=0, dtype=dtype)
        teacher = random_model(args.models, "qwen2.5-1.5b", QWEN25_SHAPES["1.5b"], seed=0, dtype=dtype)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    results: dict = {"date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
                     "device": device, "torch": torch.__version__, "systems": {}}  # fmt: skip
    # GKD first, then opd's losses in the order given, the file rewritten after each: a run cut
    # short by a time limit (bench/device.sh) keeps the reference and every system it finished.
    gkd = run_gkd(student, teacher, args)
    record(results, "trl gkd", gkd, gkd, args)
    for loss in args.losses:
        record(results, f"opd {loss}", run_opd(student, teacher, loss, args), gkd, args)
    return results


def record(results: dict, name: str, row: dict, gkd: dict, args: argparse.Namespace) -> None:
    """`row` into the results as `name`, with its ratio to GKD, and the results file rewritten."""
    row["x_gkd"] = row["s_per_step"] / gkd["s_per_step"]
    results["systems"][name] = row
    print(f"{name:12s} {row['s_per_step']:8.2f} s/step  {row['x_gkd']:.2f}x GKD", flush=True)
    write_results(results, args.out, f"{'smoke-' if args.smoke else ''}gkd_scale.json")


if __name__ == "__main__":
    exit_on_sigterm()  # a time limit (bench/device.sh) still stops the servers and keeps a failed run's logs
    main()
