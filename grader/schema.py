"""Wire schema of the grader. The learner imports these models.

POST /v1/logprobs  LogprobsRequest -> LogprobsResponse
GET  /v1/info      InfoResponse
GET  /health       200 when ready
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from opd.serving import MAX_LOGPROBS_CAP, ErrorResponse, InfoResponse

__all__ = ["ErrorResponse", "InfoResponse", "LogprobsRequest", "LogprobsResponse", "ScoredSequence", "Sequence"]

TokenId = Annotated[int, Field(ge=0)]


class Sequence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_ids: Annotated[list[TokenId], Field(min_length=1)]
    completion_ids: Annotated[list[TokenId], Field(min_length=1)]
    candidate_ids: list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_LOGPROBS_CAP)]] | None = None
    """Per completion position, ids whose teacher logprobs to return as well (`candidate_logprobs`):
    one list per completion token, all of the same length, at most the server's --max-logprobs."""

    @model_validator(mode="after")
    def _one_row_per_completion_token(self) -> "Sequence":
        if self.candidate_ids is not None:
            if len(self.candidate_ids) != len(self.completion_ids):
                raise ValueError("candidate_ids needs one list per completion token")
            if len({len(row) for row in self.candidate_ids}) != 1:
                raise ValueError("candidate_ids lists must all have the same length")
        return self


class LogprobsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequences: Annotated[list[Sequence], Field(min_length=1)]
    top_k: int = Field(default=0, ge=0, le=MAX_LOGPROBS_CAP)
    """Also return the k most likely tokens at each completion position (at most --max-logprobs)."""


class ScoredSequence(BaseModel):
    logprobs: list[float]
    """Teacher logprob of each completion token, in order."""
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None
    """With `candidate_ids`: the teacher's logprob of each candidate, in the order asked."""


class LogprobsResponse(BaseModel):
    results: list[ScoredSequence]
