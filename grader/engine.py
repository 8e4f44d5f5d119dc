"""The grader engine protocol: what `app.py` needs from the torch and vLLM engines."""

from dataclasses import dataclass
from typing import Protocol

from opd.serving import InfoResponse


@dataclass(frozen=True)
class Scored:
    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class GraderEngine(Protocol):
    def info(self) -> InfoResponse: ...

    async def score(self, sequences: list[tuple[list[int], list[int]]], top_k: int) -> list[Scored]:
        """Teacher logprobs of each (prompt_ids, completion_ids) pair's completion tokens."""
        ...

    async def close(self) -> None: ...
