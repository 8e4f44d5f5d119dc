"""What the benchmarks share: timing a call, and where results go (JSON under bench/results/
unless `--out` says otherwise)."""

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path("bench/results")


def write_results(results: dict, out: Path | None, name: str) -> Path:
    """Write `results` as JSON to `out`, or to bench/results/`name`; say where."""
    path = out or RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return path


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
