"""Faults with real processes: servers killed mid-run, the learner killed and resumed, a weight
push cut off mid-stream. Torch engines, tiny models, fixed seeds."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save

from learner.config import load_config
from learner.metrics import read_metrics
from learner.trainer import OnPolicyDistillationTrainer
from opd.files import directory_written_aside
from opd.launch import LocalServer, local_server, local_servers
from tests.test_servers import PROMPTS, generate

EXAMPLE = "examples/tiny/config.yml"
TORCH = ["--services.engine", "torch", "--logging.progress", "false", "--eval.eval_steps", "0"]


class KillAt:
    """A metrics sink that SIGKILLs a server right after the given step is logged."""

    def __init__(self, kills: dict[int, LocalServer]) -> None:
        self.kills = kills
        self.steps: list[int] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.steps.append(step)
        if step in self.kills:
            os.kill(self.kills[step].proc.pid, signal.SIGKILL)

    def close(self) -> None:
        return None


@pytest.mark.slow
def test_run_survives_kill_9_of_sampler_then_grader(tmp_path, student_dir, teacher_dir):
    config = load_config(EXAMPLE, ["--run_dir", str(tmp_path / "run"), "--train.steps", "8", *TORCH])
    sampler = LocalServer("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path)
    grader = LocalServer("grader", ["--model", str(teacher_dir), "--engine", "torch"], tmp_path)
    sink = KillAt({2: sampler, 5: grader})
    with local_servers([sampler, grader]) as (sampler_url, grader_url):
        services = config.services.model_copy(update={"sampler_url": sampler_url, "grader_url": grader_url})
        trainer = OnPolicyDistillationTrainer(config.model_copy(update={"services": services}), metrics=sink)
        history = trainer.train()
        assert (sampler.restarts, grader.restarts) == (1, 1)
        # the restarted sampler serves the learner's latest weights, not its initial ones
        assert httpx.get(f"{sampler_url}/v1/info").json()["policy_version"] == 8
    assert sink.steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert len(history) == 8
    assert all(m["policy/lag"] == 0.0 for m in history)


def _opd_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "opd.cli", "run", EXAMPLE, "--run_dir", str(run_dir), "--train.steps", "12",
            "--checkpoint.save_steps", "3", "--checkpoint.keep_last", "2", *TORCH, *extra]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["ppo/loss"] for m in read_metrics(run_dir / "metrics.jsonl")}


@pytest.mark.slow
def test_kill_9_of_the_learner_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = _opd_run(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    crashed = tmp_path / "crashed"
    learner = _opd_run(crashed)
    deadline = time.monotonic() + 300
    while not (crashed / "checkpoints" / "step_000003").exists():
        assert time.monotonic() < deadline and learner.poll() is None
        time.sleep(0.02)
    learner.send_signal(signal.SIGKILL)
    learner.wait()
    assert not (crashed / "checkpoints" / "step_000012").exists()  # it really died mid-run

    resumed = _opd_run(crashed, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step_000009", "step_000012"]
    final_straight = load_file(tmp_path / "straight" / "checkpoints" / "step_000012" / "model.safetensors")
    final_resumed = load_file(crashed / "checkpoints" / "step_000012" / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name
    assert _losses(crashed) == _losses(tmp_path / "straight")  # every step once, same numbers


def test_resume_without_a_checkpoint_fails_clearly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "opd.cli", "run", EXAMPLE, "--run_dir", str(tmp_path), "--resume"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert "no checkpoint under" in result.stderr


def test_weight_push_cut_off_mid_stream_keeps_the_old_weights(student_dir, tmp_path):
    with local_server("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path) as url:
        before = generate(url, prompt_ids=PROMPTS, temperature=0.0, max_tokens=8)
        from tests.test_servers import _new_student_weights

        body = save(_new_student_weights(seed=3))
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = (f"POST /v1/weights?version=7 HTTP/1.1\r\nHost: {host}\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
            sock.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.5)  # let the server notice the disconnect
        info = httpx.get(f"{url}/v1/info").json()
        after = generate(url, prompt_ids=PROMPTS, temperature=0.0, max_tokens=8)
    assert info["policy_version"] == 0
    assert after == before
    log = (tmp_path / "sampler.log").read_text()
    assert "Traceback" not in log, log[-2000:]


def test_a_port_taken_before_the_server_binds_is_retried_on_another(tmp_path, teacher_dir):
    with socket.create_server(("127.0.0.1", 0)) as squatter:  # what a vLLM engine next door did
        taken = squatter.getsockname()[1]
        server = LocalServer("grader", ["--model", str(teacher_dir), "--engine", "torch"], tmp_path, port=taken)
        with local_servers([server]) as (url,):
            assert server.port != taken
            assert httpx.get(f"{url}/health").status_code == 200
    assert "already in use" in (tmp_path / "grader.log").read_text()


def test_servers_sharing_a_gpu_start_one_after_the_other(tmp_path, student_dir, teacher_dir):
    """services.gpu_memory_utilization set: each locally started server gets the share and starts
    only once the one before is healthy (two vLLM engines profiling one GPU at once collide)."""
    from learner.services import server_args

    config = load_config("examples/tiny/config.yml", ["--services.engine", "torch",
                                                      "--services.gpu_memory_utilization", "0.3"])  # fmt: skip
    args = server_args(config.student, config)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.3"
    for one_at_a_time in (True, False):
        servers = [LocalServer("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path),
                   LocalServer("grader", ["--model", str(teacher_dir), "--engine", "torch"], tmp_path)]  # fmt: skip
        with local_servers(servers, one_at_a_time=one_at_a_time):
            sampler, grader = servers
            assert sampler.ready_at is not None and grader.started_at is not None
            assert (grader.started_at > sampler.ready_at) == one_at_a_time


def test_a_taken_port_on_the_command_line_is_one_clear_line(teacher_dir):
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = str(squatter.getsockname()[1])
        cmd = [sys.executable, "-m", "opd.cli", "grader", "--model", str(teacher_dir), "--port", port]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 98
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_directory_written_aside_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), directory_written_aside(target) as aside:
        (aside / "weights").write_text("half")
        raise RuntimeError("crashed mid-write")
    assert (target / "weights").read_text() == "old"
    with directory_written_aside(target) as aside:
        (aside / "weights").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left beside it
    assert [p.name for p in target.iterdir()] == ["weights"] and (target / "weights").read_text() == "new"


def test_a_directory_written_aside_keeps_a_concurrent_builders_copy(tmp_path):
    target = tmp_path / "model"
    with directory_written_aside(target, keep_existing=True) as aside:
        (aside / "weights").write_text("ours")
        target.mkdir()  # another process finished first, and may be loading it now
        (target / "weights").write_text("theirs")
    assert (target / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_kill_9_while_writing_aside_leaves_no_target(tmp_path):
    target = tmp_path / "model"
    script = (f"from pathlib import Path; import time; from opd.files import directory_written_aside\n"
              f"with directory_written_aside(Path({str(target)!r})) as aside:\n"
              f"    (aside / 'weights').write_text('half')\n"
              f"    print('writing', flush=True); time.sleep(60)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()
    with directory_written_aside(target) as aside:  # the next run writes it whole, beside the debris
        (aside / "weights").write_text("whole")
    assert (target / "weights").read_text() == "whole"
