"""End to end: a tiny student distilled toward a tiny teacher through real servers on loopback."""

import pytest
import torch

from learner.config import load_config
from learner.metrics import read_metrics
from learner.trainer import OnPolicyDistillationTrainer
from tests import reference

EXAMPLE = "examples/tiny/config.yml"


@pytest.mark.slow
def test_reverse_kl_on_held_out_prompts_falls_by_30_percent(tmp_path, student_dir):
    config = load_config(
        EXAMPLE,
        [
            "--run_dir",
            str(tmp_path / "run"),
            "--train.steps",
            "30",
            "--eval.eval_steps",
            "30",
            "--eval.max_items",
            "32",
            "--logging.progress",
            "false",
            "--services.engine",
            "torch",  # (the vLLM engines learn end to end in tests/test_vllm.py)
        ],
    )
    trainer = OnPolicyDistillationTrainer(config)
    history = trainer.train()

    assert len(history) == 30
    evals = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/reverse_kl_per_token" in m]
    assert [m["step"] for m in evals] == [0, 30]
    before, after = evals[0]["eval/reverse_kl_per_token"], evals[-1]["eval/reverse_kl_per_token"]
    assert after <= 0.7 * before, (before, after)
    # the student really moved, and what was saved is what was trained
    initial = reference.load(student_dir)
    saved = reference.load(tmp_path / "run" / "checkpoints" / "step_000030")
    for (name, p1), p2 in zip(saved.named_parameters(), trainer.policy.lm.parameters(), strict=True):
        assert torch.equal(p1, p2), name
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(initial.parameters(), saved.parameters(), strict=True))
    # the sampler served every step's samples from the weights pushed after the previous step
    assert all(m["policy/lag"] == 0.0 for m in history)


@pytest.mark.slow
def test_the_topk_loss_ends_lower_than_the_sampled_loss_on_the_default_run(tmp_path):
    # The default tiny run with one update per batch (ppo_steps 1, as in the toy benchmark and GKD),
    # 30 steps: at its seed 1.58 vs 3.57 nats, and lower with topk at each of seeds 0-5 (by 0.14-1.99
    # nats) while both are still learning. The default ppo_steps 2 learns twice as far: both losses
    # reach the same floor (~1 nat) by step 15, and where each ends at step 30 depends on late
    # instabilities that float rounding alone decides (equal math, rounded differently: topk 0.93 or
    # 1.35 at seed 0), so it cannot tell the losses apart.
    final = {}
    for loss in ("sampled", "topk"):
        args = ["--run_dir", str(tmp_path / loss), "--train.loss", loss, "--train.ppo_steps", "1",
                "--eval.eval_steps", "30", "--eval.max_items", "32", "--services.engine", "torch",
                "--logging.progress", "false"]  # fmt: skip
        OnPolicyDistillationTrainer(load_config(EXAMPLE, args)).train()
        evals = [m for m in read_metrics(tmp_path / loss / "metrics.jsonl") if "eval/reverse_kl_per_token" in m]
        final[loss] = evals[-1]["eval/reverse_kl_per_token"]
    assert final["topk"] < final["sampled"], final
