"""What taking turns between processes costs a CPU step, and what keeping freed memory saves.

    python -m bench.host_memory [--turns 60] [--models runs/toy] [--out FILE]

The toy step's two heaviest phases, the teacher's forward (opd's grader) and the student's forward,
backward and AdamW step (opd's learner), on the toy's batch of 128 x 28 tokens, three ways,
interleaved turn by turn so that the machine's drift touches all three alike:

- one process does both phases, one after the other (as TRL's GKD does);
- two processes take turns, one phase each (as opd's grader and learner do), malloc as it comes;
- the same two processes with `opd.host_memory.keep_freed_host_memory` (what opd's CPU processes do).

Each phase is timed inside its process, with the page faults it took (getrusage's minor faults).
"""

import argparse
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from bench.common import write_results
from bench.toy_distill import machine

ROWS, LENGTH = 128, 28
SETUPS = {"one process": ("AB",), "two processes": ("A", "B"), "two processes, freed memory kept": ("A", "B")}
PHASES = {"A": "teacher forward", "B": "student forward, backward, AdamW"}
SKIPPED_TURNS = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=60, help="turns of each setup (the first 5 are left out)")
    parser.add_argument("--models", type=Path, default=Path("runs/toy"), help="toy models cache (prepare --out)")
    parser.add_argument("--out", type=Path, help="default: bench/results/host_memory.json")
    return parser.parse_args()


def phase(kind: str, models: Path) -> Callable[[], None]:
    from opd.modeling import load_causal_lm

    ids = torch.randint(3, 400, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    if kind == "A":
        teacher = load_causal_lm(str(models / "teacher"), "float32", "cpu").eval()

        @torch.inference_mode()
        def forward() -> None:
            teacher(input_ids=ids)

        return forward
    student = load_causal_lm(str(models / "student"), "float32", "cpu").train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)

    def update() -> None:
        student(input_ids=ids).logits.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return update


def serve(kinds: str, models: Path, keep: bool, conn: Connection) -> None:
    """One process: its phases once per message; replies with (seconds, faults) per phase at the end."""
    from opd.host_memory import keep_freed_host_memory

    phases = [phase(kind, models) for kind in kinds]
    if keep:
        keep_freed_host_memory(torch.device("cpu"))
    for _ in range(3):
        for run in phases:
            run()
    turns = []
    while conn.recv():
        turn = []
        for run in phases:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            run()
            turn.append((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        turns.append(turn)
        conn.send(True)
    conn.send(turns)


def main() -> None:
    args = parse_args()
    from examples.toy.prepare import prepare

    prepare(args.models)
    spawn = multiprocessing.get_context("spawn")
    setups: dict[str, list[Connection]] = {}
    processes = []
    for name, groups in SETUPS.items():
        setups[name] = []
        for kinds in groups:
            ours, theirs = spawn.Pipe()
            process = spawn.Process(target=serve, args=(kinds, args.models, "kept" in name, theirs))
            process.start()
            processes.append(process)
            setups[name].append(ours)
    for turn in range(args.turns):
        for conns in setups.values():
            for conn in conns:  # each process's phases in turn, the next one starting when it is done
                conn.send(True)
                conn.recv()
        if turn % 10 == 9:
            print(f"turn {turn + 1}/{args.turns}", flush=True)
    results = {"machine": machine("cpu"), "turns": args.turns, "setups": {}}
    for name, conns in setups.items():
        per_phase = []
        for conn in conns:
            conn.send(False)
            turns = conn.recv()
            # each of the process's phases over the turns after the first few
            per_phase.extend(zip(*turns[min(SKIPPED_TURNS, len(turns) - 1) :], strict=True))
        row = {}
        for kind, samples in zip("AB", per_phase, strict=True):
            row[PHASES[kind]] = {"median_ms": round(1e3 * statistics.median(s for s, _ in samples), 1),
                                 "median_page_faults": int(statistics.median(f for _, f in samples))}  # fmt: skip
        row["both_ms"] = round(sum(p["median_ms"] for p in row.values()), 1)
        results["setups"][name] = row
        print(f"{name}: {row}")
    for process in processes:
        process.join()
    write_results(results, args.out, "host_memory.json")


if __name__ == "__main__":
    main()
