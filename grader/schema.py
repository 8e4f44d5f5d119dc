"""Wire schema of the grader. The learner imports these models.

POST /v1/logprobs  LogprobsRequest -> LogprobsResponse
GET  /v1/info      InfoResponse
GET  /health       200 when ready
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from opd.serving import ErrorResponse, InfoResponse

__all__ = ["ErrorResponse", "InfoResponse", "LogprobsRequest", "LogprobsResponse", "ScoredSequence", "Sequence"]

TokenId = Annotated[int, Field(ge=0)]

MAX_TOP_K = 20
"""Same cap as vLLM's default `max_logprobs`, so both engines accept the same requests."""


class Sequence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_ids: Annotated[list[TokenId], Field(min_length=1)]
    completion_ids: Annotated[list[TokenId], Field(min_length=1)]


class LogprobsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequences: Annotated[list[Sequence], Field(min_length=1)]
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)
    """Also return the k most likely tokens at each completion position."""


class ScoredSequence(BaseModel):
    logprobs: list[float]
    """Teacher logprob of each completion token, in order."""
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class LogprobsResponse(BaseModel):
    results: list[ScoredSequence]
