"""The vLLM grader engine: the teacher scores completions with `prompt_logprobs`.

Each sequence becomes one request over `prompt_ids + completion_ids` that generates a single
token; vLLM returns, for every prompt position, the logprob of the token there (and the top-k
when asked), from which we keep only the completion part. Prompt-logprob requests skip the
prefix cache and materialise full-vocab logits for every token, so the engine's batched tokens
(`max_num_batched_tokens`) and the number of sequences in flight at once are both capped.
"""

import asyncio
import uuid
from typing import Any

from grader.engine import Scored
from grader.schema import MAX_TOP_K
from opd.paths import resolve_model_path
from opd.serving import InfoResponse
from opd.vllm_engine import VllmOptions, build_async_llm, engine_errors, vllm_model_card

MAX_TOKENS_IN_FLIGHT = 65536
"""Prompt tokens submitted to the engine at once; bounds the logprob results held in memory."""


def _chunks(sequences: list[tuple[list[int], list[int]]], budget: int) -> list[list[int]]:
    chunks: list[list[int]] = [[]]
    used = 0
    for i, (prompt, completion) in enumerate(sequences):
        size = len(prompt) + len(completion)
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += size
    return chunks


def _scored(output: Any, prompt_len: int, completion: list[int], top_k: int) -> Scored:
    positions = output.prompt_logprobs[prompt_len : prompt_len + len(completion)]
    logprobs = [position[token].logprob for position, token in zip(positions, completion, strict=True)]
    if top_k == 0:
        return Scored(logprobs)
    tops = [sorted(position.items(), key=lambda kv: kv[1].rank)[:top_k] for position in positions]
    return Scored(logprobs, [[t for t, _ in top] for top in tops], [[lp.logprob for _, lp in top] for top in tops])


class VllmGraderEngine:
    def __init__(self, model_path: str, options: VllmOptions, max_batch_tokens: int = 16384) -> None:
        from vllm import SamplingParams

        self.model_path = model_path
        self.options = options
        local = resolve_model_path(model_path)
        extra = {"max_logprobs": MAX_TOP_K, "max_num_batched_tokens": max_batch_tokens, **options.extra}
        self.engine = build_async_llm(local, VllmOptions(**{**vars(options), "extra": extra}))
        self.tokenizer, self.card = vllm_model_card(model_path, self.engine, options.dtype)
        self._params = {
            k: SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
            for k in range(MAX_TOP_K + 1)
        }

    def info(self) -> InfoResponse:
        return self.card

    async def score(self, sequences: list[tuple[list[int], list[int]]], top_k: int) -> list[Scored]:
        results: list[Scored] = []
        for chunk in _chunks(sequences, MAX_TOKENS_IN_FLIGHT):
            with engine_errors():
                results += await asyncio.gather(*(self._score_one(*sequences[i], top_k) for i in chunk))
        return results

    async def _score_one(self, prompt: list[int], completion: list[int], top_k: int) -> Scored:
        from vllm.inputs import TokensPrompt

        final = None
        request = TokensPrompt(prompt_token_ids=prompt + completion)
        async for output in self.engine.generate(request, self._params[top_k], request_id=uuid.uuid4().hex):
            final = output
        assert final is not None and final.prompt_logprobs is not None
        return _scored(final, len(prompt), completion, top_k)

    async def close(self) -> None:
        self.engine.shutdown()
