"""The torch grader engine: one transformers forward per chunk of sequences.

Sequences are sorted by length and cut into chunks of at most `max_batch_tokens` padded tokens,
so rows of similar length share a chunk (little padding) and the activations of a chunk stay
bounded; the LM head then runs a few hundred positions at a time (`opd.logprobs`), so the logits
of a whole chunk never exist. Results go back in request order.
"""

import asyncio

import torch
from transformers import PreTrainedModel

from grader.engine import Scored, ToScore
from opd.modeling import (
    completion_scores,
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
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_model_len: int | None = None,
        max_batch_tokens: int = 16384,
        max_logprobs: int = 20,
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.model = load_causal_lm(model_path, dtype, device)
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer, self.card = model_card(
            model_path, engine="torch", dtype=dtype, max_model_len=self.max_model_len,
            model_vocab_size=self.model.config.vocab_size, max_logprobs=max_logprobs,
        )  # fmt: skip
        self.pad_id = pad_token_id(self.tokenizer)
        self._lock = asyncio.Lock()

    def info(self) -> InfoResponse:
        return self.card

    async def score(self, sequences: list[ToScore], top_k: int) -> list[Scored]:
        async with self._lock:
            return await asyncio.to_thread(score_sequences, self.model, sequences, top_k, pad_id=self.pad_id,
                                           max_batch_tokens=self.max_batch_tokens)  # fmt: skip

    async def close(self) -> None:
        return None


@torch.inference_mode()
def score_sequences(
    model: PreTrainedModel, sequences: list[ToScore], top_k: int, *, pad_id: int, max_batch_tokens: int
) -> list[Scored]:
    """Logprobs of each sequence's completion tokens (and candidates, and the top-k) under `model`,
    in length-sorted chunks of at most `max_batch_tokens` padded tokens; results in request order.
    The torch sampler scores with its student the same way."""
    results: list[Scored | None] = [None] * len(sequences)
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in sequences]
    for chunk in length_sorted_chunks(lengths, max_batch_tokens):
        for i, scored in zip(chunk, _score_chunk(model, [sequences[i] for i in chunk], top_k, pad_id), strict=True):
            results[i] = scored
    return [r for r in results if r is not None]


def _score_chunk(model: PreTrainedModel, sequences: list[ToScore], top_k: int, pad_id: int) -> list[Scored]:
    device = str(model.get_output_embeddings().weight.device)
    batch = pack_left_padded([s.prompt_ids for s in sequences], [s.completion_ids for s in sequences], pad_id, device)
    scores = completion_scores(model, batch, top_k=top_k, candidate_ids_NC=_candidates(sequences, device))
    out, start = [], 0
    for s in sequences:
        rows = slice(start, start + len(s.completion_ids))
        start = rows.stop
        out.append(Scored(
            logprobs=scores.token_logprobs_N[rows].tolist(),
            top_ids=None if scores.top_ids_NK is None else scores.top_ids_NK[rows].tolist(),
            top_logprobs=None if scores.top_logprobs_NK is None else scores.top_logprobs_NK[rows].tolist(),
            candidate_logprobs=None if s.candidate_ids is None or scores.candidate_logprobs_NC is None
            else scores.candidate_logprobs_NC[rows, : len(s.candidate_ids[0])].tolist(),
        ))  # fmt: skip
    return out


def _candidates(sequences: list[ToScore], device: str) -> torch.Tensor | None:
    """Every sequence's candidate ids as one [N, C] tensor, rows padded with id 0 (dropped later)."""
    width = max((len(s.candidate_ids[0]) for s in sequences if s.candidate_ids), default=0)
    if width == 0:
        return None
    rows = [row + [0] * (width - len(row)) for s in sequences
            for row in (s.candidate_ids or [[] for _ in s.completion_ids])]  # fmt: skip
    return torch.tensor(rows, dtype=torch.long, device=device)
