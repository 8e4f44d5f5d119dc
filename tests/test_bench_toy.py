"""The toy benchmark runs end to end (a few steps): opd and TRL GKD, results, per-step metrics, plot.

It needs the `bench` extra (TRL), which `.ci/run` installs; the numbers themselves belong to
BENCHMARKS.md, so nothing here looks at a timing.
"""

import json
import subprocess
import sys

import pytest


def test_trl_runs_in_float32_with_a_kv_cache_like_opd(tmp_path):
    from bench.toy_trl import gkd_config

    args = {"batch_size": 8, "steps": 2, "lr": 1e-4, "max_new_tokens": 10, "seed": 0}
    config = gkd_config(str(tmp_path), **args, device="cpu")
    assert config.use_cpu and not gkd_config(str(tmp_path), **args, device="cuda").use_cpu
    assert (config.bf16, config.fp16, config.gradient_checkpointing) == (False, False, False)
    assert (config.lmbda, config.beta, config.temperature) == (1.0, 1.0, 1.0)
    assert config.lr_scheduler_type == "constant" and config.max_grad_norm == 1.0
    assert config.train_sampling_strategy == "sequential"


@pytest.mark.slow
def test_benchmark_runs_both_systems_and_writes_results(tmp_path, toy_models):
    out = tmp_path / "bench"
    models = str(toy_models.teacher.parent)
    cmd = [sys.executable, "-m", "bench.toy_distill", "--steps", "4", "--batch-size", "16", "--eval-steps", "2",
           "--ppo-steps", "1", "--engine", "torch", "--models", models, "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["rewards"]) == {"teacher", "student before", "opd ppo_steps=1 after",
                                       "opd topk ppo_steps=1 after", "trl gkd after"}  # fmt: skip
    assert results["rewards"]["teacher"] >= 0.9
    for run in ("opd-ppo1", "opd-topk-ppo1", "trl"):
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "time/step" in r] == [1, 2, 3, 4]
        assert [r["step"] for r in rows if "eval/reward" in r] == [0, 2, 4]
        assert all(r["kl/reverse_per_token"] > 0 for r in rows if "time/step" in r)
    # both runs start from the same student: their step-0 evals see the same model
    evals = {run: json.loads((out / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("opd-ppo1", "trl")}
    assert evals["opd-ppo1"]["eval/reward"] == pytest.approx(evals["trl"]["eval/reward"], abs=0.02)
    assert (out / "toy_distill.png").stat().st_size > 10_000
    assert "| trl gkd |" in result.stdout
    assert result.stdout.count("step  train KL  eval KL  reward") == 3  # each run, step by step
    assert (out / "toy_distill_wall.png").stat().st_size > 10_000  # the same over training seconds


@pytest.mark.slow
def test_profile_times_and_counts_every_phase_of_both_systems(tmp_path, toy_models):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "bench.toy_profile", "--repeats", "1", "--batch-size", "16",
           "--models", str(toy_models.teacher.parent), "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    phases = json.loads(out.read_text())["phases"]
    assert len(phases) == 5 and any(name.startswith("GKD learn") for name in phases)
    for phase in phases.values():
        assert phase["median_ms"] > 0 and phase["aten_ops"] > 0 and phase["top_host_ops_ms"]


@pytest.mark.slow
def test_http_overhead_times_each_request_against_its_engine_and_both_parsers(tmp_path, toy_models):
    out = tmp_path / "http.json"
    cmd = [sys.executable, "-m", "bench.http_overhead", "--requests", "1", "--idle-s", "0.01", "--batch-size", "16",
           "--real-tokens", "64", "--models", str(toy_models.teacher.parent), "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["requests"]) == {f"{kind} {when}" for kind in ("generate", "generate as json", "grade")
                                        for when in ("back_to_back", "after_idle")}  # fmt: skip
    for row in results["requests"].values():
        assert 0 < row["engine_ms"] < row["wall_ms"]
    for row in results["parse"].values():
        assert row["json module + validate ms"] > 0 and row["pydantic one pass ms"] > 0
    assert len(results["reply"]) == 2
    for row in results["reply"].values():  # both formats written and read; the tensors are the smaller body
        assert all(row[f"{way} {what} ms"] > 0 for way in ("json", "safetensors") for what in ("write", "read"))
        assert row["safetensors mb"] < row["json mb"]
