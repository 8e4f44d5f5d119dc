"""The Python API: kwargs instead of a config file, datasets as rows or items, custom rewards, the
memory of a finished run given back."""

import gc
import subprocess
import sys
import weakref
from dataclasses import dataclass

import pytest

from learner import OnPolicyDistillationTrainer
from learner.metrics import read_metrics
from opd.errors import ConfigError


@dataclass(frozen=True)
class AlwaysHalf:
    prompt_ids: list[int]
    answer: str | None = "anything"

    def get_reward(self, completion: str) -> float:
        return 0.5


def test_kwargs_build_the_config_and_name_bad_keys(tmp_path):
    trainer = OnPolicyDistillationTrainer(
        student="tiny:student", teacher="tiny:teacher", train_dataset=[{"prompt": "hi"}],
        run_dir=str(tmp_path), train={"lr": 3e-4, "steps": 2}, sampling={"n": 2},
    )  # fmt: skip
    assert (trainer.config.train.lr, trainer.config.train.steps, trainer.config.sampling.n) == (3e-4, 2, 2)
    assert trainer.config.train.clip_eps == 0.2  # untouched defaults stay
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        OnPolicyDistillationTrainer(student="tiny:student", teacher="tiny:teacher", train_dataset=[{"prompt": "x"}],
                                    train={"lrr": 1})  # fmt: skip
    with pytest.raises(ConfigError, match="no training prompts"):
        OnPolicyDistillationTrainer(student="tiny:student", teacher="tiny:teacher")
    with pytest.raises(ConfigError, match=r"train: Input should be a valid dictionary"):
        OnPolicyDistillationTrainer(student="tiny:student", teacher="tiny:teacher", train_dataset=[{"prompt": "x"}],
                                    train=5, use_accelerate=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"dataset\[1\]"):
        OnPolicyDistillationTrainer(student="tiny:student", teacher="tiny:teacher",
                                    train_dataset=[{"prompt": "ok"}, {"text": "no prompt key"}])  # fmt: skip


def test_a_fresh_start_drops_the_metrics_of_a_start_that_died_before_its_first_checkpoint(tmp_path):
    """`--resume auto` with no checkpoint starts afresh and redoes those steps; their old lines
    would otherwise stay in metrics.jsonl beside the new ones (steps 1 2 3 1 2 ...)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/reward": 0.1}\n{"step": 1, "ppo/loss": 1.0}\n')
    OnPolicyDistillationTrainer(student="tiny:student", teacher="tiny:teacher", train_dataset=[{"prompt": "hi"}],
                                run_dir=str(tmp_path))  # fmt: skip
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_the_start_check_counts_the_eval_prompts_an_eval_uses(tmp_path):
    long_eval = "".join(chr(ord("a") + i % 26) for i in range(300))
    trainer = OnPolicyDistillationTrainer(
        student="tiny:student", teacher="tiny:teacher", train_dataset=[{"prompt": "hi"}], run_dir=str(tmp_path),
        eval_dataset=[{"prompt": "hello"}, {"prompt": long_eval}], sampling={"max_tokens": 8},
        eval={"max_tokens": 4, "eval_steps": 10},
    )  # fmt: skip
    short, long = (len(item.prompt_ids) for item in trainer.eval_items)
    assert trainer._longest_sequence() == (long, 4)
    trainer.config.eval.max_items = 1  # only "hello" is ever evaluated: the long prompt must not fail the run
    assert trainer._longest_sequence() == max((len(trainer.train_items[0].prompt_ids), 8), (short, 4), key=sum)
    trainer.config.eval.max_tokens = 1000
    trainer.config.eval.eval_steps = 0  # no eval runs: its max_tokens must not fail the run either
    assert trainer._longest_sequence() == (len(trainer.train_items[0].prompt_ids), 8)


@pytest.mark.slow
def test_rewards_only_where_items_have_answers(tmp_path):
    common = dict(student="tiny:student", teacher="tiny:teacher", train_dataset="examples/tiny/train.jsonl",
                  train={"steps": 1}, eval={"eval_steps": 1, "max_tokens": 8}, sampling={"max_tokens": 8},
                  services={"engine": "torch"}, logging={"progress": False})  # fmt: skip
    no_answers = OnPolicyDistillationTrainer(run_dir=str(tmp_path / "a"), eval_dataset=[{"prompt": "hi"}], **common)
    gc.disable()  # only reference counting frees it then: a cycle would hold the model until a later collection
    try:
        no_answers.train()
        student = weakref.ref(no_answers.policy)
        del no_answers
        assert student() is None  # a script that trains twice (a benchmark, a sweep) gets the memory back
    finally:
        gc.enable()
    evals = [m for m in read_metrics(tmp_path / "a" / "metrics.jsonl") if "eval/reverse_kl_per_token" in m]
    assert len(evals) == 2 and not any("eval/reward" in m for m in evals)

    trainer = OnPolicyDistillationTrainer(run_dir=str(tmp_path / "b"), eval_dataset=[{"prompt": "hi"}], **common)
    trainer.eval_items = [*trainer.eval_items, AlwaysHalf(trainer.train_items[0].prompt_ids)]
    trainer.train()
    rewards = [m["eval/reward"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl") if "eval/reward" in m]
    assert rewards == [0.5, 0.5]  # the mean over the one item with an answer, via its own get_reward


@pytest.mark.slow
def test_example_script_runs_on_the_embedded_default(tmp_path):
    result = subprocess.run([sys.executable, "examples/onpolicy_distillation_example.py", "--steps", "4",
                             "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps: 4" in result.stdout
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in lines if "eval/reward" in m] == [0, 2, 4]
