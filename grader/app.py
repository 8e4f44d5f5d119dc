"""The grader's HTTP routes: validate, score with the teacher engine, map the result.

    opd grader --model tiny:teacher --port 8002
    curl -s localhost:8002/v1/logprobs -H 'content-type: application/json' \
         -d '{"sequences": [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]}]}'
"""

import math
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response

from grader.engine import GraderEngine, Scored, ToScore
from grader.schema import InfoResponse, LogprobsRequest, LogprobsResponse, ScoredSequence, Sequence
from opd.errors import NonFiniteOutputError, RequestError
from opd.serving import ERROR_RESPONSES, check_token_ids, create_service_app, json_reply


@dataclass(frozen=True)
class GraderSettings:
    max_sequences: int = 4096
    """Largest number of sequences per /v1/logprobs call."""


def create_app(engine: GraderEngine, settings: GraderSettings | None = None) -> FastAPI:
    app = create_service_app("opd grader", engine, settings or GraderSettings())
    app.post("/v1/logprobs", response_model=LogprobsResponse, responses=ERROR_RESPONSES)(logprobs)
    return app


async def logprobs(body: LogprobsRequest, request: Request) -> Response:
    engine: GraderEngine = request.app.state.engine
    limit = request.app.state.settings.max_sequences
    if len(body.sequences) > limit:
        raise RequestError(
            f"{len(body.sequences)} sequences exceed the limit of {limit}", param="sequences", status=413
        )
    _check_sequences(body, engine.info())
    sequences = [ToScore(s.prompt_ids, s.completion_ids, s.candidate_ids) for s in body.sequences]
    scored = await engine.score(sequences, body.top_k)
    _check_finite(scored)
    return json_reply(LogprobsResponse(results=[ScoredSequence(**vars(s)) for s in scored]))


def _check_candidates(seq: Sequence, info: InfoResponse, param: str) -> None:
    if seq.candidate_ids is None:
        return
    if len(seq.candidate_ids[0]) > info.max_logprobs:
        raise RequestError(f"{len(seq.candidate_ids[0])} candidates per position are over this server's "
                           f"--max-logprobs {info.max_logprobs}", param=param, status=422)  # fmt: skip
    for row in seq.candidate_ids:
        check_token_ids(row, info.model_vocab_size, param=param)


def _check_finite(scored: list[Scored]) -> None:
    # A logprob of -inf is possible only for a token of probability 0, which a softmax never gives;
    # NaN or inf means the teacher's weights overflow.
    if any(not math.isfinite(lp) for s in scored for lp in s.logprobs):
        raise NonFiniteOutputError("the teacher produced non-finite logprobs; its weights overflow")


def _check_sequences(body: LogprobsRequest, info: InfoResponse) -> None:
    if body.top_k > info.max_logprobs:
        raise RequestError(f"top_k {body.top_k} is over this server's --max-logprobs {info.max_logprobs}",
                           param="top_k", status=422)  # fmt: skip
    for i, seq in enumerate(body.sequences):
        check_token_ids(seq.prompt_ids, info.model_vocab_size, param=f"sequences.{i}.prompt_ids")
        check_token_ids(seq.completion_ids, info.model_vocab_size, param=f"sequences.{i}.completion_ids")
        _check_candidates(seq, info, param=f"sequences.{i}.candidate_ids")
        total = len(seq.prompt_ids) + len(seq.completion_ids)
        if total > info.max_model_len:
            raise RequestError(
                f"sequence {i} has {total} tokens, more than the model's context of {info.max_model_len}",
                param=f"sequences.{i}",
            )
