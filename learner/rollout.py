"""From prompts to a scored batch: sample with the student, grade with the teacher, score.

These are the first three calls of a training step (and of an eval). Shape suffixes as in
`learner/loss.py`: B = samples, T = completion tokens.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from learner.clients import GraderClient, SamplerClient
from learner.loss import advantages, completion_mask
from opd.errors import GraderError
from opd.modeling import PackedBatch, completion_logprobs, pack_left_padded
from sampler.schema import GenerateRequest


@dataclass(frozen=True)
class Rollouts:
    """One row per sample (prompts repeated n times)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    policy_version: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


@dataclass(frozen=True)
class ScoredBatch:
    packed: PackedBatch
    mask_BT: torch.Tensor
    sampler_logprobs_BT: torch.Tensor
    old_logprobs_BT: torch.Tensor
    teacher_logprobs_BT: torch.Tensor
    advantages_BT: torch.Tensor
    # old_logprobs_BT still attached to its graph (score(..., keep_graph=True)), or None
    graph_logprobs_BT: torch.Tensor | None = None


async def sample(sampler: SamplerClient, prompts: list[list[int]], request: GenerateRequest, eos_id: int) -> Rollouts:
    """Generate `request.n` completions per prompt. An empty completion (generation stopped before
    emitting a token) becomes a lone EOS so every sample has one real token to learn from."""
    reply = await sampler.generate(request.model_copy(update={"prompt_ids": prompts}))
    rows = [(r.prompt_ids, c) for r in reply.results for c in r.completions]
    return Rollouts(
        prompt_ids=[p for p, _ in rows],
        completion_ids=[c.completion_ids or [eos_id] for _, c in rows],
        sampler_logprobs=[c.logprobs or [0.0] for _, c in rows],
        policy_version=reply.policy_version,
    )


async def grade(grader: GraderClient, rollouts: Rollouts) -> list[list[float]]:
    """Teacher logprob of every completion token."""
    reply = await grader.logprobs(list(zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)))
    teacher = [r.logprobs for r in reply.results]
    if [len(t) for t in teacher] != [len(c) for c in rollouts.completion_ids]:
        raise GraderError("grader returned a different number of logprobs than completion tokens")
    return teacher


def right_padded(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def score(
    student: PreTrainedModel,
    rollouts: Rollouts,
    teacher_logprobs: list[list[float]],
    pad_id: int,
    kl_coef: float,
    discount: float,
    temperature: float,
    device: str,
    keep_graph: bool = False,
) -> ScoredBatch:
    """Old student logprobs, the completion mask and the per-token advantages.

    With `keep_graph` the forward runs with autograd and the batch keeps its graph: before the
    first optimizer step the policy is still the old one, so the first PPO update backpropagates
    through this forward instead of running the same one again.
    """
    packed = pack_left_padded(rollouts.prompt_ids, rollouts.completion_ids, pad_id, device)
    width = packed.targets_BT.shape[1]
    mask_BT = completion_mask(packed.completion_lengths_B, width)
    with torch.set_grad_enabled(keep_graph):
        graph_BT = completion_logprobs(student, packed, temperature)
    old_BT = graph_BT.detach()
    teacher_BT = right_padded(teacher_logprobs, width).to(device)
    return ScoredBatch(
        packed=packed,
        mask_BT=mask_BT,
        sampler_logprobs_BT=right_padded(rollouts.sampler_logprobs, width).to(device),
        old_logprobs_BT=old_BT,
        teacher_logprobs_BT=teacher_BT,
        advantages_BT=advantages(teacher_BT, old_BT, mask_BT, kl_coef, discount),
        graph_logprobs_BT=graph_BT if keep_graph else None,
    )
