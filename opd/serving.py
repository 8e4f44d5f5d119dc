"""What both servers share: the error envelope, its exception handlers, and the uvicorn runner.

Every non-2xx reply has the body `ErrorResponse {error: {message, type, param, code}}`. Bad
input becomes a 4xx naming the field; anything unexpected becomes a sanitised 500 whose details
go to the log, never to the client.
"""

import asyncio
import json
import logging
import math
import os
import signal
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, Protocol, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opd.errors import EngineDeadError, NonFiniteOutputError, RequestError

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "Bad input (the field is named)"},
    401: {"model": ErrorResponse, "description": "Weight push without the bearer token"},
    403: {"model": ErrorResponse, "description": "Weight push with a wrong bearer token"},
    413: {"model": ErrorResponse, "description": "Request too large"},
    422: {"model": ErrorResponse, "description": "Schema validation failed"},
    500: {"model": ErrorResponse, "description": "The model produced non-finite logprobs (broken weights)"},
    503: {"model": ErrorResponse, "description": "Engine not ready or dead"},
}


def error_json(
    message: str, kind: str, code: int, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    detail = ErrorDetail(message=message, type=kind, param=param, code=code)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=code, headers=headers)


def _validation_param(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":  # loc holds a character offset, not a field
        return f"body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", "body"
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or "body"
    return f"{param}: {first.get('msg', 'invalid request')}", param


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    message, param = _validation_param(exc)
    return error_json(message, "invalid_request", 422, param)


async def _on_request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return error_json(str(exc), "invalid_request", exc.status, exc.param)


async def _on_engine_dead(request: Request, exc: Exception) -> JSONResponse:
    logger.error("engine died (%s); exiting so the process is restarted", exc)
    _exit_to_be_restarted(request.app.state, delay_s=0.5)  # (after this reply is sent)
    return error_json(f"engine died: {exc}; the server is restarting", "engine_dead", 503)


def _exit_to_be_restarted(state: Any, delay_s: float) -> None:
    """SIGTERM this process, once: uvicorn's handler shuts the app down in order, the engine's
    close included. A second SIGTERM (a request and the engine watch both finding the engine
    dead) would make uvicorn exit at once, without it."""
    if getattr(state, "exiting", False):
        return
    state.exiting = True
    asyncio.get_running_loop().call_later(delay_s, os.kill, os.getpid(), signal.SIGTERM)


async def _on_non_finite(_: Request, exc: Exception) -> JSONResponse:
    logger.error("%s", exc)
    return error_json(str(exc), "non_finite_output", 500)


_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


async def _on_http_error(_: Request, exc: Exception) -> JSONResponse:
    """The framework's own errors (unknown path, wrong method, unparsable body) in our envelope."""
    assert isinstance(exc, StarletteHTTPException)
    kind = _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request")
    param = "body" if exc.status_code == 400 else None  # FastAPI's 400 is a body it could not parse
    return error_json(str(exc.detail), kind, exc.status_code, param, headers=dict(exc.headers or {}))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_json("internal server error; see the server log", "internal_error", 500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    # Bodies parsed inside a route (e.g. the JSON form of POST /v1/weights) raise this one.
    app.add_exception_handler(ValidationError, _on_validation_error)
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(EngineDeadError, _on_engine_dead)
    app.add_exception_handler(NonFiniteOutputError, _on_non_finite)
    app.add_exception_handler(Exception, _on_unexpected)


MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON request body: 64 MiB holds ~4M token ids, far above any sane batch."""


def add_body_limit(
    app: FastAPI, max_bytes: int = MAX_JSON_BYTES, exempt: frozenset[str] | set[str] = frozenset()
) -> None:
    """Answer 413 to request bodies over `max_bytes` on every path but `exempt` (which cap their
    own bodies while streaming them)."""
    app.add_middleware(BodyLimit, max_bytes=max_bytes, exempt=frozenset(exempt))


class BodyLimit:
    """ASGI middleware: a body declared too large is refused before a byte is read; a chunked
    one (no Content-Length) is read up to `max_bytes` and refused as soon as it passes it, so
    no client makes the server buffer more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[str]) -> None:
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(
                f"request body of {declared} bytes exceeds {self.max_bytes}", scope, receive, send
            )
        body, message = bytearray(), await receive()
        while message["type"] == "http.request":
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(f"request body exceeds {self.max_bytes} bytes", scope, receive, send)
            if not message.get("more_body", False):
                break
            message = await receive()
        await self.app(scope, _replay(bytes(body), message, receive), send)

    @staticmethod
    async def _refuse(message: str, scope: Scope, receive: Receive, send: Send) -> None:
        await error_json(message, "too_large", 413, "body")(scope, receive, send)


def _replay(body: bytes, last: Message, receive: Receive) -> Receive:
    """A `receive` that hands the app the buffered body once (or the disconnect that cut it
    short), then defers to the server's."""
    pending = [last if last["type"] != "http.request" else {"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def serve(app: FastAPI, listener: socket.socket) -> None:
    """Run `app` with uvicorn on an already bound socket (`opd.launch.bind_listener`) until SIGINT/SIGTERM."""
    host, port = listener.getsockname()[:2]
    logger.info("listening on http://%s:%d", host, port)  # uvicorn does not say so for a given socket
    config = uvicorn.Config(app, log_level="info", access_log=False)
    uvicorn.Server(config).run(sockets=[listener])


class InfoResponse(BaseModel):
    """GET /v1/info of either server."""

    model_config = ConfigDict(extra="forbid")

    model: str
    engine: str
    dtype: str
    vocab_size: int
    """Tokenizer length; the tokenizer half of the fingerprint."""
    tokenizer_hash: str
    model_vocab_size: int
    """Rows of the embedding; token ids must be below this."""
    max_model_len: int
    max_logprobs: int
    """Largest top-k of logprobs a request may ask for (`--max-logprobs`)."""
    max_lora_rank: int | None = None
    """Sampler serving LoRA adapters (`--max-lora-rank`): the largest rank it loads; None: full weights."""
    policy_version: int = 0


def json_reply(model: BaseModel) -> Response:
    """A reply model as JSON, serialised by pydantic's Rust core in one call; None fields are left
    out. FastAPI's own path re-validates the model and encodes it in Python: ~13x slower for the
    65,536 logprobs of a 256 x 256-token batch (26 vs 2 ms)."""
    return Response(content=model.model_dump_json(exclude_none=True), media_type="application/json")


ModelT = TypeVar("ModelT", bound=BaseModel)


async def parse_json(request: Request, model: type[ModelT]) -> ModelT:
    """The request's JSON body as `model`, decoded and validated in one pass by pydantic's core.
    A FastAPI body parameter decodes with Python's json module, then validates the objects, on the
    event loop: in a process with torch and transformers loaded, a grade request of 128 x 4k
    tokens took 68 ms that way against 45, and one of 16 x 4k tokens with 16 candidate ids each
    390 ms against 110 (`python -m bench.http_overhead`). Bad bodies get what FastAPI gave them:
    422 naming the field, or naming `body` (not JSON, or not sent as JSON); 400 for a body that is
    not UTF-8 or never arrived whole. Validation is strict: `"top_k": "3"` or `true` is a 422, not a 3
    or a 1, so a client's type error surfaces instead of being guessed at."""
    if not is_json(request.headers.get("content-type", "")):
        # (as FastAPI refuses: a form or text/plain is what a web page may post cross-site unasked)
        raise RequestError("send the body as JSON, with content-type application/json", param="body", status=422)
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise RequestError("the body ended before it was complete", param="body", status=400) from None
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        if exc.errors()[0]["type"] != "json_invalid":
            raise
        try:  # Python's decoder admits JSON that pydantic's refuses, a lone surrogate ("\ud800") in a
            decoded = json.loads(raw)  # string: the model's own validators then name the field
        except UnicodeDecodeError:
            raise RequestError("the body is not UTF-8 text", param="body", status=400) from None
        except (ValueError, RecursionError):  # (arrays or objects nested past Python's recursion limit)
            raise exc from None
        return model.model_validate(decoded, strict=True)


def is_json(content_type: str) -> bool:
    """application/json or application/<anything>+json, parameters (charset) aside."""
    kind = media_type(content_type)
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def media_type(content_type: str) -> str:
    """A content-type header's type, lower case, parameters (charset) aside."""
    return content_type.split(";", 1)[0].strip().lower()


COMPONENTS = "#/components/schemas/"
_BODY_MODELS: dict[str, type[BaseModel]] = {}
"""Every model a route reads with `parse_json`, by name: the OpenAPI documents describe them."""


def json_body_schema(*models: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads its JSON body with `parse_json` (one of `models`), so
    the OpenAPI document still describes the body: a reference to each model's schema, which the
    service apps put under components/schemas (`_with_body_schemas`), named as pydantic names it."""
    for model in models:
        if _BODY_MODELS.setdefault(model.__name__, model) is not model:
            raise ValueError(f"two request bodies are named {model.__name__}: the OpenAPI document needs one")
    refs = [{"$ref": COMPONENTS + model.__name__} for model in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _with_body_schemas(document: dict) -> dict:
    """`document` with the schema of each body model its routes refer to, and of the models
    nested in them, under components/schemas (FastAPI puts there only what it validates itself)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    paths = json.dumps(document.get("paths", {}))
    for name, model in _BODY_MODELS.items():
        if f'"{COMPONENTS}{name}"' in paths:
            schema = model.model_json_schema(ref_template=COMPONENTS + "{model}")
            for nested, nested_schema in schema.pop("$defs", {}).items():
                schemas.setdefault(nested, nested_schema)
            schemas[name] = schema
    return document


SERVER_TIMING = "server-timing"


def with_engine_time(reply: Response, seconds: float) -> Response:
    """`reply` with the request's time in the engine in a W3C Server-Timing header (`engine;dur=`
    in milliseconds; waiting for the engine included: a weight swap under way, requests ahead of
    it), so a client can tell it from what HTTP and the request's and reply's encoding cost."""
    reply.headers[SERVER_TIMING] = f"engine;dur={seconds * 1000:.3f}"
    return reply


def engine_seconds(headers: Mapping[str, str]) -> float | None:
    """The engine's seconds a reply reports (`with_engine_time`); None where it reports none."""
    for metric in headers.get(SERVER_TIMING, "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for key, _, value in (param.partition("=") for param in params):
            if name == "engine" and key == "dur":
                try:
                    milliseconds = float(value)
                except ValueError:
                    return None
                return milliseconds / 1000 if math.isfinite(milliseconds) and milliseconds >= 0 else None
    return None


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Every id must index the model's embedding (the schema already rejects negatives)."""
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is out of the vocabulary (size {vocab_size})", param=param)


def _utf8_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON admits "\ud800", a lone surrogate no tokenizer can take
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_utf8_text)]
"""Text from a request: a str that encodes as UTF-8 (tokenizers refuse lone surrogates with a 500)."""


class ChatMessage(BaseModel):
    """One message of a chat the server templates with its tokenizer's chat template."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class ServedEngine(Protocol):
    """What the shared routes need of either service's engine."""

    def info(self) -> InfoResponse: ...

    def alive(self) -> bool:
        """False once the engine can serve no more (a vLLM engine core that died)."""
        ...

    async def close(self) -> None: ...


ENGINE_CHECK_S = 2.0
"""How often a server asks whether its engine still runs."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    watch = asyncio.create_task(_exit_when_engine_dies(app.state))
    try:
        yield
    finally:
        watch.cancel()
        await app.state.engine.close()


async def _exit_when_engine_dies(state: Any) -> None:
    """An idle server whose engine died would answer /health forever and never be restarted:
    notice it unasked, and exit as a request that met the dead engine does (`_on_engine_dead`)."""
    while state.engine.alive():
        await asyncio.sleep(ENGINE_CHECK_S)
    logger.error("engine died; exiting so the process is restarted")
    _exit_to_be_restarted(state, delay_s=0)


async def health(request: Request) -> dict[str, str]:
    if not request.app.state.engine.alive():
        raise EngineDeadError("the engine no longer runs")  # 503, then the server exits
    return {"status": "ok"}


async def info(request: Request) -> Response:
    return json_reply(request.app.state.engine.info())  # (None fields left out, as in every reply)


def create_service_app(
    title: str, engine: ServedEngine, settings: Any, body_limit_exempt: frozenset[str] = frozenset()
) -> FastAPI:
    """The part both servers share: engine and settings on `app.state`, the engine closed at
    shutdown, the error envelope for every error, the JSON body limit, GET /health and /v1/info."""
    app = FastAPI(title=title, lifespan=_lifespan)
    app.state.engine = engine
    app.state.settings = settings
    add_error_handlers(app)
    add_body_limit(app, exempt=body_limit_exempt)
    app.get("/health")(health)
    app.get("/v1/info", response_model=InfoResponse)(info)
    build_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_body_schemas(build_document())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # (FastAPI's documented way to extend the document)
    return app
