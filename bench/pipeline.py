"""The pipelined loop against the serial one: max_staleness 0, 1 and 2 on the same config, in one run.

    python -m bench.pipeline                    # CPU: tiny models, torch servers pinned apart from the learner
    python -m bench.pipeline --gpu              # GPU: Qwen2.5-0.5B / 1.5B shapes, vLLM servers, bf16 learner
    python -m bench.pipeline --smoke            # seconds, CI

One sampler and one grader serve every run (started once, on their own cores on CPU: the pipeline
can only overlap work that has somewhere to run); each run is its own `opd run` process (pinned to
the other cores) with external service URLs, the same seeds and prompts, differing only in
`train.max_staleness`. Reported per run, and as ratios to max_staleness 0: steps/s and completion
tokens/s over the steps after the first, the mean and max policy lag, the samples dropped as too
stale, and the held-out reverse KL at equal steps (the last eval) and at equal wall time (each
run's eval curve read at the wall time the fastest run needed for all its steps).
"""

import argparse
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
from learner.metrics import read_metrics
from opd.launch import LocalServer, local_servers
from opd.tiny import ensure_tiny_model
from opd.vllm_engine import cuda_available


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--server-cores", default="0", help="CPU: cores of the sampler and grader (taskset list)")
    parser.add_argument("--learner-cores", default="1", help="CPU: cores of the learner")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench-models")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_steps, args.staleness = 3, 3, [0, 1]
    return args


def run_config(args: argparse.Namespace, student: Path, teacher: Path, urls: list[str], run_dir: Path) -> dict:
    """The shared config of every run (the tiny demo's recipe; real shapes on a GPU)."""
    sampling = {"n": 4, "temperature": 1.0, "max_tokens": 24 if not args.gpu else 256}
    train = {"steps": args.steps, "batch_size": 4 if not args.gpu else 32, "lr": 1e-3 if not args.gpu else 1e-5,
             "ppo_steps": 2}  # fmt: skip
    if args.gpu:
        train |= {"device": "cuda", "precision": "bf16", "micro_batch_tokens": 8192}
    return {
        "student": {"path": str(student)}, "teacher": {"path": str(teacher)},
        "data": {"train_path": str(Path("examples/tiny/train.jsonl").resolve()),
                 "eval_path": str(Path("examples/tiny/eval.jsonl").resolve())},
        "run_dir": str(run_dir), "sampling": sampling, "train": train,
        "eval": {"eval_steps": args.eval_steps, "max_items": 32, "n": 4, "max_tokens": sampling["max_tokens"]},
        "services": {"sampler_url": urls[0], "grader_url": urls[1]},
        "checkpoint": {"save_steps": 0, "keep_last": 1}, "logging": {"progress": False},
    }  # fmt: skip


def run_learner(config: dict, staleness: int, args: argparse.Namespace) -> dict:
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "opd.cli", "run", str(path), "--train.max_staleness", str(staleness)]
    env = dict(os.environ)
    if not args.gpu and hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", args.learner_cores, *cmd]
        env["OMP_NUM_THREADS"] = str(len(args.learner_cores.split(",")))
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"max_staleness {staleness} failed:\n{result.stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "rows": read_metrics(run_dir / "metrics.jsonl")}


def summary(rows: list[dict]) -> dict:
    steps = [r for r in rows if "time/step" in r]
    timed = steps[1:] or steps  # the first step pays one-time warm-up
    seconds = statistics.mean(r["time/step"] for r in timed)
    clock, evals = 0.0, {}
    for r in sorted(rows, key=lambda r: r["step"]):
        clock += r.get("time/step", 0.0)
        if "eval/reverse_kl_per_token" in r:
            evals[r["step"]] = (clock, r["eval/reverse_kl_per_token"])
    return {
        "steps_per_s": 1.0 / seconds,
        "tokens_per_s": statistics.mean(r["throughput/tokens_per_s"] for r in timed),
        "lag_mean": statistics.mean(r["policy/lag"] for r in steps),
        "lag_max": max(r["policy/lag_max"] for r in steps),
        "dropped_stale": sum(r["pipeline/dropped_stale"] for r in steps),
        "wait_s": statistics.mean(r["time/wait"] for r in timed),
        "evals": [{"step": s, "wall_s": w, "kl": kl} for s, (w, kl) in sorted(evals.items())],
    }


def kl_at_wall(evals: list[dict], seconds: float) -> float:
    """The last eval at or before `seconds` of training time."""
    return [e["kl"] for e in evals if e["wall_s"] <= seconds + 1e-9][-1]


def report(results: dict) -> None:
    base = results["runs"]["0"]
    fastest_end = min(r["evals"][-1]["wall_s"] for r in results["runs"].values())
    print(f"\n| max_staleness | steps/s | x serial | tok/s | x serial | lag mean / max | dropped | wait s/step | "
          f"held-out KL at step {base['evals'][-1]['step']} | KL at {fastest_end:.1f} s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in results["runs"].items():
        print(f"| {k} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / base['steps_per_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
              f"{r['lag_mean']:.2f} / {r['lag_max']:.0f} | {r['dropped_stale']:.0f} | {r['wait_s']:.3f} | "
              f"{r['evals'][-1]['kl']:.3f} | {kl_at_wall(r['evals'], fastest_end):.3f} |")  # fmt: skip


def servers(args: argparse.Namespace, student: Path, teacher: Path, logs: Path) -> list[LocalServer]:
    engine = "vllm" if args.gpu else "torch"
    common = ["--engine", engine] + (["--gpu-memory-utilization", "0.25", "--dtype", "bfloat16"] if args.gpu else [])
    env = {} if args.gpu else {"OMP_NUM_THREADS": str(len(args.server_cores.split(",")))}
    made = [LocalServer("sampler", ["--model", str(student), *common], logs, env=env),
            LocalServer("grader", ["--model", str(teacher), *common], logs, env=env)]  # fmt: skip
    return made


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.gpu and not cuda_available():
        raise SystemExit("--gpu needs a CUDA device")
    if args.gpu:
        student = random_model(args.models, "qwen2.5-0.5b", QWEN25_SHAPES["0.5b"], seed=0, dtype="bfloat16")
        teacher = random_model(args.models, "qwen2.5-1.5b", QWEN25_SHAPES["1.5b"], seed=0, dtype="bfloat16")
    else:
        student, teacher = ensure_tiny_model("student"), ensure_tiny_model("teacher")
    root = Path(tempfile.mkdtemp(prefix="opd-pipeline-"))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    made = servers(args, student, teacher, root / "logs")
    with local_servers(made, one_at_a_time=args.gpu) as urls:  # on one GPU: start-up profiles apart
        if not args.gpu and hasattr(os, "sched_setaffinity"):
            cores = {int(c) for c in args.server_cores.split(",")}
            for server in made:  # the server and the engine processes it started
                subprocess.run(["taskset", "-a", "-p", "-c", args.server_cores, str(server.proc.pid)],
                               capture_output=True, check=False)  # fmt: skip
            results["server_cores"] = sorted(cores)
        for k in args.staleness:
            run = run_learner(run_config(args, student, teacher, urls, root / f"k{k}"), k, args)
            results["runs"][str(k)] = summary(run["rows"]) | {"wall_s": run["wall_s"]}
            print(f"max_staleness {k}: {results['runs'][str(k)]}", flush=True)
    report(results)
    name = "gpu-pipeline.json" if args.gpu else ("smoke-pipeline.json" if args.smoke else "pipeline.json")
    write_results(results, args.out, name)
    return results


if __name__ == "__main__":
    main()
