"""The torch grader engine: one transformers forward per chunk of sequences.

Sequences are sorted by length and cut into chunks of at most `max_batch_tokens` padded tokens,
so rows of similar length share a chunk (little padding) and the activations of a chunk stay
bounded; the LM head then runs a few hundred positions at a time (`opd.logprobs`), so the logits
of a whole chunk never exist. Results go back as flat tensors in request order (`grader/tensors.py`).
The model loads and runs on the process's torch thread (`opd/torch_thread.py`).
"""

import asyncio

import torch
from transformers import PreTrainedModel

from grader.engine import ToScore
from grader.tensors import ScoredBatch
from opd import torch_thread
from opd.modeling import completion_scores, length_sorted_chunks, load_served_model, pack_left_padded
from opd.serving import InfoResponse


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
        served = load_served_model(model_path, dtype=dtype, device=device, max_model_len=max_model_len,
                                   max_logprobs=max_logprobs)  # fmt: skip
        self.model, self.tokenizer, self.card, self.pad_id = served.model, served.tokenizer, served.card, served.pad_id
        self.max_model_len = self.card.max_model_len
        self.max_batch_tokens = max_batch_tokens
        self._lock = asyncio.Lock()

    def info(self) -> InfoResponse:
        return self.card

    def alive(self) -> bool:
        return True  # (the model lives in this process: it goes when the server goes)

    async def score(self, sequences: list[ToScore], top_k: int) -> ScoredBatch:
        async with self._lock:
            return await torch_thread.run(score_sequences, self.model, sequences, top_k, pad_id=self.pad_id,
                                          max_batch_tokens=self.max_batch_tokens)  # fmt: skip

    async def close(self) -> None:
        return None


@torch.inference_mode()
def score_sequences(
    model: PreTrainedModel, sequences: list[ToScore], top_k: int, *, pad_id: int, max_batch_tokens: int
) -> ScoredBatch:
    """Logprobs of each sequence's completion tokens (and candidates, and the top-k) under `model`,
    in length-sorted chunks of at most `max_batch_tokens` padded tokens; flat, in request order.
    The torch sampler scores with its student the same way."""
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in sequences]
    width = max((len(s.candidate_ids[0]) for s in sequences if s.candidate_ids), default=0)
    chunks = length_sorted_chunks(lengths, max_batch_tokens)
    parts = [_score_chunk(model, [sequences[i] for i in chunk], top_k, pad_id, width) for chunk in chunks]
    chunk_order = torch.tensor([i for chunk in chunks for i in chunk], dtype=torch.long)
    return ScoredBatch.concat(parts).select(torch.argsort(chunk_order))


def _score_chunk(model: PreTrainedModel, sequences: list[ToScore], top_k: int, pad_id: int, width: int) -> ScoredBatch:
    device = str(model.get_output_embeddings().weight.device)
    batch = pack_left_padded([s.prompt_ids for s in sequences], [s.completion_ids for s in sequences], pad_id, device)
    scores = completion_scores(model, batch, top_k=top_k, candidate_ids_NC=_candidates(sequences, width, device))

    def on_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.cpu()

    return ScoredBatch(batch.completion_lengths_B.cpu(), scores.token_logprobs_N.cpu(), on_host(scores.top_ids_NK),
                       on_host(scores.top_logprobs_NK), on_host(scores.candidate_logprobs_NC))  # fmt: skip


def _candidates(sequences: list[ToScore], width: int, device: str) -> torch.Tensor | None:
    """Every sequence's candidate ids as one [N, width] tensor, rows padded with id 0 (their
    logprobs are cut off again in the JSON reply; the learner asks for one width throughout)."""
    if width == 0:
        return None
    rows = [row + [0] * (width - len(row)) for s in sequences
            for row in (s.candidate_ids or [[] for _ in s.completion_ids])]  # fmt: skip
    return torch.tensor(rows, dtype=torch.long, device=device)
