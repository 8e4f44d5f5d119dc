"""Wire schema of the grader (the sampler serves the same /v1/logprobs). The learner imports these.

POST /v1/logprobs  LogprobsRequest -> LogprobsResponse
GET  /v1/info      InfoResponse
GET  /health       200 when ready

A sequence is given as token ids (what the learner sends; never re-tokenised) or as text: the
prompt as `prompt` (plain text, tokenised as is) or `messages` (a chat, templated by the server
with its tokenizer's chat template, ready for the assistant's turn), the completion as
`completion` (tokenised on its own, no special tokens added). Text replies carry the ids the
server tokenised to, so a caller can reuse them.

With `"format": "safetensors"` the reply is not JSON but the scores as flat tensors in a
safetensors file (`grader/tensors.py` lists them); the learner asks for that.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from opd.limits import MAX_LOGPROBS_CAP
from opd.serving import ChatMessage, ErrorResponse, InfoResponse, Text

__all__ = ["ErrorResponse", "InfoResponse", "LogprobsRequest", "LogprobsResponse", "ScoredSequence", "Sequence"]

TokenId = Annotated[int, Field(ge=0)]


class Sequence(BaseModel):
    """One prompt and completion: each given as ids or as text, exactly one form per field."""

    model_config = ConfigDict(extra="forbid")

    prompt_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    prompt: Annotated[Text, Field(min_length=1)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    completion_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    completion: Annotated[Text, Field(min_length=1)] | None = None
    candidate_ids: list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_LOGPROBS_CAP)]] | None = None
    """Per completion position, ids whose teacher logprobs to return as well (`candidate_logprobs`):
    one list per completion token, all of the same length, at most the server's --max-logprobs."""

    @model_validator(mode="after")
    def _one_form_each(self) -> "Sequence":
        prompts = [name for name in ("prompt_ids", "prompt", "messages") if getattr(self, name) is not None]
        if len(prompts) != 1:
            raise ValueError("give exactly one of prompt_ids, prompt and messages")
        if (self.completion_ids is None) == (self.completion is None):
            raise ValueError("give exactly one of completion_ids and completion")
        if self.candidate_ids is not None:
            if self.completion_ids is not None and len(self.candidate_ids) != len(self.completion_ids):
                raise ValueError("candidate_ids needs one list per completion token")
            if len({len(row) for row in self.candidate_ids}) != 1:
                raise ValueError("candidate_ids lists must all have the same length")
        return self


class LogprobsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequences: Annotated[list[Sequence], Field(min_length=1)]
    top_k: int = Field(default=0, ge=0, le=MAX_LOGPROBS_CAP)
    """Also return the k most likely tokens at each completion position (at most --max-logprobs)."""
    return_tokens: bool = False
    """Also return each completion token as text (`tokens`, and `top_tokens` with top_k) and the ids."""
    format: Literal["json", "safetensors"] = "json"
    """The reply's encoding: `LogprobsResponse` as JSON, or flat tensors in a safetensors file
    (media type application/vnd.opd.logprobs+safetensors; see grader/tensors.py), ~3x smaller
    and cheaper to read for top-k replies. Safetensors takes sequences as ids only, without
    return_tokens, and candidate_ids on every sequence or none, of one width."""

    @field_validator("format")
    @classmethod
    def _tensors_need_ids(cls, value: str, info: ValidationInfo) -> str:
        sequences = info.data.get("sequences")
        if value == "json" or sequences is None:  # sequences None: they failed, and say why themselves
            return value
        if info.data.get("return_tokens"):
            raise ValueError("format safetensors has no token strings: ask return_tokens with format json")
        if any(s.prompt_ids is None or s.completion_ids is None for s in sequences):
            raise ValueError("format safetensors takes sequences as prompt_ids and completion_ids (text needs json, "
                             "whose reply carries the ids it was tokenised to)")  # fmt: skip
        if len({len(s.candidate_ids[0]) if s.candidate_ids else 0 for s in sequences}) > 1:
            raise ValueError("format safetensors needs candidate_ids on every sequence or none, all of one width")
        return value


class ScoredSequence(BaseModel):
    logprobs: list[float]
    """Logprob of each completion token, in order."""
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None
    """With `candidate_ids`: the logprob of each candidate, in the order asked."""
    prompt_ids: list[int] | None = None
    """With text or `return_tokens`: the ids that were scored."""
    completion_ids: list[int] | None = None
    tokens: list[str] | None = None
    """With `return_tokens`: each completion token as text (one token may be part of a character;
    an id past the tokenizer, a padded vocabulary row, shows as `<|id:N|>`)."""
    top_tokens: list[list[str]] | None = None


class LogprobsResponse(BaseModel):
    results: list[ScoredSequence]
