"""Data-parallel learning: 2 processes x batch 2 take the same steps as 1 process x batch 4, in
the strictly on-policy loop and in the pipelined one (max_staleness 1).

The 2-process run is launched with torchrun on CPU (gloo), the way `accelerate launch` runs it on
GPUs; both runs use the same real servers, one after the other (each run pushes its initial
weights first, so the sampler starts from the same policy).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.metrics import read_metrics
from opd.launch import LocalServer, local_servers

ARGS = ["--train.steps", "3", "--train.lr", "1e-3", "--train.ppo_steps", "2", "--eval.eval_steps", "0",
        "--logging.progress", "false", "--sampling.n", "2"]  # fmt: skip


def run(command: list[str], run_dir: Path, urls: tuple[str, str], *extra: str) -> None:
    services = ["--services.sampler_url", urls[0], "--services.grader_url", urls[1]]
    args = [*command, "run", "examples/tiny/config.yml", "--run_dir", str(run_dir), *ARGS, *services, *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_two_processes_of_batch_2_equal_one_process_of_batch_4(tmp_path, student_dir, teacher_dir, staleness):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    servers = [LocalServer("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path),
               LocalServer("grader", ["--model", str(teacher_dir), "--engine", "torch"], tmp_path)]  # fmt: skip
    pipeline = ("--train.max_staleness", str(staleness))
    with local_servers(servers) as urls:
        run([sys.executable, "-m", "opd.cli"], tmp_path / "one", tuple(urls), "--train.batch_size", "4", *pipeline)
        run([torchrun, "--nproc_per_node", "2", "-m", "opd.cli"], tmp_path / "two", tuple(urls),
            "--train.batch_size", "2", "--train.use_accelerate", "true", *pipeline)  # fmt: skip
    one_metrics, two_metrics = (read_metrics(tmp_path / run_dir / "metrics.jsonl") for run_dir in ("one", "two"))
    # Pipelined, each step's batch comes from the weights before the last push (the first from the
    # initial ones) in both runs: each process asks for its next batch as its update starts, and
    # the main process pushes only after every process's update.
    lags = [0.0] + [float(staleness)] * (len(one_metrics) - 1)
    assert [m["policy/lag"] for m in one_metrics] == [m["policy/lag"] for m in two_metrics] == lags

    one = load_file(tmp_path / "one" / "checkpoints" / "step_000003" / "model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / "step_000003" / "model.safetensors")
    initial = load_file(student_dir / "model.safetensors")
    for name, tensor in one.items():
        moved = (tensor - initial[name]).abs().max()
        assert moved > 1e-4, name  # the runs really trained
        # same update up to float reordering (gloo all-reduce, different padding)
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-5 * max(1.0, moved.item()))
    kl_one = [m["kl/reverse_per_token"] for m in one_metrics]
    kl_two = [m["kl/reverse_per_token"] for m in two_metrics]
    assert kl_two == pytest.approx(kl_one, rel=1e-4)  # metrics averaged over processes
    assert not (tmp_path / "two" / "checkpoints" / "step_000003.rank1").exists()


PROCESS_GROUP_AFTER_FINISH = """
import os, sys, torch, torch.distributed as dist
from pathlib import Path
from learner.distributed import Processes
def threads(): return len(os.listdir("/proc/self/task"))
torch.ones(4).sum()  # any thread pool of torch's own exists before counting
before = threads()
processes = Processes(use_accelerate=True, device="cpu")
model = torch.nn.Linear(8, 8)
model, optimizer = processes.prepare(model, torch.optim.AdamW(model.parameters()))
processes.backward(model(torch.ones(2, 8)).sum())
optimizer.step()
total = processes.sum(torch.tensor([1.0]))
model = processes.release(model)
processes.finish()
# a file per process: the two processes' prints to one pipe can interleave
Path(sys.argv[1], f"rank{processes.rank}").write_text(
    f"sum {total.item():.0f}, alive {dist.is_initialized()}, {type(model).__name__}, gloo threads {threads() - before}")
"""


@pytest.mark.slow
def test_finish_ends_the_process_group_and_its_threads_on_every_process(tmp_path):
    # Gloo's worker threads left running into interpreter exit now and then abort a finished run
    # with SIGABRT (learner/distributed.py, finish); a DDP wrapper still alive keeps them running.
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    script = tmp_path / "finish.py"
    script.write_text(PROCESS_GROUP_AFTER_FINISH)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default: no OpenMP worker counted as gloo's
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "sum 2, alive False, Linear, gloo threads 0"
