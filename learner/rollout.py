"""From prompts to graded samples: sample with the student, grade with the teacher.

These are the first two calls of a training step (and of an eval); `learner/producer.py` runs
them ahead of the learner, `learner/update.py` scores and learns from what they return.
"""

import asyncio
from dataclasses import dataclass

from grader.schema import Sequence
from grader.tensors import ScoredBatch
from learner.clients import GraderPool, SamplerPool
from opd.errors import GraderError, StaleSamplerError
from opd.limits import MAX_REQUEST_SEQUENCES
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
    generated any of it: a restarted sampler serves its initial weights as version 0. Sent as flat
    tensors (sampler/samples.py): at real sizes the JSON reply costs seconds to write and read.
    More than MAX_REQUEST_SEQUENCES samples go as several requests at once, each prompt's seeds as
    in one request (sample j of prompt i: seed + i * n + j), so the split changes no draw."""
    prompts = request.prompt_ids or []
    per_request = max(1, MAX_REQUEST_SEQUENCES // request.n)
    parts = [request.model_copy(update={"prompt_ids": prompts[i : i + per_request], "format": "safetensors",
                                        "seed": None if request.seed is None else request.seed + i * request.n})
             for i in range(0, len(prompts), per_request)] or [request]  # fmt: skip
    replies = await asyncio.gather(*(sampler.generate(part) for part in parts))
    version = min(reply.policy_version for reply in replies)
    if version < min_version:
        raise StaleSamplerError(f"sampler served policy_version {version}, expected {min_version}")
    if len(replies) == 1:
        return replies[0]
    return GenerateResponse(policy_version=version, results=[r for reply in replies for r in reply.results])


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


GRADE_REQUEST_BYTES = 32 * 2**20
"""The most JSON one grade request may carry: the servers refuse bodies over 64 MiB, and a step of
long completions graded with the student's top-k as candidates (`top_k_head: both`: 16 ids a
token) passes that (128 samples x 8k tokens: ~120 MB). A larger step goes as several requests."""
ID_BYTES = 7
"""JSON bytes of one token id at most, its comma included (vocabularies stay under a million)."""


def request_chunks(sequences: list[Sequence], max_bytes: int, max_count: int) -> list[list[Sequence]]:
    """`sequences` in order, cut into runs of at most `max_count` whose JSON stays under
    `max_bytes` (by an upper bound on its size; a sequence larger than that alone goes alone, and
    the server judges it)."""
    chunks: list[list[Sequence]] = [[]]
    size = 0
    for sequence in sequences:
        candidates = sequence.candidate_ids or []
        this = 64 + ID_BYTES * (len(sequence.prompt_ids or []) + len(sequence.completion_ids or []))
        this += sum(3 + ID_BYTES * len(ids) for ids in candidates)
        if chunks[-1] and (size + this > max_bytes or len(chunks[-1]) == max_count):
            chunks.append([])
            size = 0
        chunks[-1].append(sequence)
        size += this
    return chunks


async def grade(grader: GraderPool, rollouts: Rollouts, top_k: int = 0) -> ScoredBatch:
    """The teacher's scores of every sample, flat over completion tokens (sample 0's, then sample
    1's, ...): each token's logprob; with `top_k` also each position's top-k, and when the rollouts
    carry the student's top ids, the teacher's logprobs at those (asked as candidate_ids). Sent as
    one request, or as several at once where one would carry more than GRADE_REQUEST_BYTES or
    MAX_REQUEST_SEQUENCES sequences."""
    candidates = rollouts.student_top_ids if top_k else None
    sequences = [
        Sequence(prompt_ids=p, completion_ids=c, candidate_ids=None if candidates is None else candidates[i])
        for i, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True))
    ]
    chunks = request_chunks(sequences, GRADE_REQUEST_BYTES, MAX_REQUEST_SEQUENCES)
    parts = await asyncio.gather(*(grader.logprobs_tensors(chunk, top_k=top_k) for chunk in chunks))
    scores = parts[0] if len(parts) == 1 else ScoredBatch.concat(list(parts))
    if scores.lengths_B.tolist() != [len(c) for c in rollouts.completion_ids]:
        raise GraderError("grader returned a different number of logprobs than completion tokens")
    if top_k and (scores.top_ids_NK is None or scores.top_logprobs_NK is None):
        raise GraderError(f"grader returned no top-{top_k}")
    if candidates is not None and scores.candidate_logprobs_NC is None:
        raise GraderError("grader returned no logprobs for the student's top ids (candidate_ids)")
    return scores
