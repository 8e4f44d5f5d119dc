"""Scores as flat tensors: what the engines return, and the /v1/logprobs reply with
`"format": "safetensors"` (the learner's).

Every per-token tensor is flat over the request's completion tokens in request order (sequence
0's tokens, then sequence 1's, ...), N in all; `completion_lengths` cuts it into sequences. On
the wire, a safetensors file (`safetensors.torch.load(reply.content)`) with the tensors

    completion_lengths   int64   [B]     completion tokens of each sequence
    logprobs             float32 [N]     each completion token's logprob
    top_ids              int32   [N, K]  with top_k: the k most likely ids, by rank
    top_logprobs         float32 [N, K]
    candidate_logprobs   float32 [N, C]  with candidate_ids: their logprobs, in the order asked

The values are the engines' float32 numbers, as the JSON reply has them. Why a second format:
JSON spends ~25-30 bytes per top-k entry and, at top-16, writing and parsing it costs the grader
and the learner more than the teacher's forward on small models (a 128-sample toy batch: 0.5 MB
and ~10 ms of encoding and parsing, against 0.17 MB and 0.1 ms here).
"""

from dataclasses import dataclass, fields

import torch
from safetensors.torch import load, save

MEDIA_TYPE = "application/vnd.opd.logprobs+safetensors"


@dataclass(frozen=True)
class ScoredBatch:
    """A request's scores, flat over its completion tokens in request order (N in all)."""

    lengths_B: torch.Tensor
    """Completion tokens of each sequence (int64)."""
    logprobs_N: torch.Tensor
    top_ids_NK: torch.Tensor | None = None
    top_logprobs_NK: torch.Tensor | None = None
    candidate_logprobs_NC: torch.Tensor | None = None
    """Padded on the right to the widest sequence's candidates (the wire format has one width)."""

    def select(self, rows: list[int] | torch.Tensor) -> "ScoredBatch":
        """The sequences `rows`, in that order."""
        rows_R = torch.as_tensor(rows, dtype=torch.long)
        index_M = token_index(self.lengths_B, rows_R)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index_M]

        return ScoredBatch(self.lengths_B[rows_R], self.logprobs_N[index_M], pick(self.top_ids_NK),
                           pick(self.top_logprobs_NK), pick(self.candidate_logprobs_NC))  # fmt: skip

    @staticmethod
    def concat(parts: list["ScoredBatch"]) -> "ScoredBatch":
        def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            present = [t for t in tensors if t is not None]
            return torch.cat(present) if len(present) == len(tensors) else None

        return ScoredBatch(
            torch.cat([p.lengths_B for p in parts]),
            torch.cat([p.logprobs_N for p in parts]),
            cat([p.top_ids_NK for p in parts]),
            cat([p.top_logprobs_NK for p in parts]),
            cat([p.candidate_logprobs_NC for p in parts]),
        )


def token_index(lengths_B: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
    """Positions, in a flat per-token tensor cut by `lengths_B`, of the tokens of sequences
    `rows_R`, one after another."""
    starts_B = torch.cumsum(lengths_B, 0) - lengths_B
    lengths_R = lengths_B[rows_R]
    firsts_M = torch.repeat_interleave(torch.cumsum(lengths_R, 0) - lengths_R, lengths_R)
    return torch.repeat_interleave(starts_B[rows_R], lengths_R) + torch.arange(len(firsts_M)) - firsts_M


WIRE_NAMES = {
    "lengths_B": "completion_lengths",
    "logprobs_N": "logprobs",
    "top_ids_NK": "top_ids",
    "top_logprobs_NK": "top_logprobs",
    "candidate_logprobs_NC": "candidate_logprobs",
}


WIRE_DTYPES = {"completion_lengths": torch.int64, "top_ids": torch.int32}
"""Ids fit int32 (half the bytes of int64); every other tensor is float32."""


def encode(batch: ScoredBatch) -> bytes:
    tensors = {WIRE_NAMES[f.name]: getattr(batch, f.name) for f in fields(ScoredBatch)}
    wire = {name: t.to(WIRE_DTYPES.get(name, torch.float32)).contiguous()
            for name, t in tensors.items() if t is not None}  # fmt: skip
    return save(wire)


def decode(payload: bytes) -> ScoredBatch:
    """A safetensors reply as a ScoredBatch (ids as int64); ValueError if it is not one."""
    try:
        wire = load(payload)
    except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt file
        raise ValueError(f"not a safetensors file: {exc}") from exc
    missing = {"completion_lengths", "logprobs"} - wire.keys()
    if missing:
        raise ValueError(f"the reply has no {sorted(missing)}")
    if wire["completion_lengths"].dtype != torch.int64 or wire["completion_lengths"].dim() != 1:
        raise ValueError("completion_lengths is not a 1-d int64 tensor")
    top_ids = wire.get("top_ids")
    batch = ScoredBatch(wire["completion_lengths"], wire["logprobs"], None if top_ids is None else top_ids.long(),
                        wire.get("top_logprobs"), wire.get("candidate_logprobs"))  # fmt: skip
    n = int(batch.lengths_B.sum())
    for name in ("logprobs", "top_ids", "top_logprobs", "candidate_logprobs"):
        if name in wire and wire[name].shape[0] != n:
            raise ValueError(f"{name} has {wire[name].shape[0]} rows for {n} completion tokens")
    return batch
