"""The top-k teacher loss (`train.loss: topk`): the reverse KL over a head of tokens, exactly, plus
the rest of the vocabulary estimated from the sampled token. Unbiased for the full-vocabulary
reverse KL gradient.

At one completion position, with p the student and q the teacher over the whole vocabulary V:

    KL(p || q) = sum_v p_v (log p_v - log q_v)
    grad KL    = sum_v grad(p_v) (log p_v - log q_v) + sum_v p_v grad(log p_v)

and the last sum is grad(sum_v p_v) = grad(1) = 0. Split V into a head H, fixed by the position's
prefix (never by the token sampled there), and the tail V \\ H:

    grad KL = sum_{v in H} grad(p_v) (log p_v - log q_v)                       (1) exact
            + sum_{v not in H} p_v grad(log p_v) (log p_v - log q_v)           (2) an expectation

(1) needs the student's and the teacher's logprobs at the head's ids: the learner has the
student's whole softmax (gradients flow through every logit), the grader returns the teacher's.
(2) is E_{y ~ p}[1{y not in H} grad(log p_y) (log p_y - log q_y)]; one draw is the seed method's
term for the sampled token y when y lies outside the head, and nothing when it lies inside. So

    g = (1) + 1{y not in H} (log p_y - log q_y) grad(log p_y),    E_y[g] = grad KL,

for any head that does not depend on y. With H = V the second term never fires and g is the exact
gradient; the more of p's mass the head holds, the smaller the variance.

Two traps this avoids (both seen in peers' top-k distillation): renormalising the head to a
distribution and dropping the tail (the tail's mass is then never moved: biased), and putting the
sampled token itself into the head (then 1{y not in H} is always 0 and the tail never counts).

The head here is the teacher's top-k at the position (the grader's `top_k`), and with
`train.top_k_head: both` also the student's top-k there (the sampler reports it with the sample,
under the distribution sampled, so it costs no extra forward; the grader scores those ids as
`candidate_ids`). Both depend on the prefix alone. Duplicates are masked so each id counts once.

With `ppo_steps` > 1, (1) is recomputed at the current policy in every update (it is exact and
needs no trust region) and the tail term is PPO's clipped surrogate with advantage
log q_y - log p_old(y), whose gradient at ratio 1 is the term above. As for the seed method, the
estimate is unbiased when the sampler draws from the distribution the learner scores
(sampling.temperature equal to train.logprob_temperature, top_p 1).

Samples from older weights (max_staleness >= 1) come from a behaviour policy mu, not p. Only (2)
is an expectation over y, so only the tail term takes the importance weight p_y / mu_y (truncated
at is_cap, through its advantage). (1) is exact whatever was sampled: weighting it by y's ratio
would only add noise, and with the truncation shrink it.

Shape suffixes as in `learner/loss.py`; K = head entries per position (the teacher's k, plus the
student's k with a "both" head).
"""

from dataclasses import dataclass

import torch

from grader.tensors import ScoredBatch
from learner.loss import PolicyLoss, clipped_policy_loss, head_reverse_kl
from opd.modeling import right_padded


@dataclass(frozen=True)
class Head:
    """Each completion position's head: ids, the teacher's logprobs there, and which entries count."""

    ids_BTK: torch.Tensor
    teacher_logprobs_BTK: torch.Tensor
    mask_BTK: torch.Tensor
    """1 on the first occurrence of each id at a position, 0 on repeats and padding."""


def head_columns(
    teacher: ScoredBatch, student_top_ids: list[list[list[int]]] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each position's head as flat [N, K] ids and teacher logprobs: the teacher's top-k, then,
    with the student's top ids of the same samples (their teacher logprobs asked as candidate ids),
    those; None when the teacher's scores carry no top-k (the sampled loss)."""
    if teacher.top_ids_NK is None or teacher.top_logprobs_NK is None:
        return None
    if student_top_ids is None or teacher.candidate_logprobs_NC is None:
        return teacher.top_ids_NK, teacher.top_logprobs_NK
    student_NK = torch.tensor([ids for rows in student_top_ids for ids in rows], dtype=torch.long)
    return (torch.cat([teacher.top_ids_NK, student_NK], dim=1),
            torch.cat([teacher.top_logprobs_NK, teacher.candidate_logprobs_NC], dim=1))  # fmt: skip


def head_tensors(
    ids_NK: torch.Tensor, teacher_logprobs_NK: torch.Tensor, lengths_B: torch.Tensor, width: int,
    device: torch.device | str,
) -> Head:  # fmt: skip
    """Right-padded [B, T, K] head tensors from flat per-position ones (sample 0's positions, then
    sample 1's, ...: `lengths_B` cuts them)."""
    ids_BTK = right_padded(ids_NK, lengths_B, width)
    present_BT1 = (torch.arange(width)[None, :] < lengths_B[:, None])[..., None]
    mask_BTK = (present_BT1 & first_occurrence(ids_BTK)).float()
    return Head(ids_BTK.to(device), right_padded(teacher_logprobs_NK, lengths_B, width).to(device), mask_BTK.to(device))


def first_occurrence(ids_BTK: torch.Tensor) -> torch.Tensor:
    """True where an id appears for the first time among its position's K entries."""
    same_BTKK = ids_BTK[..., :, None] == ids_BTK[..., None, :]
    earlier_KK = torch.ones(ids_BTK.shape[-1], ids_BTK.shape[-1], dtype=torch.bool, device=ids_BTK.device).tril(-1)
    return ~(same_BTKK & earlier_KK).any(-1)


def sampled_in_head(targets_BT: torch.Tensor, head: Head) -> torch.Tensor:
    """1.0 where the sampled token is one of its position's head ids (its term is then exact)."""
    return ((head.ids_BTK == targets_BT[..., None]) & head.mask_BTK.bool()).any(-1).float()


def topk_policy_loss(
    new_logprobs_BT: torch.Tensor,
    new_head_logprobs_BTK: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    in_head_BT: torch.Tensor,
    head: Head,
    mask_BT: torch.Tensor,
    *,
    clip_eps: float,
    kl_coef: float,
    num_tokens: torch.Tensor,
) -> PolicyLoss:
    """kl_coef x the exact head reverse KL, plus the clipped surrogate of sampled tokens outside the
    head (`advantages_BT` = kl_coef (teacher - old), as for the sampled loss, times the importance
    weights of off-policy samples); both / num_tokens.
    Ratio diagnostics (clip_frac, approx_kl) cover every sampled token."""
    head_kl = head_reverse_kl(new_head_logprobs_BTK, head.teacher_logprobs_BTK, head.mask_BTK, mask_BT, num_tokens)
    tail = clipped_policy_loss(new_logprobs_BT, old_logprobs_BT, advantages_BT * (1.0 - in_head_BT), mask_BT,
                               clip_eps, num_tokens)  # fmt: skip
    return PolicyLoss(loss=kl_coef * head_kl + tail.loss, clip_frac=tail.clip_frac, approx_kl=tail.approx_kl)
