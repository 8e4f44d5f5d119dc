"""The grader's HTTP routes: validate, score with the teacher engine, map the result.

    opd grader --model tiny:teacher --port 8002
    curl -s localhost:8002/v1/logprobs -H 'content-type: application/json' \
         -d '{"sequences": [{"prompt": "what is 2 + 3?", "completion": "5"}], "return_tokens": true}'

The sampler serves the same POST /v1/logprobs with its student (`opd grade --sampler`), through
`logprobs` below: any engine with `info()`, `tokenizer` and `score()` can.
"""

import asyncio
import time
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request, Response
from transformers import PreTrainedTokenizerBase

from grader import tensors
from grader.engine import GraderEngine, Scored, ToScore, sequences_of
from grader.schema import InfoResponse, LogprobsRequest, LogprobsResponse, ScoredSequence, Sequence
from grader.tensors import ScoredBatch
from opd import torch_thread
from opd.errors import NonFiniteOutputError, RequestError
from opd.limits import MAX_REQUEST_SEQUENCES
from opd.serving import (
    ERROR_RESPONSES,
    check_token_ids,
    create_service_app,
    json_body_schema,
    json_reply,
    parse_json,
    with_engine_time,
)
from opd.tokenizer import chat_prompt_ids, text_ids, token_strings


@dataclass(frozen=True)
class GraderSettings:
    max_sequences: int = MAX_REQUEST_SEQUENCES
    """Largest number of sequences per /v1/logprobs call."""
    chars_per_token: int = 32
    """Text longer than this x the model's context (in characters) is refused before tokenising
    (see the sampler's setting of the same name)."""


LOGPROBS_RESPONSES: dict[int | str, dict] = {
    **ERROR_RESPONSES,
    200: {
        "content": {tensors.MEDIA_TYPE: {}},
        "description": "LogprobsResponse as JSON, or with format safetensors "
        "the scores as flat tensors in a safetensors file (grader/tensors.py)",
    },
}
LOGPROBS_BODY = json_body_schema(LogprobsRequest)
"""The body's schema in the OpenAPI document (`logprobs` reads it with `parse_json`)."""


def create_app(engine: GraderEngine, settings: GraderSettings | None = None) -> FastAPI:
    app = create_service_app("opd grader", engine, settings or GraderSettings())
    app.post("/v1/logprobs", response_model=LogprobsResponse, responses=LOGPROBS_RESPONSES,
             openapi_extra=LOGPROBS_BODY)(logprobs)  # fmt: skip
    return app


async def logprobs(request: Request) -> Response:
    body = await parse_json(request, LogprobsRequest)
    engine: GraderEngine = request.app.state.engine
    settings = request.app.state.settings
    if len(body.sequences) > settings.max_sequences:
        raise RequestError(f"{len(body.sequences)} sequences exceed the limit of {settings.max_sequences}",
                           param="sequences", status=413)  # fmt: skip
    info = engine.info()
    if body.top_k > info.max_logprobs:
        raise RequestError(f"top_k {body.top_k} is over this server's --max-logprobs {info.max_logprobs}",
                           param="top_k", status=422)  # fmt: skip
    _check_text_lengths(body.sequences, settings.chars_per_token * info.max_model_len)
    if all(s.prompt_ids is not None and s.completion_ids is not None for s in body.sequences):
        sequences = _to_score(body.sequences, engine.tokenizer)  # ids as given: nothing to tokenise
    else:  # tokenising and templating text takes a while: off the event loop
        sequences = await asyncio.to_thread(_to_score, body.sequences, engine.tokenizer)
    _check_sequences(sequences, info)
    started = time.perf_counter()
    batch = await engine.score(sequences, body.top_k)
    engine_s = time.perf_counter() - started
    if body.format == "safetensors":  # checked and encoded in one hop to the torch thread (opd/torch_thread.py)
        encoded = await torch_thread.run(_encoded_if_finite, batch)
        return with_engine_time(Response(content=encoded, media_type=tensors.MEDIA_TYPE), engine_s)
    await torch_thread.run(_check_finite, batch)
    # With return_tokens every id and top-k id is decoded, one by one: off the event loop too.
    results = await asyncio.to_thread(lambda: [
        _result(s, asked, given, body.return_tokens, engine.tokenizer)
        for s, asked, given in zip(sequences_of(batch, sequences), sequences, body.sequences, strict=True)
    ])  # fmt: skip
    return with_engine_time(json_reply(LogprobsResponse(results=results)), engine_s)


def _to_score(sequences: list[Sequence], tokenizer: PreTrainedTokenizerBase) -> list[ToScore]:
    """Every sequence as ids: ids as given, text tokenised, chats templated."""
    out = []
    for seq in sequences:
        if seq.prompt_ids is not None:
            prompt = seq.prompt_ids
        elif seq.messages is not None:
            prompt = chat_prompt_ids(tokenizer, [m.model_dump() for m in seq.messages])
        else:
            prompt = text_ids(tokenizer, seq.prompt or "")
        completion = seq.completion_ids if seq.completion_ids is not None else text_ids(tokenizer, seq.completion or "")
        out.append(ToScore(prompt, completion, seq.candidate_ids))
    return out


def _result(
    scored: Scored, asked: ToScore, given: Sequence, return_tokens: bool, tokenizer: PreTrainedTokenizerBase
) -> ScoredSequence:
    """The reply for one sequence: the ids it was scored as when they came from text or were asked for."""
    text_given = given.prompt_ids is None or given.completion_ids is None
    extra: dict = {}
    if text_given or return_tokens:
        extra = {"prompt_ids": asked.prompt_ids, "completion_ids": asked.completion_ids}
    if return_tokens:
        extra["tokens"] = token_strings(tokenizer, asked.completion_ids)
        if scored.top_ids is not None:
            extra["top_tokens"] = [token_strings(tokenizer, row) for row in scored.top_ids]
    # Built by the engine from tensors and ids (lists of floats and ints): not validated again, which
    # at top-16 would hold the event loop 0.5-0.8 s per million tokens (writing the JSON takes 1.2 s).
    return ScoredSequence.model_construct(**vars(scored), **extra)


def _check_text_lengths(sequences: list[Sequence], max_chars: int) -> None:
    for i, seq in enumerate(sequences):
        texts = {"prompt": seq.prompt or "", "messages": "".join(m.content for m in seq.messages or []),
                 "completion": seq.completion or ""}  # fmt: skip
        for field, text in texts.items():
            if len(text) > max_chars:
                raise RequestError(f"sequence {i}'s {field} has {len(text)} characters, more than any text that fits "
                                   f"the model's context ({max_chars})", param=f"sequences.{i}.{field}",
                                   status=413)  # fmt: skip


def _check_candidates(seq: ToScore, info: InfoResponse, param: str) -> None:
    if seq.candidate_ids is None:
        return
    if len(seq.candidate_ids) != len(seq.completion_ids):
        raise RequestError(f"candidate_ids has {len(seq.candidate_ids)} lists for {len(seq.completion_ids)} completion "
                           "tokens", param=param)  # fmt: skip
    if len(seq.candidate_ids[0]) > info.max_logprobs:
        raise RequestError(f"{len(seq.candidate_ids[0])} candidates per position are over this server's "
                           f"--max-logprobs {info.max_logprobs}", param=param, status=422)  # fmt: skip
    for row in seq.candidate_ids:
        check_token_ids(row, info.model_vocab_size, param=param)


def _check_finite(batch: ScoredBatch) -> None:
    # A logprob of -inf is possible only for a token of probability 0, which a softmax never gives;
    # NaN or inf means the model's weights overflow (the grader's teacher, or the sampler's student
    # answering the same /v1/logprobs).
    if not bool(torch.isfinite(batch.logprobs_N).all()):
        raise NonFiniteOutputError("the model produced non-finite logprobs; its weights overflow")


def _encoded_if_finite(batch: ScoredBatch) -> bytes:
    _check_finite(batch)
    return tensors.encode(batch)


def _check_sequences(sequences: list[ToScore], info: InfoResponse) -> None:
    for i, seq in enumerate(sequences):
        check_token_ids(seq.prompt_ids, info.model_vocab_size, param=f"sequences.{i}.prompt_ids")
        check_token_ids(seq.completion_ids, info.model_vocab_size, param=f"sequences.{i}.completion_ids")
        _check_candidates(seq, info, param=f"sequences.{i}.candidate_ids")
        total = len(seq.prompt_ids) + len(seq.completion_ids)
        if total > info.max_model_len:
            raise RequestError(
                f"sequence {i} has {total} tokens, more than the model's context of {info.max_model_len}",
                param=f"sequences.{i}",
            )
