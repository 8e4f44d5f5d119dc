"""From prompts to graded samples: sample with the student, grade with the teacher.

These are the first two calls of a training step (and of an eval); `learner/update.py` scores and
learns from what they return.
"""

from dataclasses import dataclass

from learner.clients import GraderClient, SamplerClient
from opd.errors import GraderError
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
