"""End to end on the toy task: build teacher and student by SFT, distil, and check the reward rose.

The same pipeline as `python -m examples.toy.prepare` + `opd run examples/toy/config.yml`, with the
torch engine (the vLLM engines have their own tests) and fresh models in a temp dir.
"""

import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.toy.evaluate import greedy_rewards
from examples.toy.prepare import NUM_EVAL, sft_summary
from examples.toy.task import eval_problems, to_items
from learner.config import load_config
from learner.metrics import read_metrics
from learner.trainer import OnPolicyDistillationTrainer


def paired_z(before: list[float], after: list[float]) -> float:
    """McNemar's statistic over items that flipped: (fixed - broken) / sqrt(fixed + broken).
    Under "distillation changed nothing but noise" it is roughly standard normal."""
    fixed = sum(1 for b, a in zip(before, after, strict=True) if a > b)
    broken = sum(1 for b, a in zip(before, after, strict=True) if a < b)
    return (fixed - broken) / math.sqrt(max(fixed + broken, 1))


def test_paired_z_hand_values():
    assert paired_z([0, 0, 0, 0, 1], [1, 1, 1, 1, 1]) == 2.0  # 4 fixed, 0 broken: 4 / sqrt(4)
    assert paired_z([0, 1], [1, 0]) == 0.0  # one each way: no evidence
    assert paired_z([1, 1], [1, 1]) == 0.0


@pytest.mark.slow
def test_distillation_lifts_the_students_reward_on_held_out_lists(tmp_path, toy_models):
    files = toy_models
    tokenizer = AutoTokenizer.from_pretrained(files.student)
    items = to_items(eval_problems(NUM_EVAL), tokenizer)
    assert sft_summary(files.teacher)["eval_reward"] >= 0.9  # a teacher that knows the task
    before = greedy_rewards(AutoModelForCausalLM.from_pretrained(files.student), tokenizer, items)
    assert 0.05 <= sum(before) / len(before) <= 0.5  # a student that doesn't yet, but is not hopeless

    run_dir = tmp_path / "opd"
    overrides = {"student.path": files.student, "teacher.path": files.teacher, "data.train_path": files.train_jsonl,
                 "data.eval_path": files.eval_jsonl, "run_dir": run_dir, "services.engine": "torch",
                 "logging.progress": "false"}  # fmt: skip
    config = load_config("examples/toy/config.yml", [f"--{k}={v}" for k, v in overrides.items()])
    OnPolicyDistillationTrainer(config).train()

    distilled = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"step_{config.train.steps:06d}")
    after = greedy_rewards(distilled, tokenizer, items)
    gain = (sum(after) - sum(before)) / len(items)
    assert gain >= 0.3, (sum(before) / len(items), sum(after) / len(items))
    assert paired_z(before, after) >= 5.0  # p < 1e-6 that this many lists flip one way by chance
    # the trainer's own eval (greedy through the sampler) agrees with the in-process evaluator
    evals = [row for row in read_metrics(run_dir / "metrics.jsonl") if "eval/reward" in row]
    assert evals[0]["eval/reward"] == pytest.approx(sum(before) / len(items), abs=0.02)
    assert evals[-1]["eval/reward"] == pytest.approx(sum(after) / len(items), abs=0.02)
