"""`opd plot`: reverse KL and eval reward from any run's metrics.jsonl, as a PNG."""

import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from learner.metrics import read_metrics, truncate_metrics
from learner.plot import run_labels, series
from opd.cli import main

BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1: run 1 and run 2


def write_run(run_dir, kl_start: float) -> None:
    rows = [{"step": 0, "eval/reverse_kl_per_token": kl_start, "eval/reward": 0.1}]
    rows += [{"step": s, "kl/reverse_per_token": kl_start / s} for s in range(1, 11)]
    rows[-1] |= {"eval/reverse_kl_per_token": kl_start / 10, "eval/reward": 0.8}
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def opd_plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd.cli", "plot", *args], capture_output=True, text=True, timeout=120)


def has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    pixels = (image[..., :3] * 255).round().astype(int)
    return bool((np.abs(pixels - np.array(rgb)).sum(-1) <= 6).any())


def test_runs_of_the_same_folder_name_get_labels_that_tell_them_apart(tmp_path):
    for run in ("a/opd", "b/opd", "c/gkd"):
        (tmp_path / run).mkdir(parents=True)
    (tmp_path / "c" / "gkd" / "metrics.jsonl").write_text("")
    assert run_labels([tmp_path / "a/opd", tmp_path / "b/opd"]) == ["a/opd", "b/opd"]
    assert run_labels([tmp_path / "a/opd", tmp_path / "c/gkd/metrics.jsonl"]) == ["opd", "gkd"]


def test_series_takes_rows_with_the_key_in_step_order():
    rows = [{"step": 2, "a": 0.5}, {"step": 0, "a": 1.0}, {"step": 1, "b": 3.0}]
    assert series(rows, "a") == ([0, 2], [1.0, 0.5])
    assert series(rows, "missing") == ([], [])


def test_plot_of_one_run_lands_in_its_run_dir(tmp_path):
    write_run(tmp_path / "run", kl_start=3.0)
    result = opd_plot(str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    image = imread(tmp_path / "run" / "plot.png")
    assert image.shape[:2] == (480, 1320)  # 11 x 4 inches at 120 dpi
    assert has_colour(image, BLUE) and not has_colour(image, ORANGE)


def test_two_runs_on_the_same_axes(tmp_path):
    write_run(tmp_path / "a", kl_start=3.0)
    write_run(tmp_path / "b", kl_start=2.0)
    out = tmp_path / "both.png"
    result = opd_plot(str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    image = imread(out)
    assert has_colour(image, BLUE) and has_colour(image, ORANGE)


def test_nothing_to_plot_is_a_clear_error(tmp_path, capsys):
    missing = opd_plot(str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "no metrics at" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": 0.1}) + "\n")
    empty = opd_plot(str(tmp_path / "empty"))
    assert empty.returncode == 1
    assert "no reverse-KL metrics" in empty.stderr
    garbage = tmp_path / "garbage.jsonl"  # (in this process: main() is what `opd plot` runs)
    garbage.write_text("not json\n" + json.dumps({"step": 1, "kl/reverse_per_token": 1.0}) + "\n")
    with pytest.raises(SystemExit) as bad:
        main(["plot", str(garbage), "--out", str(tmp_path / "g.png")])
    assert bad.value.code == 1 and "is not a metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as wrong:
        main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "plot.txt")])
    assert wrong.value.code == 2 and "name a .png file" in capsys.readouterr().err


def test_a_line_cut_off_by_a_killed_run_is_left_out_when_read_and_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "ppo/loss": 0.5}) + "\n" + json.dumps({"step": 2, "ppo/loss": 0.4}) + "\n"
                    + '{"step": 3, "ppo/lo')  # fmt: skip
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    truncate_metrics(path, 1)
    assert read_metrics(path) == [{"step": 1, "ppo/loss": 0.5}] and path.read_text().endswith("\n")
