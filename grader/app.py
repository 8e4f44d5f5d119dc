"""The grader's HTTP routes: validate, score with the teacher engine, map the result.

    opd grader --model tiny:teacher --port 8002
    curl -s localhost:8002/v1/logprobs -H 'content-type: application/json' \
         -d '{"sequences": [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]}]}'
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request

from grader.engine import GraderEngine
from grader.schema import InfoResponse, LogprobsRequest, LogprobsResponse, ScoredSequence
from opd.errors import RequestError
from opd.serving import ERROR_RESPONSES, add_body_limit, add_error_handlers, check_token_ids


@dataclass(frozen=True)
class GraderSettings:
    max_sequences: int = 4096
    """Largest number of sequences per /v1/logprobs call."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await app.state.engine.close()


def create_app(engine: GraderEngine, settings: GraderSettings | None = None) -> FastAPI:
    app = FastAPI(title="opd grader", lifespan=_lifespan)
    app.state.engine = engine
    app.state.settings = settings or GraderSettings()
    add_error_handlers(app)
    add_body_limit(app)
    app.get("/health")(health)
    app.get("/v1/info", response_model=InfoResponse)(info)
    app.post("/v1/logprobs", response_model=LogprobsResponse, responses=ERROR_RESPONSES)(logprobs)
    return app


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def info(request: Request) -> InfoResponse:
    return request.app.state.engine.info()


async def logprobs(body: LogprobsRequest, request: Request) -> LogprobsResponse:
    engine: GraderEngine = request.app.state.engine
    limit = request.app.state.settings.max_sequences
    if len(body.sequences) > limit:
        raise RequestError(
            f"{len(body.sequences)} sequences exceed the limit of {limit}", param="sequences", status=413
        )
    _check_sequences(body, engine.info())
    scored = await engine.score([(s.prompt_ids, s.completion_ids) for s in body.sequences], body.top_k)
    return LogprobsResponse(results=[ScoredSequence(**vars(s)) for s in scored])


def _check_sequences(body: LogprobsRequest, info: InfoResponse) -> None:
    for i, seq in enumerate(body.sequences):
        check_token_ids(seq.prompt_ids, info.model_vocab_size, param=f"sequences.{i}.prompt_ids")
        check_token_ids(seq.completion_ids, info.model_vocab_size, param=f"sequences.{i}.completion_ids")
        total = len(seq.prompt_ids) + len(seq.completion_ids)
        if total > info.max_model_len:
            raise RequestError(
                f"sequence {i} has {total} tokens, more than the model's context of {info.max_model_len}",
                param=f"sequences.{i}",
            )
