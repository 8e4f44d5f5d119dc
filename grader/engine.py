"""The grader engine protocol: what `app.py` needs from the torch and vLLM engines."""

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from grader.tensors import ScoredBatch
from opd.serving import InfoResponse


@dataclass(frozen=True)
class ToScore:
    prompt_ids: list[int]
    completion_ids: list[int]
    candidate_ids: list[list[int]] | None = None
    """Per completion position, ids whose logprobs are wanted too (the same number at each)."""


@dataclass(frozen=True)
class Scored:
    """One sequence's scores as lists: the JSON reply's view of a batch (`sequences_of`); tests build
    batches from them (`batch_of`). The engines return ScoredBatch."""

    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None


def batch_of(scored: list[Scored]) -> ScoredBatch:
    """Per-sequence lists as one flat batch (candidates as `padded_candidates` has them)."""
    lengths = [len(s.logprobs) for s in scored]

    def per_position(field: str, dtype: torch.dtype) -> torch.Tensor | None:
        per_sequence = [getattr(s, field) for s in scored]
        if any(rows is None for rows in per_sequence):
            return None
        return torch.tensor([row for rows in per_sequence for row in rows], dtype=dtype).reshape(sum(lengths), -1)

    return ScoredBatch(
        torch.tensor(lengths, dtype=torch.long),
        torch.tensor([x for s in scored for x in s.logprobs], dtype=torch.float32),
        per_position("top_ids", torch.long),
        per_position("top_logprobs", torch.float32),
        padded_candidates([s.candidate_logprobs for s in scored], lengths),
    )


def padded_candidates(per_sequence: list[list[list[float]] | None], lengths: list[int]) -> torch.Tensor | None:
    """Each sequence's candidate rows (or none) as one [N, C] tensor: rows padded with 0.0 to the
    widest, sequences without candidates given rows of padding; None when no sequence has any."""
    width = max((len(rows[0]) for rows in per_sequence if rows), default=0)
    if width == 0:
        return None
    padded = [row + [0.0] * (width - len(row)) for rows, n in zip(per_sequence, lengths, strict=True)
              for row in (rows or [[]] * n)]  # fmt: skip
    return torch.tensor(padded, dtype=torch.float32)


def sequences_of(batch: ScoredBatch, asked: list["ToScore"]) -> list[Scored]:
    """A flat batch as per-sequence lists (one `tolist` per tensor), candidates cut to each
    sequence's own width."""
    lengths = batch.lengths_B.tolist()

    def cut(tensor: torch.Tensor) -> list[list]:
        values, out, start = tensor.tolist(), [], 0
        for n in lengths:
            out.append(values[start : start + n])
            start += n
        return out

    def cut_optional(tensor: torch.Tensor | None) -> list[list] | list[None]:
        return [None] * len(lengths) if tensor is None else cut(tensor)

    columns = zip(cut(batch.logprobs_N), cut_optional(batch.top_ids_NK), cut_optional(batch.top_logprobs_NK),
                  cut_optional(batch.candidate_logprobs_NC), strict=True)  # fmt: skip
    out = []
    for seq, (logprobs, top_ids, top_logprobs, candidates) in zip(asked, columns, strict=True):
        if seq.candidate_ids is not None and candidates is not None:
            candidates = [row[: len(seq.candidate_ids[0])] for row in candidates]
        else:
            candidates = None
        out.append(Scored(logprobs, top_ids, top_logprobs, candidates))
    return out


class GraderEngine(Protocol):
    tokenizer: PreTrainedTokenizerBase
    """Tokenises sequences given as text, and turns ids back into text (`return_tokens`)."""

    def info(self) -> InfoResponse: ...

    def alive(self) -> bool: ...

    async def score(self, sequences: list[ToScore], top_k: int) -> ScoredBatch:
        """Teacher logprobs of each sequence's completion tokens (and candidates, and the top-k),
        flat in request order."""
        ...

    async def close(self) -> None: ...
