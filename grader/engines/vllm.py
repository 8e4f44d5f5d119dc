"""The vLLM grader engine: the teacher scores completions with `prompt_logprobs`.

Each sequence becomes one request over `prompt_ids + completion_ids` that generates a single
token; vLLM returns, for every prompt position, the logprob of the token there (and the top-k
when asked), from which we keep only the completion part, read from vLLM's flat layout into one
array per request (`batch_of_flat`: per-position objects cost more than the forward at top-k).
Prompt-logprob requests skip the prefix cache and materialise full-vocab logits for every token,
so the engine's batched tokens (`max_num_batched_tokens`) and the number of sequences in flight at
once are both capped.

Candidate ids (the teacher's logprobs at ids the caller names, per completion position) take one
of two routes, by vLLM's model runner:
- V2 runner (the default of the GPU build of vLLM 0.32 where Triton is present): the same request
  carries `prompt_logprob_token_ids` for the completion rows (`prompt_logprob_start` = the last
  prompt token). Not yet run on a GPU here.
- V1 runner (the CPU build, which has no Triton): one extra request per completion position,
  `prompt + completion[:j]` with `logprob_token_ids`, sharing the sequence's prefix cache. Slower
  (a request per position) but exact; tested against transformers.
Both give log-softmax of the raw logits, like `prompt_logprobs`.
"""

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from grader.engine import ToScore, padded_candidates
from grader.tensors import ScoredBatch
from opd import torch_thread
from opd.paths import resolve_model_path
from opd.serving import InfoResponse
from opd.vllm_engine import VllmOptions, build_async_llm, engine_errors, flat_entries, vllm_model_card

T = TypeVar("T")

MAX_TOKENS_IN_FLIGHT = 65536
"""Prompt tokens in the engine at once; bounds the logprob results held in memory. A sequence
enters as soon as earlier ones have left room (no drain between batches of sequences)."""


class TokenBudget:
    """At most `limit` tokens held at once; a request larger than the limit waits until it is alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._freed = asyncio.Event()

    async def acquire(self, tokens: int) -> None:
        # no await between the check and the update: one event loop, so nothing runs in between
        while not (self.used == 0 or self.used + tokens <= self.limit):
            self._freed.clear()
            await self._freed.wait()
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used -= tokens
        self._freed.set()

    def release_when_done(self, task: "asyncio.Future[Any]", tokens: int) -> None:
        """Give `tokens` back when `task` ends, however it ends (cancelled before it started too)."""
        task.add_done_callback(lambda _: self.release(tokens))


async def within_budget(budget: TokenBudget, jobs: Sequence[tuple[int, Callable[[], Awaitable[T]]]]) -> list[T]:
    """Run each (tokens, job) once `budget` has room for its tokens, in order, overlapping as room
    allows; results in order. Only the next job waits, so a release wakes one waiter per request:
    were all of a request's jobs waiting at once, each release would wake every one of them
    (quadratic in the jobs: 0.36 s of event-loop CPU for 4,096 sequences of 300 tokens, 0.10 s
    this way). On an error the jobs still running are cancelled and awaited; each job's tokens come
    back when its task ends."""
    tasks: list[asyncio.Task[T]] = []
    try:
        for tokens, job in jobs:
            await budget.acquire(tokens)
            tasks.append(asyncio.ensure_future(job()))
            budget.release_when_done(tasks[-1], tokens)
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the finished ones
        await asyncio.gather(*tasks, return_exceptions=True)  # ended, and their tokens back, before we return


@dataclass(frozen=True)
class FlatScored:
    """One sequence's scores as vLLM lays them out (`opd.vllm_engine.flat_entries`): 1 + top_k
    entries per completion position, its own token first; candidates as rows."""

    token_ids: list[int]
    logprobs: list[float]
    candidate_logprobs: list[list[float]] | None = None


def _scored(output: Any, prompt_len: int, completion: list[int], top_k: int) -> FlatScored:
    positions = output.prompt_logprobs[prompt_len : prompt_len + len(completion)]
    return FlatScored(*flat_entries(positions, completion, top_k))


def batch_of_flat(parts: list[FlatScored], top_k: int) -> ScoredBatch:
    """The request's sequences as one ScoredBatch, each column cut from one [N, 1 + top_k] array
    (numpy reads a list of floats several times faster than torch.tensor does)."""
    width = 1 + top_k
    lengths = [len(p.logprobs) // width for p in parts]
    values = torch.from_numpy(np.concatenate([np.array(p.logprobs, dtype=np.float32) for p in parts])).view(-1, width)
    candidates = padded_candidates([p.candidate_logprobs for p in parts], lengths)
    if top_k == 0:
        return ScoredBatch(torch.tensor(lengths, dtype=torch.long), values[:, 0], candidate_logprobs_NC=candidates)
    ids = torch.from_numpy(np.concatenate([np.array(p.token_ids, dtype=np.int64) for p in parts])).view(-1, width)
    return ScoredBatch(torch.tensor(lengths, dtype=torch.long), values[:, 0].contiguous(), ids[:, 1:].contiguous(),
                       values[:, 1:].contiguous(), candidates)  # fmt: skip


def grader_engine_options(options: VllmOptions, max_batch_tokens: int) -> VllmOptions:
    """The engine settings the grader runs with (bench/gpu_bench.py's raw reference uses the same).
    Prefix caching lets the V1 route's per-position candidate requests reuse the sequence's KV."""
    extra = {"max_num_batched_tokens": max_batch_tokens, "enable_prefix_caching": True, **options.extra}
    return VllmOptions(**{**vars(options), "extra": extra})


def prompt_logprob_params(top_k: int, extra: dict[str, Any] | None = None) -> Any:
    """A scoring request: one generated token, the prompt's logprobs (and top-k) over all positions,
    flat (`opd.vllm_engine.flat_entries`)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False, flat_logprobs=True,
                          **(extra or {}))  # fmt: skip


class PromptScorer:
    """Scores sequences with an `AsyncLLM`'s prompt logprobs under a budget of tokens in flight; the
    grader scores with its teacher, the vLLM sampler with its student (and its current LoRA adapter)."""

    def __init__(self, engine: Any, max_tokens_in_flight: int = MAX_TOKENS_IN_FLIGHT) -> None:
        self.engine = engine
        self.candidates_in_one_request = bool(getattr(engine.vllm_config, "use_v2_model_runner", False))
        self._budget = TokenBudget(max_tokens_in_flight)

    async def score(self, sequences: list[ToScore], top_k: int, lora: Any = None) -> ScoredBatch:
        jobs = [(len(seq.prompt_ids) + len(seq.completion_ids), functools.partial(self._score_one, seq, top_k, lora))
                for seq in sequences]  # fmt: skip
        with engine_errors():
            scored = await within_budget(self._budget, jobs)
        return await torch_thread.run(batch_of_flat, scored, top_k)

    async def _run(self, tokens: list[int], params: Any, lora: Any) -> Any:
        from vllm.inputs import TokensPrompt

        final = None
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=tokens), params,
                                                 request_id=uuid.uuid4().hex, lora_request=lora):  # fmt: skip
            final = output
        return final

    async def _score_one(self, seq: ToScore, top_k: int, lora: Any) -> FlatScored:
        together = seq.candidate_ids is not None and self.candidates_in_one_request
        extra: dict[str, Any] = {}
        if together:
            extra = {"prompt_logprob_token_ids": seq.candidate_ids, "prompt_logprob_start": len(seq.prompt_ids) - 1}
        final = await self._run(seq.prompt_ids + seq.completion_ids, prompt_logprob_params(top_k, extra), lora)
        assert final is not None and final.prompt_logprobs is not None
        scored = _scored(final, len(seq.prompt_ids), seq.completion_ids, top_k)
        if seq.candidate_ids is None:
            return scored
        if together:
            rows = getattr(final, "prompt_token_id_logprobs", None)
            if rows is None:  # vLLM drops them silently when a prefill starts past the first row
                raise RuntimeError("vLLM returned no candidate logprobs (prompt_token_id_logprobs)")
            candidates = [[float(v) for v in row] for row in rows]
        else:
            candidates = await self._candidates_per_position(seq, lora)
        return FlatScored(scored.token_ids, scored.logprobs, candidates)

    async def _candidates_per_position(self, seq: ToScore, lora: Any) -> list[list[float]]:
        """The V1 route: position j's candidates as `logprob_token_ids` of a request that continues
        `prompt + completion[:j]` by one token (raw log-softmax, temperature 1)."""
        from vllm import SamplingParams

        assert seq.candidate_ids is not None

        async def position(j: int, ids: list[int]) -> list[float]:
            unique = list(dict.fromkeys(ids))
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprobs=len(unique),
                                    logprob_token_ids=unique)  # fmt: skip
            final = await self._run(seq.prompt_ids + seq.completion_ids[:j], params, lora)
            found = final.outputs[0].logprobs[0]
            return [found[i].logprob for i in ids]

        return list(await asyncio.gather(*(position(j, ids) for j, ids in enumerate(seq.candidate_ids))))


class VllmGraderEngine:
    def __init__(self, model_path: str, options: VllmOptions, max_batch_tokens: int = 16384) -> None:
        self.model_path = model_path
        self.options = options
        self.engine = build_async_llm(resolve_model_path(model_path), grader_engine_options(options, max_batch_tokens))
        self.tokenizer, self.card = vllm_model_card(model_path, self.engine, options.dtype, scores=True)
        self.scorer = PromptScorer(self.engine)

    def info(self) -> InfoResponse:
        return self.card

    def alive(self) -> bool:
        return not self.engine.errored  # (set by vLLM's own monitor of its engine core process)

    async def score(self, sequences: list[ToScore], top_k: int) -> ScoredBatch:
        return await self.scorer.score(sequences, top_k)

    async def close(self) -> None:
        self.engine.shutdown()
