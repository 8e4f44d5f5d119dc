"""The `opd` command line as a user runs it: subprocesses, the embedded default, clear failures."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.config import load_config
from learner.lora import merge_checkpoint
from learner.metrics import read_metrics
from learner.trainer import OnPolicyDistillationTrainer
from opd.errors import ConfigError
from opd.templates import init_project

STEP_METRICS = {
    "kl/reverse_per_token",
    "ppo/loss",
    "ppo/clip_frac",
    "ppo/approx_kl",
    "optim/grad_norm",
    "optim/lr",
    "completion/mean_length",
    "throughput/tokens_per_s",
    "time/generate",
    "time/grade",
    "time/generate_engine",
    "time/grade_engine",
    "time/learn",
    "time/push",
    "time/step",
    "policy/lag",
    "mismatch/sampler_vs_old",
}


def opd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd.cli", *args], capture_output=True, text=True, timeout=timeout)


def opd_run(*args: str) -> subprocess.CompletedProcess:
    """`opd run` on the torch engine (tests/test_vllm.py covers the vLLM engines)."""
    return opd("run", "examples/tiny/config.yml", "--services.engine", "torch", *args)


@pytest.mark.slow
def test_run_on_the_embedded_default(tmp_path, caplog):
    run_dir = tmp_path / "run"
    result = opd_run(
        "--run_dir",
        str(run_dir),
        "--train.steps",
        "4",
        "--eval.eval_steps",
        "2",
        "--checkpoint.save_steps",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "kl/reverse_per_token" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    for line in steps:
        assert set(line) >= STEP_METRICS, STEP_METRICS - set(line)
        # the servers' engines report their share of each phase (the rest is HTTP and the replies)
        assert 0 < line["time/generate_engine"] < line["time/generate"]
        assert 0 < line["time/grade_engine"] < line["time/grade"]
    assert [line["step"] for line in lines if "eval/reverse_kl_per_token" in line] == [0, 2, 4]
    assert all("eval/reward" in line for line in lines if "eval/reverse_kl_per_token" in line)
    assert (run_dir / "config.yml").read_text().startswith("student:")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    ckpt = run_dir / "checkpoints" / "step_000004"
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    with pytest.raises(ConfigError, match="holds no LoRA adapter"):  # `opd export --merge` of a full student's
        merge_checkpoint(ckpt, tmp_path / "merged")
    assert "opd: 100%" in result.stderr  # the progress bar ran to the end
    for log in ("sampler.log", "grader.log"):
        assert "Application shutdown complete" in (run_dir / "logs" / log).read_text()
    # weight_transport auto: the torch samplers the learner starts copy the weights out of its buffer
    assert _push_origins(run_dir) == ["the learner's memfd buffer"] * 5

    # a run dir holds one run: a fresh run there is refused before it starts, the earlier run untouched
    # (in this process: `opd run` builds the same trainer, and prints an OpdError as one line)
    metrics = (run_dir / "metrics.jsonl").read_text()
    config = load_config("examples/tiny/config.yml", ["--run_dir", str(run_dir), "--train.steps", "4"])
    refused = re.escape(f"run_dir {run_dir} holds an earlier run (checkpoint step_000004)")
    with pytest.raises(ConfigError, match=refused):
        OnPolicyDistillationTrainer(config)
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    # resumed at its last step, a finished run has nothing to train: no servers start
    written = (run_dir / "config.yml").read_text()  # (what a run writes as it starts its servers)
    with caplog.at_level("WARNING"):
        assert OnPolicyDistillationTrainer(config, resume_from=ckpt).train() == []
    assert "nothing to train: the run is at step 4 and train.steps is 4" in caplog.text
    assert (run_dir / "config.yml").read_text() == written and (run_dir / "metrics.jsonl").read_text() == metrics
    # nor is another run's checkpoint continued in it (the two runs' metrics and checkpoints would mix)
    other = shutil.copytree(ckpt, run_dir.parent / "other-run" / "checkpoints" / ckpt.name)
    with pytest.raises(ConfigError, match=re.escape(f"--resume {other} is not one of run_dir {run_dir}'s")):
        OnPolicyDistillationTrainer(config, resume_from=other)
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def _push_origins(run_dir: Path) -> list[str]:
    log = (run_dir / "logs" / "sampler.log").read_text()
    return re.findall(r"loaded \d+ weight tensors from (.+), policy_version", log)


@pytest.mark.slow
def test_weights_through_an_in_memory_file(tmp_path):
    result = opd_run("--run_dir", str(tmp_path / "run"), "--train.steps", "2", "--eval.eval_steps", "0",
                     "--services.weight_transport", "memory")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    origins = _push_origins(tmp_path / "run")
    assert len(origins) == 3 and all(re.fullmatch(r"/proc/\d+/fd/\d+", where) for where in origins), origins


@pytest.mark.slow
def test_torch_samplers_copy_the_weights_out_of_the_learners_buffer(tmp_path):
    losses = {}
    for transport in ("auto", "http"):  # auto: shared, for the torch samplers the learner starts
        run_dir = tmp_path / transport
        result = opd_run("--run_dir", str(run_dir), "--train.steps", "2", "--eval.eval_steps", "0",
                         "--services.weight_transport", transport)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        losses[transport] = [
            (m["kl/reverse_per_token"], m["ppo/loss"]) for m in read_metrics(run_dir / "metrics.jsonl")
        ]
    assert _push_origins(tmp_path / "auto") == ["the learner's memfd buffer"] * 3
    assert _push_origins(tmp_path / "http") == ["the request body"] * 3
    assert losses["auto"] == losses["http"] and len(losses["auto"]) == 2  # the same weights arrived


def _teacher_with_other_tokenizer(teacher_dir, tmp_path):
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|not_in_the_student|>"])
    tokenizer.save_pretrained(other)
    return other


@pytest.mark.slow
def test_tokenizer_mismatch_fails_at_start_naming_both(tmp_path, teacher_dir):
    other = _teacher_with_other_tokenizer(teacher_dir, tmp_path)
    result = opd_run(
        "--run_dir",
        str(tmp_path / "run"),
        "--teacher.path",
        str(other),
        "--train.steps",
        "2",
    )
    assert result.returncode != 0
    assert "TokenizerMismatchError" in result.stderr
    assert "use different tokenizers" in result.stderr
    assert str(other) in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_teacher_with_fewer_vocabulary_rows_than_the_student_fails_at_start(tmp_path, teacher_dir):
    # Same tokenizer (456 tokens), but the teacher pads its vocabulary to 480 rows where the student
    # has 512: the student could sample ids 480-511, which the teacher cannot score.
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    teacher.resize_token_embeddings(480)
    teacher.save_pretrained(tmp_path / "small-vocab-teacher")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "small-vocab-teacher")
    result = opd_run("--run_dir", str(tmp_path / "run"), "--teacher.path", str(tmp_path / "small-vocab-teacher"),
                     "--train.steps", "1", "--services.engine", "torch")  # fmt: skip
    assert result.returncode != 0
    assert "has 512 vocabulary rows, more than the teacher" in result.stderr
    assert "with 480" in result.stderr


def test_bad_config_fails_before_anything_starts(tmp_path):
    result = opd("run", "examples/tiny/config.yml", "--run_dir", str(tmp_path / "run"), "--train.lrr", "1", timeout=60)
    assert result.returncode != 0
    assert "train.lrr" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["sampler", "--model", "m", "--max-logprobs", "-1"], "--max-logprobs: -1 is not within 0..1024"),
    (["grader", "--model", "m", "--max-model-len", "0"], "--max-model-len: 0 is not a positive integer"),
    (["sampler", "--model", "m", "--gpu-memory-utilization", "1.5"], "1.5 is not a share within (0, 1]"),
    (["grader", "--model", "m", "--max-batch-tokens", "-4"], "--max-batch-tokens: -4 is not a positive integer"),
    (["run", "--train.steps", "5", "c.yml"], "the config file comes first: opd run c.yml"),
])  # fmt: skip
def test_values_that_cannot_work_are_refused_by_the_command_line(argv, message, capsys):
    from opd.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("entry", "message"), [
    ("", r"run_dir .*taken is a file, not a directory"),
    ("checkpoints", r"taken/checkpoints is a file, where the run keeps its checkpoints folder"),
    ("metrics.jsonl/", r"taken/metrics.jsonl is a directory, where the run writes its metrics.jsonl"),
])  # fmt: skip
def test_a_run_dir_that_cannot_take_the_run_is_refused_at_start_naming_why(tmp_path, entry, message):
    run_dir = tmp_path / "taken"
    if not entry:
        run_dir.write_text("")
    elif entry.endswith("/"):
        (run_dir / entry).mkdir(parents=True)
    else:
        run_dir.mkdir()
        (run_dir / entry).write_text("")
    config = load_config("examples/tiny/config.yml", ["--run_dir", str(run_dir)])
    with pytest.raises(ConfigError, match=message):
        OnPolicyDistillationTrainer(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("override", "message"), [
    (["--services.device", "cuda:0"], "services.device is cuda:0, but this torch"),
    (["--services.device", "gpu"], "services.device 'gpu' is not a torch device"),
    (["--services.api_key_file", "/no/such/key"], "services.api_key_file: cannot read --api-key-file /no/such/key"),
])  # fmt: skip
def test_service_settings_that_cannot_work_are_refused_before_any_server_starts(tmp_path, override, message):
    config = load_config("examples/tiny/config.yml", ["--run_dir", str(tmp_path / "run"), *override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        OnPolicyDistillationTrainer(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_server_on_a_device_this_machine_lacks_says_so_in_one_line(capsys):
    from opd.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["grader", "--model", "tiny:teacher", "--engine", "torch", "--port", "0", "--device", "cuda:0"])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "--device is cuda:0, but this torch" in err and "Traceback" not in err


def test_missing_model_path_fails_naming_it():
    result = opd("sampler", "--model", "/no/such/model", timeout=60)
    assert result.returncode != 0
    assert "/no/such/model does not exist" in result.stderr


def test_cuda_graphs_asked_for_off_the_gpu_fail_at_start_saying_so(student_dir):
    result = opd("sampler", "--model", str(student_dir), "--engine", "torch", "--port", "0", "--no-enforce-eager",
                 timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "opd: CUDA graphs need a cuda device, not 'cpu'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_weights_through_a_shared_directory(tmp_path):
    shared = tmp_path / "shared"
    result = opd_run("--run_dir", str(tmp_path / "run"), "--train.steps", "3", "--eval.eval_steps", "0",
                     "--services.weight_transport", "path", "--services.shared_dir", str(shared))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # each version renamed into place when complete, the older ones removed as the sampler loads
    # the next, and the last one when the run ends: a shared_dir in /dev/shm is RAM
    assert list(shared.iterdir()) == []
    log = (tmp_path / "run" / "logs" / "sampler.log").read_text()
    assert all(f"weights-v00000{v}.safetensors" in log for v in range(4)), log[-2000:]


@pytest.mark.parametrize("template", ["distill-reasoning", "distill-reasoning-qwen3", "distill-chat", "tiny"])
def test_init_scaffolds_a_valid_project(tmp_path, template):
    from learner.config import load_config

    result = opd("init", str(tmp_path / "proj"), "--template", template, timeout=60)
    assert result.returncode == 0, result.stderr
    config = load_config(tmp_path / "proj" / "config.yml")
    train = (tmp_path / "proj" / "train.jsonl").read_text().splitlines()
    assert len(train) == 64 and all("prompt" in json.loads(r) or "messages" in json.loads(r) for r in train)
    assert config.data.eval_path == str(tmp_path / "proj" / "eval.jsonl")
    again = opd("init", str(tmp_path / "proj"), "--template", template, timeout=60)
    assert again.returncode == 1 and "choose an empty folder" in again.stderr
    with pytest.raises(ConfigError, match=r"proj/train\.jsonl is a file: name a folder"):
        init_project(tmp_path / "proj" / "train.jsonl", template)


@pytest.mark.slow
def test_init_tiny_then_run(tmp_path):
    assert opd("init", str(tmp_path / "proj"), "--template", "tiny", timeout=60).returncode == 0
    result = opd("run", str(tmp_path / "proj" / "config.yml"), "--train.steps", "2", "--eval.eval_steps", "2",
                 "--services.engine", "torch", "--run_dir", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/reward" in m for m in evals if "eval/reverse_kl_per_token" in m)
