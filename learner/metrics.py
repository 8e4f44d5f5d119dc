"""Metrics: one dict per step with namespaced keys, written through a small sink protocol.

Sinks: `JsonlLogger` (RUN_DIR/metrics.jsonl, always), `TensorBoardLogger` (RUN_DIR/tb with
`logging.tensorboard: true`; view with `tensorboard --logdir RUN_DIR/tb`), `NullLogger` (processes
other than the main one), and `FanOut` to write to several.
"""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from opd import jsonl
from opd.errors import ConfigError


class MetricsLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends `{"step": N, ...metrics}` lines to a file, flushed per step so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 - held open for the run, closed in close()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """The same scalars as metrics.jsonl, through TensorBoard's own event writer. A resumed run
    passes `purge_after`, its checkpoint's step: later events of the earlier run are dropped, as
    `truncate_metrics` drops them from metrics.jsonl; a fresh start passes -1, and an earlier
    start's events all go."""

    def __init__(self, log_dir: Path, purge_after: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ConfigError(
                "logging.tensorboard needs the tensorboard package: pip install 'opd[tensorboard]'"
            ) from exc
        purge_step = None if purge_after is None else purge_after + 1
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class FanOut:
    def __init__(self, *sinks: MetricsLogger) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        return None

    def close(self) -> None:
        return None


@contextmanager
def timed(name: str, metrics: dict[str, float]) -> Iterator[None]:
    """Adds the wall time of the block to metrics[f"time/{name}"] (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"time/{name}"
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start


def read_metrics(path: Path) -> list[dict]:
    """Every line's metrics; a last line without its newline that does not parse (a run killed
    while writing it) is left out, a bad line elsewhere raises."""
    return [json.loads(line) for line in _complete_lines(Path(path).read_text())]


def _complete_lines(text: str) -> list[str]:
    lines = [line for line in jsonl.lines(text) if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return lines


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (used on resume, which redoes later steps)."""
    if not path.exists():
        return
    kept = [line for line in _complete_lines(path.read_text()) if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
