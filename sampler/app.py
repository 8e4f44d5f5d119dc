"""The sampler's HTTP routes: thin wrappers that validate, call the engine, and map the result.

opd sampler --model tiny:student --port 8001
"""

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Query, Request, Response
from starlette.requests import ClientDisconnect

from grader.app import LOGPROBS_BODY, LOGPROBS_RESPONSES, logprobs
from grader.schema import LogprobsResponse
from opd import torch_thread
from opd.auth import check_bearer
from opd.errors import NonFiniteOutputError, RequestError
from opd.limits import MAX_REQUEST_SEQUENCES
from opd.serving import (
    ERROR_RESPONSES,
    MAX_JSON_BYTES,
    check_token_ids,
    create_service_app,
    is_json,
    json_body_schema,
    json_reply,
    media_type,
    parse_json,
    with_engine_time,
)
from sampler import samples as samples_wire
from sampler.adapters import read_adapter
from sampler.engine import Sample, SamplerEngine, SamplingParams
from sampler.schema import (
    ADAPTER_CONFIG_KEY,
    MAX_VERSION,
    ChatMessage,
    Completion,
    GenerateRequest,
    GenerateResponse,
    PromptResult,
    WeightsFromPath,
    WeightsResponse,
    WeightsShared,
)
from sampler.shared import BufferMaps, tensor_views
from sampler.weights import check_weights, decode_safetensors, hold_file, read_safetensors_file
from sampler.wire import Decoded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSettings:
    max_weights_bytes: int = 64 * 2**30
    """Largest accepted weight push body; 64 GiB fits a 14B model in fp32."""
    max_prompts: int = MAX_REQUEST_SEQUENCES
    """Largest prompts x n per generate call."""
    max_sequences: int = MAX_REQUEST_SEQUENCES
    """Largest number of sequences per /v1/logprobs call."""
    api_key: str | None = None
    """Bearer token required by POST /v1/weights; None: no check (loopback only)."""
    chars_per_token: int = 32
    """Chat messages longer than this x the model's context (in characters) are refused before
    tokenising: tokenising 12 MiB of text took ~17 s and 1.5 GB, and no token spans 32 characters
    often enough for a prompt that fits the context to be that long."""


GENERATE_RESPONSES: dict[int | str, dict] = {
    **ERROR_RESPONSES,
    200: {
        "content": {samples_wire.MEDIA_TYPE: {}},
        "description": "GenerateResponse as JSON, or with format safetensors the samples as flat tensors in a "
        "safetensors file (sampler/samples.py)",
    },
}


def create_app(engine: SamplerEngine, settings: SamplerSettings | None = None) -> FastAPI:
    # weights have their own, larger limit, checked while streaming
    app = create_service_app("opd sampler", engine, settings or SamplerSettings(), frozenset({"/v1/weights"}))
    app.state.buffer_maps = BufferMaps()  # the learner's weight buffer, once a shared push has named it
    app.post("/v1/generate", response_model=GenerateResponse, responses=GENERATE_RESPONSES,
             openapi_extra=json_body_schema(GenerateRequest))(generate)  # fmt: skip
    # The student's logprobs of given completions, as the grader gives the teacher's (`opd grade --sampler`).
    app.post("/v1/logprobs", response_model=LogprobsResponse, responses=LOGPROBS_RESPONSES,
             openapi_extra=LOGPROBS_BODY)(logprobs)  # fmt: skip
    app.post("/v1/weights", response_model=WeightsResponse, responses=ERROR_RESPONSES, openapi_extra=_WEIGHTS_BODY)(
        push_weights
    )
    return app


async def generate(request: Request) -> Response:
    body = await parse_json(request, GenerateRequest)
    engine: SamplerEngine = request.app.state.engine
    settings: SamplerSettings = request.app.state.settings
    count = len(body.prompt_ids or body.messages or [])
    if count * body.n > settings.max_prompts:
        raise RequestError(f"prompts x n exceeds {settings.max_prompts}", param="n", status=413)
    if body.top_logprobs > engine.info().max_logprobs:
        raise RequestError(f"top_logprobs {body.top_logprobs} is over this server's --max-logprobs "
                           f"{engine.info().max_logprobs}", param="top_logprobs", status=422)  # fmt: skip
    prompts = await _prompt_ids(body, engine, settings)
    params = SamplingParams(body.n, body.temperature, body.top_p, body.max_tokens, body.seed, body.top_logprobs)
    started = time.perf_counter()
    version, samples = await engine.generate(prompts, params)
    engine_s = time.perf_counter() - started
    _check_finite(samples, version)
    if body.format == "safetensors":  # (torch builds the tensors: on the torch thread, opd/torch_thread.py)
        encoded = await torch_thread.run(samples_wire.encode, version, prompts, samples, body.n, body.top_logprobs)
        return with_engine_time(Response(content=encoded, media_type=samples_wire.MEDIA_TYPE), engine_s)
    # the engine's own lists, not validated again (see the grader's `_result`)
    results = [
        PromptResult(prompt_ids=prompt, completions=[_json_completion(s) for s in per_prompt])
        for prompt, per_prompt in zip(prompts, samples, strict=True)
    ]
    return with_engine_time(json_reply(GenerateResponse(policy_version=version, results=results)), engine_s)


JSON_LOGPROB_FLOOR = -9999.0
"""What a top logprob of -inf (a token that top_p leaves out of the distribution sampled) reads in
a JSON reply: JSON has no infinity, and pydantic would write null. vLLM's OpenAI server writes the
same floor. Safetensors replies keep -inf."""


def _json_completion(sample: Sample) -> Completion:
    fields = vars(sample)
    if sample.top_logprobs is not None:
        floor = JSON_LOGPROB_FLOOR
        fields = fields | {"top_logprobs": [[v if v > floor else floor for v in row] for row in sample.top_logprobs]}
    return Completion.model_construct(**fields)


def _check_finite(samples: list[list[Sample]], version: int) -> None:
    """Weights that are finite but absurd (say 3e38) overflow inside the model: refuse to hand
    out completions whose logprobs are NaN or infinite as if they were samples."""
    if any(not math.isfinite(lp) for per_prompt in samples for s in per_prompt for lp in s.logprobs):
        raise NonFiniteOutputError(
            f"the model served as policy_version {version} produced non-finite logprobs; its weights "
            "overflow: push sane weights"
        )


async def _prompt_ids(body: GenerateRequest, engine: SamplerEngine, settings: SamplerSettings) -> list[list[int]]:
    """Token ids of every prompt, checked against the vocabulary and the context length."""
    info = engine.info()
    if body.messages is not None:
        _check_chat_lengths(body.messages, settings.chars_per_token * info.max_model_len)
        # Tokenising long chats takes a while: off the event loop, so other requests go on.
        chats = [[m.model_dump() for m in chat] for chat in body.messages]
        prompts = await asyncio.to_thread(lambda: [engine.chat_to_ids(chat) for chat in chats])
    else:
        prompts = body.prompt_ids or []
    for i, prompt in enumerate(prompts):
        check_token_ids(prompt, info.model_vocab_size, param=f"prompt_ids.{i}")
        if len(prompt) + body.max_tokens > info.max_model_len:
            raise RequestError(
                f"prompt {i} has {len(prompt)} tokens; with max_tokens {body.max_tokens} that "
                f"exceeds the model's context of {info.max_model_len}",
                param=f"prompt_ids.{i}",
            )
    return prompts


def _check_chat_lengths(chats: list[list[ChatMessage]], max_chars: int) -> None:
    for i, chat in enumerate(chats):
        chars = sum(len(m.content) for m in chat)
        if chars > max_chars:
            raise RequestError(
                f"chat {i} has {chars} characters, more than any prompt that fits the model's context ({max_chars})",
                param=f"messages.{i}",
                status=413,
            )


_WEIGHTS_BODY = json_body_schema(WeightsFromPath, WeightsShared)
_WEIGHTS_BODY["requestBody"]["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}


async def push_weights(
    request: Request, version: int | None = Query(default=None, ge=0, le=MAX_VERSION)
) -> WeightsResponse:
    """Swap in new weights: a safetensors body, JSON naming a file on a shared volume, or JSON
    naming the learner's weight buffer and where each weight sits in it."""
    check_bearer(request.headers.get("authorization"), request.app.state.settings.api_key)
    content_type = request.headers.get("content-type", "")
    if is_json(content_type):
        if version is not None:
            raise RequestError("a JSON push names its version in the body, not as ?version", param="version",
                               status=422)  # fmt: skip
        raw = await _read_capped(request, MAX_JSON_BYTES)  # (the path is exempt from the app-wide JSON limit)
        if _names_a_buffer(raw):
            return await _swap_in_shared(request, WeightsShared.model_validate_json(raw))
        source = WeightsFromPath.model_validate_json(raw)
        held = await torch_thread.run(hold_file, source.path)
        try:
            decoded = await torch_thread.run(read_safetensors_file, held, source.path)
            return await _swap_in(request, decoded, held.path, source.version, source.path)
        finally:
            held.close()
    if media_type(content_type) != "application/octet-stream":
        # A web page may post text, a form or a typeless blob to another origin without asking
        # first; octet-stream it may not. Without this check, any page open in a browser on the
        # sampler's machine could replace the student.
        raise RequestError(f"send safetensors bytes as application/octet-stream (or JSON as application/json), not "
                           f"{content_type or 'a body without content-type'}", param="body", status=415)  # fmt: skip
    payload = await _read_capped(request, request.app.state.settings.max_weights_bytes)
    decoded = await torch_thread.run(decode_safetensors, payload, request.headers.get("x-content-sha256"))
    return await _swap_in(request, decoded, payload, version, "the request body")


def _names_a_buffer(raw: bytes | bytearray) -> bool:
    """Whether a JSON push is a WeightsShared (the one with a `buffer`); anything else, malformed
    JSON included, is validated as a WeightsFromPath and refused as one."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # (nested past Python's recursion limit: no push either)
        return False
    return isinstance(body, dict) and "buffer" in body


async def _swap_in_shared(request: Request, body: WeightsShared) -> WeightsResponse:
    """Copy the weights out of the learner's buffer (sampler/shared.py), after the same checks as
    any push; on a GPU the copy has finished when this answers, so the learner may write again."""
    engine: SamplerEngine = request.app.state.engine
    if engine.info().engine != "torch" or engine.info().max_lora_rank is not None:
        raise RequestError("this sampler takes weights by body or path: pushes through shared memory need the "
                           "torch engine and full weights", param="buffer", status=422)  # fmt: skip
    maps: BufferMaps = request.app.state.buffer_maps
    specs = engine.weight_specs()

    def opened_and_checked() -> dict[str, torch.Tensor]:  # one hop to the torch thread for both
        tensors = tensor_views(maps.open(body.buffer), body.tensors)
        check_weights(tensors, specs)
        return tensors

    tensors = await torch_thread.run(opened_and_checked)
    # (the engine's copy has finished when load_weights returns: the learner may write the buffer again)
    return await _swap_in(request, (tensors, {}), "", body.version, f"the learner's {body.buffer.kind} buffer",
                          checked=True)  # fmt: skip


async def _swap_in(
    request: Request, decoded: Decoded, origin: str | bytearray, version: int | None, where: str, checked: bool = False
) -> WeightsResponse:
    """Check the decoded tensors (unless `checked`: full weights checked already) and load them
    (`origin`: what they were decoded from, which the engine may load from; `where`: how the log
    names it)."""
    tensors, metadata = decoded
    engine: SamplerEngine = request.app.state.engine
    new_version = version if version is not None else engine.policy_version + 1
    max_rank = engine.info().max_lora_rank
    # Hashing and checking a multi-GB push take seconds: off the event loop, on the torch
    # thread (opd/torch_thread.py: torch work from a second thread slows every later kernel on CPU).
    if max_rank is not None:
        adapter = await torch_thread.run(read_adapter, tensors, metadata, engine.weight_specs(), max_rank)
        await engine.load_adapter(adapter, new_version)
    else:
        if ADAPTER_CONFIG_KEY in metadata:
            raise RequestError("this sampler serves full weights: start it with --max-lora-rank to push LoRA adapters",
                               param="weights", status=422)  # fmt: skip
        if not checked:
            await torch_thread.run(check_weights, tensors, engine.weight_specs())
        await engine.load_weights(tensors, new_version, origin)
    logger.info("loaded %d weight tensors from %s, policy_version=%d", len(tensors), where, new_version)
    return WeightsResponse(policy_version=new_version)


async def _read_capped(request: Request, limit: int) -> bytearray:
    """The whole body in one buffer grown as it comes: a push is held once, not once in chunks and
    again joined (16 GB each at 8B). Growing does not copy what is there (a large buffer is
    remapped), and nothing is allocated on the word of a Content-Length header alone."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"weights body of {declared} bytes exceeds the limit of {limit}", param="body", status=413)
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise RequestError(f"weights body exceeds the limit of {limit} bytes", param="body", status=413)
            body += chunk
    except ClientDisconnect as exc:
        # A push cut off mid-stream: nothing was loaded, the old weights keep serving.
        logger.warning(
            "weight push cut off after %d bytes; keeping policy_version %d",
            len(body),
            request.app.state.engine.policy_version,
        )
        raise RequestError("the weights body ended before it was complete", param="body") from exc
    return body
