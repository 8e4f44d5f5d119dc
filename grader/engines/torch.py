"""The torch grader engine: one transformers forward per chunk of sequences.

Sequences are sorted by length and cut into chunks of at most `max_batch_tokens` padded tokens,
so rows of similar length share a chunk (little padding) and the activations of a chunk stay
bounded; the LM head then runs a few hundred positions at a time (`opd.logprobs`), so the logits
of a whole chunk never exist. Results go back in request order.
"""

import asyncio

import torch

from grader.engine import Scored
from opd.modeling import (
    completion_logprobs,
    completion_top_k,
    length_sorted_chunks,
    load_causal_lm,
    model_card,
    pack_left_padded,
)
from opd.serving import InfoResponse
from opd.tokenizer import pad_token_id


class TorchGraderEngine:
    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        device: str = "cpu",
        max_model_len: int | None = None,
        max_batch_tokens: int = 16384,
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        self.model = load_causal_lm(model_path, dtype, device)
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer, self.card = model_card(
            model_path, engine="torch", dtype=dtype, max_model_len=self.max_model_len,
            model_vocab_size=self.model.config.vocab_size,
        )  # fmt: skip
        self.pad_id = pad_token_id(self.tokenizer)
        self._lock = asyncio.Lock()

    def info(self) -> InfoResponse:
        return self.card

    async def score(self, sequences: list[tuple[list[int], list[int]]], top_k: int) -> list[Scored]:
        async with self._lock:
            return await asyncio.to_thread(self._score_sync, sequences, top_k)

    @torch.inference_mode()
    def _score_sync(self, sequences: list[tuple[list[int], list[int]]], top_k: int) -> list[Scored]:
        results: list[Scored | None] = [None] * len(sequences)
        lengths = [len(p) + len(c) for p, c in sequences]
        for chunk in length_sorted_chunks(lengths, self.max_batch_tokens):
            for i, scored in zip(chunk, self._score_chunk([sequences[i] for i in chunk], top_k), strict=True):
                results[i] = scored
        return [r for r in results if r is not None]

    def _score_chunk(self, sequences: list[tuple[list[int], list[int]]], top_k: int) -> list[Scored]:
        prompts, completions = [p for p, _ in sequences], [c for _, c in sequences]
        batch = pack_left_padded(prompts, completions, self.pad_id, self.device)
        if top_k == 0:
            logprobs_BT = completion_logprobs(self.model, batch)
            return [Scored(logprobs_BT[b, : len(c)].tolist()) for b, c in enumerate(completions)]
        logprobs_BT, top_ids_BTK, top_lp_BTK = completion_top_k(self.model, batch, top_k)
        return [
            Scored(
                logprobs_BT[b, : len(c)].tolist(), top_ids_BTK[b, : len(c)].tolist(), top_lp_BTK[b, : len(c)].tolist()
            )
            for b, c in enumerate(completions)
        ]

    async def close(self) -> None:
        return None
