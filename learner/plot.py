"""Plot reverse KL and eval reward over steps from one or more runs' metrics.jsonl.

    opd plot runs/toy/opd                         # writes runs/toy/opd/plot.png
    opd plot runs/a runs/b --out compare.png      # several runs on the same axes

Reads the keys the trainer logs: `kl/reverse_per_token` (the training batch), and at eval steps
`eval/reverse_kl_per_token` and `eval/reward`. A run without eval items still gets its KL curve.
"""

from collections.abc import Sequence
from pathlib import Path

from learner.metrics import read_metrics
from opd.errors import ConfigError

TRAIN_KL = "kl/reverse_per_token"
EVAL_KL = "eval/reverse_kl_per_token"
EVAL_REWARD = "eval/reward"


def series(rows: Sequence[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, values) of the rows that carry `key`, in step order; x is the step, or with x="wall" the
    training seconds up to that step (the sum of `time/step`, evals and start-up excluded)."""
    points = sorted((row["step"], row[key]) for row in rows if key in row)
    if x == "step":
        return [float(step) for step, _ in points], [value for _, value in points]
    seconds, clock = 0.0, {0: 0.0}
    for row in sorted((row for row in rows if "time/step" in row), key=lambda row: row["step"]):
        seconds += row["time/step"]
        clock[row["step"]] = seconds
    return [clock[step] for step, _ in points if step in clock], [value for step, value in points if step in clock]


def run_metrics(run_dir: Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl` (or of that file itself); errors say what is missing."""
    path = run_dir if run_dir.is_file() else run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"no metrics at {path}: pass a run directory (the trainer's run_dir) or a metrics.jsonl")
    try:
        rows = read_metrics(path)
    except ValueError as exc:  # a line cut off by a killed run, or not JSON at all
        raise ConfigError(f"{path} is not a metrics.jsonl (one JSON object per line): {exc}") from None
    if not any(TRAIN_KL in row or EVAL_KL in row for row in rows):
        raise ConfigError(f"{path} has no reverse-KL metrics to plot")
    return rows


def run_labels(paths: Sequence[Path]) -> list[str]:
    """A legend label per run: its folder's name, or as many of its last path parts as tell it
    from the others (runs/a/opd and runs/b/opd: a/opd and b/opd)."""
    parts = [(path if path.is_dir() else path.parent).resolve().parts for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels  # the same run named twice: the same label


def plot_runs(runs: Sequence[tuple[str, Sequence[dict]]], out: Path, title: str | None = None, x: str = "step") -> Path:
    """Two panels, reverse KL per token and eval reward, one colour per (label, rows) run, over steps
    or (x="wall") training seconds; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, (kl_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (label, rows) in enumerate(runs):
        colour = f"C{index}"
        kl_ax.plot(*series(rows, TRAIN_KL, x), color=colour, alpha=0.5, label=f"{label}: training batch")
        kl_ax.plot(*series(rows, EVAL_KL, x), "o--", color=colour, label=f"{label}: held-out")
        reward_ax.plot(*series(rows, EVAL_REWARD, x), "o-", color=colour, label=label)
    xlabel = "step" if x == "step" else "training seconds (sum of time/step)"
    kl_ax.set(xlabel=xlabel, ylabel="nats per completion token", title="reverse KL(student || teacher)")
    reward_ax.set(xlabel=xlabel, ylabel="mean reward", title="eval reward (greedy)")
    for ax in (kl_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
