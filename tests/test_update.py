"""The learner's first PPO update backpropagates through the scoring forward (`keep_graph`):
the same old logprobs and the same gradients as a separate no-grad scoring forward followed by a
fresh forward, on a real tiny model."""

import torch

from learner.loss import clipped_policy_loss
from learner.rollout import Rollouts, ScoredBatch, score
from opd.modeling import completion_logprobs, load_causal_lm

ROLLOUTS = Rollouts(
    prompt_ids=[[5, 6, 7, 8], [9, 10]],
    completion_ids=[[11, 12, 13], [14]],
    sampler_logprobs=[[-1.0, -1.0, -1.0], [-1.0]],
    policy_version=0,
)
TEACHER = [[-0.5, -2.0, -1.0], [-3.0]]
PAD_ID = 0


def gradients(model: torch.nn.Module, new_BT: torch.Tensor, batch: ScoredBatch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    num_tokens = batch.mask_BT.sum()
    loss = clipped_policy_loss(new_BT, batch.old_logprobs_BT, batch.advantages_BT, batch.mask_BT, 0.2, num_tokens)
    loss.loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_first_update_through_the_scoring_forward_equals_a_fresh_forward(student_dir):
    model = load_causal_lm(str(student_dir), "float32", "cpu").train()
    kept = score(model, ROLLOUTS, TEACHER, PAD_ID, 1.0, 0.0, 1.0, "cpu", keep_graph=True)
    plain = score(model, ROLLOUTS, TEACHER, PAD_ID, 1.0, 0.0, 1.0, "cpu")
    assert plain.graph_logprobs_BT is None and not plain.old_logprobs_BT.requires_grad
    assert kept.graph_logprobs_BT is not None and not kept.old_logprobs_BT.requires_grad
    torch.testing.assert_close(kept.old_logprobs_BT, plain.old_logprobs_BT, rtol=0, atol=1e-6)
    torch.testing.assert_close(kept.advantages_BT, plain.advantages_BT, rtol=0, atol=1e-6)

    through_score = gradients(model, kept.graph_logprobs_BT, kept)
    fresh = gradients(model, completion_logprobs(model, plain.packed, 1.0), plain)
    assert through_score.keys() == fresh.keys() == {name for name, _ in model.named_parameters()}
    for name, grad in fresh.items():
        assert grad.abs().max() > 0, name  # every parameter really gets a gradient
        torch.testing.assert_close(through_score[name], grad, rtol=1e-4, atol=1e-7)
