"""Where a benchmark's results go: JSON under bench/results/ unless `--out` says otherwise."""

import json
from pathlib import Path

RESULTS = Path("bench/results")


def write_results(results: dict, out: Path | None, name: str) -> Path:
    """Write `results` as JSON to `out`, or to bench/results/`name`; say where."""
    path = out or RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return path
