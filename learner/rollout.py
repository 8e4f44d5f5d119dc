"""From prompts to graded samples: sample with the student, grade with the teacher.

These are the first two calls of a training step (and of an eval); `learner/producer.py` runs
them ahead of the learner, `learner/update.py` scores and learns from what they return.
"""

from dataclasses import dataclass

import torch

from grader.schema import Sequence
from grader.tensors import token_index
from learner.clients import GraderPool, SamplerPool
from opd.errors import GraderError, StaleSamplerError
from sampler.schema import GenerateRequest, GenerateResponse


@dataclass(frozen=True)
class Rollouts:
    """One row per sample (prompts repeated n times)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    versions: list[int]
    """The policy_version of the weights that generated each sample (its sampler's)."""
    student_top_ids: list[list[list[int]]] | None = None
    """With the sampler's `top_logprobs` (top-k loss): per sample and position, the student's top ids."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        tops = [p.student_top_ids for p in parts]
        return Rollouts(
            prompt_ids=[row for p in parts for row in p.prompt_ids],
            completion_ids=[row for p in parts for row in p.completion_ids],
            sampler_logprobs=[row for p in parts for row in p.sampler_logprobs],
            versions=[v for p in parts for v in p.versions],
            student_top_ids=None if any(t is None for t in tops) else [row for t in tops for row in t or []],
        )


async def generate(sampler: SamplerPool, request: GenerateRequest, min_version: int) -> GenerateResponse:
    """The sampler's reply, refused (StaleSamplerError) when older weights than `min_version`
    generated it: a restarted sampler serves its initial weights as version 0."""
    reply = await sampler.generate(request)
    if reply.policy_version < min_version:
        raise StaleSamplerError(f"sampler served policy_version {reply.policy_version}, expected {min_version}")
    return reply


async def sample(
    sampler: SamplerPool, prompts: list[list[int]], request: GenerateRequest, *, eos_id: int, min_version: int
) -> Rollouts:
    """Generate `request.n` completions per prompt with weights of at least `min_version`. An empty
    completion (generation stopped before emitting a token) becomes a lone EOS so every sample has
    one real token to learn from."""
    reply = await generate(sampler, request.model_copy(update={"prompt_ids": prompts}), min_version)
    rows = [(r.prompt_ids, c) for r in reply.results for c in r.completions]
    k = request.top_logprobs
    return Rollouts(
        prompt_ids=[p for p, _ in rows],
        completion_ids=[c.completion_ids or [eos_id] for _, c in rows],
        sampler_logprobs=[c.logprobs or [0.0] for _, c in rows],
        versions=[reply.policy_version] * len(rows),
        student_top_ids=[c.top_ids or [[eos_id] * k] for _, c in rows] if k else None,
    )


@dataclass(frozen=True)
class Graded:
    """The teacher's view of each sample, flat over the completion tokens (sample 0's, then sample
    1's, ...): the logprob of every completion token and, for the top-k loss, each position's head
    (the teacher's top-k ids, then the student's) with the teacher's logprobs there."""

    lengths_B: torch.Tensor
    logprobs_N: torch.Tensor
    head_ids_NK: torch.Tensor | None = None
    head_logprobs_NK: torch.Tensor | None = None

    def select(self, rows: list[int]) -> "Graded":
        """Samples `rows`, in that order."""
        rows_R = torch.tensor(rows, dtype=torch.long)
        index_M = token_index(self.lengths_B, rows_R)
        lengths, logprobs = self.lengths_B[rows_R], self.logprobs_N[index_M]
        if self.head_ids_NK is None or self.head_logprobs_NK is None:
            return Graded(lengths, logprobs)
        return Graded(lengths, logprobs, self.head_ids_NK[index_M], self.head_logprobs_NK[index_M])

    @staticmethod
    def concat(parts: list["Graded"]) -> "Graded":
        lengths, logprobs = torch.cat([p.lengths_B for p in parts]), torch.cat([p.logprobs_N for p in parts])
        ids = [p.head_ids_NK for p in parts if p.head_ids_NK is not None]
        values = [p.head_logprobs_NK for p in parts if p.head_logprobs_NK is not None]
        if len(ids) < len(parts) or len(values) < len(parts):
            return Graded(lengths, logprobs)
        return Graded(lengths, logprobs, torch.cat(ids), torch.cat(values))

    @staticmethod
    def from_lists(
        logprobs: list[list[float]], head_ids: list[list[list[int]]] | None = None,
        head_logprobs: list[list[list[float]]] | None = None,
    ) -> "Graded":  # fmt: skip
        """From per-sample lists (tests and benches; the grader's reply is tensors already)."""
        lengths = torch.tensor([len(row) for row in logprobs], dtype=torch.long)
        flat = torch.tensor([x for row in logprobs for x in row], dtype=torch.float32)
        if head_ids is None or head_logprobs is None:
            return Graded(lengths, flat)
        ids = torch.tensor([ids for rows in head_ids for ids in rows], dtype=torch.long)
        values = torch.tensor([lps for rows in head_logprobs for lps in rows], dtype=torch.float32)
        return Graded(lengths, flat, ids, values)


async def grade(grader: GraderPool, rollouts: Rollouts, top_k: int = 0) -> Graded:
    """Teacher logprobs of every completion token; with `top_k` also each position's head: the
    teacher's top-k, followed, when the rollouts carry the student's top ids, by the teacher's
    logprobs at those (asked as candidate_ids)."""
    candidates = rollouts.student_top_ids if top_k else None
    sequences = [
        Sequence(prompt_ids=p, completion_ids=c, candidate_ids=None if candidates is None else candidates[i])
        for i, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True))
    ]
    scores = await grader.logprobs_tensors(sequences, top_k=top_k)
    if scores.lengths_B.tolist() != [len(c) for c in rollouts.completion_ids]:
        raise GraderError("grader returned a different number of logprobs than completion tokens")
    if not top_k:
        return Graded(scores.lengths_B, scores.logprobs_N)
    if scores.top_ids_NK is None or scores.top_logprobs_NK is None:
        raise GraderError(f"grader returned no top-{top_k}")
    if candidates is None:
        return Graded(scores.lengths_B, scores.logprobs_N, scores.top_ids_NK, scores.top_logprobs_NK)
    if scores.candidate_logprobs_NC is None:
        raise GraderError("grader returned no logprobs for the student's top ids (candidate_ids)")
    student_ids_NK = torch.tensor([ids for rows in candidates for ids in rows], dtype=torch.long)
    return Graded(scores.lengths_B, scores.logprobs_N, torch.cat([scores.top_ids_NK, student_ids_NK], dim=1),
                  torch.cat([scores.top_logprobs_NK, scores.candidate_logprobs_NC], dim=1))  # fmt: skip
