"""The math of on-policy distillation: pure functions of tensors, no I/O, no hidden constants.

Shape suffixes on names: B = samples in the batch, T = completion tokens (right-padded),
K = head tokens per position (top-k loss).
Logprob tensors are named by their source:
  sampler_logprobs_BT  logprob of each sampled token under the sampler's sampling distribution
  old_logprobs_BT      the learner's student before this step's update (no grad)
  new_logprobs_BT      the student being updated (with grad)
  teacher_logprobs_BT  the teacher, from the grader

The per-token advantage is the negative reverse-KL estimate on the student's own sample,
`kl_coef * (teacher - old)`, so raising the student's probability of tokens the teacher likes
more than the student does lowers KL(student || teacher). PPO's clipped surrogate then bounds how
far `ppo_steps` updates move the policy from `old`.
"""

from dataclasses import dataclass

import torch


def completion_mask(completion_lengths_B: torch.Tensor, max_len: int) -> torch.Tensor:
    """1.0 on the real completion tokens of each right-padded row, 0.0 on padding.

    Every row keeps at least one token: a sample whose generation stopped at once still
    contributes its first completion position (the learner turns an empty completion into a
    lone EOS token, so that position holds a real token), and no row silently drops out of
    the loss.
    """
    lengths_B = completion_lengths_B.clamp(min=1)
    positions_T = torch.arange(max_len, device=completion_lengths_B.device)
    return (positions_T[None, :] < lengths_B[:, None]).float()


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is 1 (token-level, across the whole batch)."""
    return (values_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)


def advantages(
    teacher_logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float,
    discount: float,
) -> torch.Tensor:
    """Per-token advantages `kl_coef * (teacher - old)`, optionally discounted.

    With `discount > 0` each token's advantage becomes the discounted sum of its own and all later
    per-token advantages of the same completion: A_t = sum_{k>=t} discount^(k-t) a_k. Padding
    contributes nothing and gets advantage 0.
    """
    per_token_BT = kl_coef * (teacher_logprobs_BT - old_logprobs_BT) * mask_BT
    if discount == 0.0:
        return per_token_BT
    discounted_BT = torch.zeros_like(per_token_BT)
    running_B = torch.zeros_like(per_token_BT[:, 0])
    for t in reversed(range(per_token_BT.shape[1])):
        running_B = per_token_BT[:, t] + discount * running_B
        discounted_BT[:, t] = running_B
    return discounted_BT * mask_BT


@dataclass(frozen=True)
class PolicyLoss:
    """The clipped surrogate loss of one PPO step and its diagnostics (scalars)."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(
    new_logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float,
    num_tokens: torch.Tensor | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate: -sum_masked(min(r * A, clip(r, 1-eps, 1+eps) * A)) / num_tokens.

    num_tokens defaults to this batch's masked tokens (a token-level mean). Data-parallel
    learners pass the global token count divided by the number of processes, so that gradients
    averaged across processes equal those of one process holding the whole batch.
    clip_frac is the share of tokens whose ratio lies outside [1-eps, 1+eps]; approx_kl is the
    k3 estimator of KL(old || new), mean_masked((r - 1) - log r), which is >= 0 per token.
    """
    log_ratio_BT = new_logprobs_BT - old_logprobs_BT
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = torch.clamp(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps) * advantages_BT
    surrogate_BT = torch.minimum(unclipped_BT, clipped_BT) * mask_BT
    normalizer = mask_BT.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    loss = -surrogate_BT.sum() / normalizer
    with torch.no_grad():
        outside_BT = ((ratio_BT - 1.0).abs() > clip_eps).float()
        clip_frac = masked_mean(outside_BT, mask_BT)
        approx_kl = masked_mean((ratio_BT - 1.0) - log_ratio_BT, mask_BT)
    return PolicyLoss(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl)


def truncated_importance_weights(
    proximal_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoupled PPO objective's per-token weight (AReaL): samples drawn by a stale behaviour
    policy (the sampler, some versions back) are reweighted toward the proximal policy (the learner
    at the start of this update) by r = p_proximal / p_behaviour, truncated at `cap` to bound the
    variance. Both logprobs must be of the sampling distribution (same temperature).

    Returns (ratios_BT, weights_BT): r untruncated (for metrics) and min(r, cap), 0 on padding."""
    ratios_BT = torch.exp(proximal_logprobs_BT - sampler_logprobs_BT) * mask_BT
    return ratios_BT, ratios_BT.clamp(max=cap)


def head_reverse_kl(
    new_head_logprobs_BTK: torch.Tensor,
    teacher_head_logprobs_BTK: torch.Tensor,
    head_mask_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: torch.Tensor,
) -> torch.Tensor:
    """The exact head of the top-k reverse KL: sum over the tokens v of each position's head of
    p_v * stopgrad(log p_v - log q_v), divided by `num_tokens`.

    Its gradient is sum_v grad(p_v) * (log p_v - log q_v), the head's share of the full reverse
    KL's gradient (the sum_v p_v grad(log p_v) term of the product rule sums to grad(1) = 0 over the
    vocabulary, so it is left out of every share). Heads are padded to K; `head_mask_BTK` is 1 on
    real, distinct entries. The tail (tokens outside the head) is the sampled token's job: see
    `learner/topk.py` for the estimator and why the two together are unbiased.
    """
    gap_BTK = (new_head_logprobs_BTK - teacher_head_logprobs_BTK).detach()
    terms_BTK = new_head_logprobs_BTK.exp() * gap_BTK * head_mask_BTK
    return (terms_BTK.sum(-1) * mask_BT).sum() / num_tokens


def reverse_kl_per_token(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Monte-Carlo reverse KL(student || teacher) per token on the student's own samples.

    Divided by `num_tokens` when given (a data-parallel shard passes the global count, and the
    shards' results then sum to the global mean), else by this batch's masked tokens.
    """
    return _masked_sum(student_logprobs_BT - teacher_logprobs_BT, mask_BT, num_tokens)


def sampler_mismatch(
    sampler_logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean absolute gap between the sampler's logprobs and the learner's old logprobs.

    Nonzero when the sampler samples at temperature != 1 or top_p < 1 (it reports logprobs of
    the distribution it sampled from), or when its numerics drift from the learner's.
    `num_tokens` as in `reverse_kl_per_token`.
    """
    return _masked_sum((sampler_logprobs_BT - old_logprobs_BT).abs(), mask_BT, num_tokens)


def _masked_sum(values_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: torch.Tensor | None) -> torch.Tensor:
    if num_tokens is None:
        return masked_mean(values_BT, mask_BT)
    return (values_BT * mask_BT).sum() / num_tokens
