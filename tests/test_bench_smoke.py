"""Every benchmark with a GPU mode runs end to end in its CPU smoke mode, through bench/device.sh, the
script a lent GPU runs: a benchmark that breaks here would break on the device's first (and maybe
only) run. Nothing here looks at a number; BENCHMARKS.md holds those."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_device_script_runs_every_benchmark_in_smoke_mode(tmp_path):
    env = {**os.environ, "OPD_BENCH_RESULTS": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/device.sh", "--smoke"], capture_output=True, text=True, env=env,
                            timeout=1200)  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "all benchmarks ran" in result.stdout
    services = json.loads((tmp_path / "smoke-services.json").read_text())
    assert {"raw_generate", "opd_generate", "raw_score", "opd_score", "weight_push", "learner_step"} <= set(services)
    assert services["engine_settings"]["sampler"]["enable_chunked_prefill"] == "False"  # the same on both sides
    scale = json.loads((tmp_path / "smoke-learner_scale.json").read_text())
    assert set(scale["process"]) == {"before-style", "micro-batched", "micro-batched topk"}
    assert all("error" not in row for rows in scale["process"].values() for row in rows.values())
    assert {row["loss"] for row in scale["in_process"]["rows"]} == {"sampled", "topk"}
    lm_head = json.loads((tmp_path / "smoke-lm_head.json").read_text())
    assert lm_head["opd"]["ms"] > 0 and lm_head["autograd"]["ms"] > 0
    shared = json.loads((tmp_path / "smoke-push_shared.json").read_text())["shared"]
    assert "the learner's memfd buffer" in shared["origins"] and shared["served"]["shared"] == shared["served"]["http"]
    gkd = json.loads((tmp_path / "smoke-gkd_scale.json").read_text())
    assert set(gkd["systems"]) == {"opd topk", "trl gkd"} and all(r["s_per_step"] > 0 for r in gkd["systems"].values())
    pipeline = json.loads((tmp_path / "smoke-pipeline.json").read_text())
    assert set(pipeline["runs"]) == {"0", "1"} and pipeline["runs"]["1"]["lag_max"] <= 1


def test_push_check_times_a_small_push_on_every_thread_and_on_one(tmp_path):
    out = tmp_path / "push_check.json"
    cmd = [sys.executable, "-m", "bench.push_check", "--shapes", "--small-repeats", "2", "--idle-s", "0.01",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    small = json.loads(out.read_text())["small_push"]
    for way in ("every_thread", "one_thread"):
        assert small[f"{way}_back_to_back_s"] > 0 and small[f"{way}_after_idle_s"] > 0
    assert 1_000_000 < small["bytes"] < 2_000_000  # the tiny student, float32


def test_a_run_stopped_by_its_time_limit_keeps_its_service_logs(tmp_path):
    """What `timeout` does to a benchmark on the lent GPU: SIGTERM mid-run. The run's temporary
    directory goes, its servers' logs stay where the results come back from."""
    script = f"""
import sys, tempfile, time
from pathlib import Path
from bench.common import exit_on_sigterm, logs_kept_on_failure
exit_on_sigterm()
with tempfile.TemporaryDirectory() as run_dir, logs_kept_on_failure(run_dir, Path({str(tmp_path / "kept")!r})):
    (Path(run_dir) / "logs").mkdir()
    (Path(run_dir) / "logs" / "grader.log").write_text("Traceback: the grader's last words")
    print(run_dir, flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = proc.stdout.readline().strip()
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + 15, err
    assert (tmp_path / "kept" / "logs" / "grader.log").read_text() == "Traceback: the grader's last words"
    assert not os.path.exists(run_dir) and "service logs are in" in err
