"""The grader engine protocol: what `app.py` needs from the torch and vLLM engines."""

from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from opd.serving import InfoResponse


@dataclass(frozen=True)
class ToScore:
    prompt_ids: list[int]
    completion_ids: list[int]
    candidate_ids: list[list[int]] | None = None
    """Per completion position, ids whose logprobs are wanted too (the same number at each)."""


@dataclass(frozen=True)
class Scored:
    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None


class GraderEngine(Protocol):
    tokenizer: PreTrainedTokenizerBase
    """Tokenises sequences given as text, and turns ids back into text (`return_tokens`)."""

    def info(self) -> InfoResponse: ...

    async def score(self, sequences: list[ToScore], top_k: int) -> list[Scored]:
        """Teacher logprobs of each sequence's completion tokens (and candidates, and the top-k)."""
        ...

    async def close(self) -> None: ...
