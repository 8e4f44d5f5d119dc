"""What the benchmarks share: timing a call, where results go (JSON under bench/results/
unless `--out` says otherwise), and what a failed run leaves behind."""

import json
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path("bench/results")


def write_results(results: dict, out: Path | None, name: str) -> Path:
    """Write `results` as JSON to `out`, or to bench/results/`name`; say where."""
    path = out or RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return path


def call_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of `fn` (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` (after the caller's warm-up)."""
    return statistics.median(call_seconds(fn, repeats))


@contextmanager
def logs_kept_on_failure(run_dir: str | Path, dest: Path) -> Iterator[None]:
    """When the block fails, copy the service logs under `run_dir` (`<run>/logs/*.log`) to `dest`:
    a run in a temporary directory takes a server's traceback with it otherwise, and on a lent GPU
    only the results folder comes back."""
    try:
        yield
    except BaseException:
        for log in Path(run_dir).rglob("logs/*.log"):
            target = dest / log.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, target)
        print(f"the run failed; its service logs are in {dest}", file=sys.stderr)
        raise


def exit_on_sigterm() -> None:
    """SIGTERM (what `timeout` sends) ends the process as an exception would, so `finally` blocks
    and `logs_kept_on_failure` run; by default it ends the process at once."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
