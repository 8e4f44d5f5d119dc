"""Async HTTP clients of the sampler and grader, with the project's one retry policy, and pools
of replicas.

Transport errors and 5xx are retried with exponential backoff until a total deadline; 4xx are
never retried (the request itself is wrong). A failure raises SamplerError / GraderError with the
status and the server's own message.

`SamplerPool` / `GraderPool` spread requests over several servers of one kind: each request goes
to the replica with the least outstanding work, and one that fails (a dead or silent replica)
hands the request to the next and is asked last for a while, so the run goes on while the watchdog
restarts it (or without it, for a replica no watchdog of ours restarts). A weight push goes to
every sampler at once. With one URL a pool behaves exactly like its single client.
"""

import asyncio
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import torch
from pydantic import BaseModel

from grader import tensors
from grader.schema import InfoResponse, LogprobsRequest, LogprobsResponse, Sequence
from grader.tensors import ScoredBatch
from learner.config import Transport
from opd.errors import GraderError, SamplerError, ServiceError, StaleSamplerError
from opd.serving import engine_seconds
from sampler import samples as samples_wire
from sampler.schema import GenerateRequest, GenerateResponse, WeightsFromPath, WeightsResponse, WeightsShared
from sampler.shared import WeightBuffer, layout_of
from sampler.staging import stage
from sampler.wire import Body, encode

logger = logging.getLogger(__name__)

DecodedT = TypeVar("DecodedT")


@dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float = 120.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0


UNRETRYABLE_ERROR_TYPES = frozenset({"non_finite_output"})
"""5xx a retry cannot fix: the model's weights give NaN or infinite logprobs until they change."""


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, httpx.UnsupportedProtocol):  # a URL without http://: no retry reaches it
        return False
    if isinstance(exc, httpx.TransportError):
        return True
    if not isinstance(exc, ServiceError):
        return False
    return exc.unreachable or (exc.status is not None and exc.status >= 500
                               and exc.error_type not in UNRETRYABLE_ERROR_TYPES)  # fmt: skip


def _reason(exc: Exception) -> str:
    """What went wrong, for a log line: some transport errors carry no message (a connection the
    server closed mid-request), and their class is all there is to say."""
    return str(exc) or type(exc).__name__


def _server_error(response: httpx.Response) -> tuple[str, str | None]:
    """(message, type) of the server's error envelope; the body's start when it is not one."""
    try:
        error = response.json()["error"]
        return str(error["message"]), error.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:500], None


ENGINE_SPANS_KEPT = 16384
"""Engine spans each client keeps per path, since a step's metrics read those of its own time: with
one request per prompt (vLLM samplers) a few steps' worth at batches of thousands of prompts;
beyond that the oldest drop out and a step's engine time comes out short."""


def busy_seconds(spans: Iterable[tuple[float, float]], window: tuple[float, float]) -> float:
    """How much of `window` the union of `spans` covers (each a (start, end) pair)."""
    low, high = window
    covered, reached = 0.0, low
    for start, end in sorted(span for span in spans if span[1] > low and span[0] < high):
        start, end = max(start, reached), min(end, high)
        if end > start:
            covered += end - start
            reached = end
    return covered


class _Client:
    error_cls: type[ServiceError] = ServiceError

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 300.0,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.engine_spans: defaultdict[str, deque[tuple[float, float]]] = defaultdict(
            partial(deque, maxlen=ENGINE_SPANS_KEPT)
        )
        """Per path, when the server's engine held this client's latest requests: (start, end) on
        the perf_counter clock, each as long as its reply reported (Server-Timing,
        opd.serving.with_engine_time) and ending when the reply had arrived, so later than the
        engine's true end by the reply's encoding and transfer."""
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # connect fails fast so a dead server is retried quickly; reads may take minutes.
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(timeout_s, connect=5.0), headers=headers, transport=transport
        )

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        deadline = time.monotonic() + self.retry.deadline_s
        backoff = self.retry.first_backoff_s
        while True:
            try:
                return await self._request_once(method, path, **kwargs)
            except (httpx.TransportError, ServiceError) as exc:
                if not _is_retryable(exc) or time.monotonic() + backoff > deadline:
                    raise self._give_up(path, exc) from exc
                logger.warning("%s %s%s failed (%s); retrying in %.1f s", self.error_cls.service, self.base_url, path,
                               _reason(exc), backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry.max_backoff_s)

    async def _request_once(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            message, error_type = _server_error(response)
            where = f"{self.error_cls.service} {self.base_url}{path}"
            raise self.error_cls(f"{where} answered {response.status_code}: {message}", status=response.status_code,
                                 error_type=error_type)  # fmt: skip
        seconds = engine_seconds(response.headers)
        if seconds is not None:
            arrived = time.perf_counter()
            self.engine_spans[path].append((arrived - seconds, arrived))
        return response

    def _give_up(self, path: str, exc: Exception) -> ServiceError:
        if isinstance(exc, ServiceError):
            return exc
        return self.error_cls(f"{self.error_cls.service} at {self.base_url}{path} unreachable: {exc!r}",
                              unreachable=_is_retryable(exc))  # fmt: skip

    async def _post(self, path: str, body: BaseModel) -> httpx.Response:
        # pydantic's Rust serialiser: json= would encode the token ids with Python's json module
        content = body.model_dump_json(exclude_none=True)
        return await self._request("POST", path, content=content, headers={"content-type": "application/json"})

    async def _post_model(self, path: str, body: BaseModel, reply: type[BaseModel]) -> BaseModel:
        return reply.model_validate_json((await self._post(path, body)).content)

    async def _post_for_tensors(
        self, path: str, body: BaseModel, decode: Callable[[bytes], DecodedT], what: str
    ) -> DecodedT:
        """POST `body` asking for a safetensors reply, read with `decode` (ValueError: not one)."""
        response = await self._post(path, body)
        try:
            return decode(response.content)
        except ValueError as exc:
            message = f"{self.error_cls.service} {path} answered with no {what} in safetensors: {exc}"
            raise self.error_cls(message) from exc

    async def info(self) -> InfoResponse:
        return InfoResponse.model_validate_json((await self._request("GET", "/v1/info")).content)

    async def logprobs(
        self, sequences: list[Sequence], top_k: int = 0, return_tokens: bool = False
    ) -> LogprobsResponse:
        """POST /v1/logprobs: the grader's teacher (or the sampler's student) scores given completions."""
        request = LogprobsRequest(sequences=sequences, top_k=top_k, return_tokens=return_tokens)
        reply = await self._post_model("/v1/logprobs", request, LogprobsResponse)
        assert isinstance(reply, LogprobsResponse)
        return reply

    async def logprobs_tensors(self, sequences: list[Sequence], top_k: int = 0) -> ScoredBatch:
        """POST /v1/logprobs with format safetensors: the same scores as flat tensors in request
        order (grader/tensors.py); what the learner asks for, a third of the bytes of JSON at top-k."""
        request = LogprobsRequest(sequences=sequences, top_k=top_k, format="safetensors")
        return await self._post_for_tensors("/v1/logprobs", request, tensors.decode, "scores")

    async def aclose(self) -> None:
        await self._http.aclose()


def _host_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (the same ones where they already are): what goes on the wire."""
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


class SamplerClient(_Client):
    error_cls = SamplerError

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """POST /v1/generate; with format safetensors the reply is read from flat tensors
        (sampler/samples.py) into the same GenerateResponse."""
        if request.format == "json":
            reply = await self._post_model("/v1/generate", request, GenerateResponse)
            assert isinstance(reply, GenerateResponse)
            return reply
        return await self._post_for_tensors("/v1/generate", request, samples_wire.decode, "samples")

    async def push_weights(
        self, tensors: dict[str, torch.Tensor], version: int, metadata: dict[str, str] | None = None
    ) -> int:
        """Stream `tensors` as one safetensors body; returns the sampler's new policy_version."""
        return await self.push_body(weights_body(tensors, metadata), version)

    async def push_body(self, body: Body, version: int) -> int:
        response = await self._request(
            "POST",
            "/v1/weights",
            params={"version": version},
            content=body,  # streamed from the tensors' memory; sent again whole if the push is retried
            headers={"content-type": "application/octet-stream", "content-length": str(body.size)},
        )
        return WeightsResponse.model_validate_json(response.content).policy_version

    async def push_shared(self, body: WeightsShared) -> int:
        """Have the sampler copy the weights out of the learner's buffer (sampler/shared.py)."""
        response = await self._request("POST", "/v1/weights", json=body.model_dump(exclude_none=True))
        return WeightsResponse.model_validate_json(response.content).policy_version

    async def push_path(self, path: str, version: int) -> int:
        """Have the sampler load the safetensors file at `path`, a name it can open as it is."""
        body = WeightsFromPath(path=path, version=version)
        response = await self._request("POST", "/v1/weights", json=body.model_dump())
        return WeightsResponse.model_validate_json(response.content).policy_version


def weights_body(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Body:
    """`tensors` as a safetensors body that shares their memory (`sampler/wire.py`); `metadata`
    goes into the header (a LoRA adapter's config)."""
    return encode(_host_tensors(tensors), metadata)


async def write_shared(
    tensors: dict[str, torch.Tensor], version: int, shared_dir: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write `tensors` to `shared_dir` under a temporary name, then rename: the file appears complete
    or not at all."""
    shared_dir.mkdir(parents=True, exist_ok=True)
    final = shared_dir / f"weights-v{version:06d}.safetensors"
    tmp = shared_dir / f".{final.name}.{os.getpid()}.tmp"
    await asyncio.to_thread(weights_body(tensors, metadata).write_to, tmp)
    os.replace(tmp, final)
    return final


def remove_older(shared_dir: Path, current: Path) -> None:
    """Drop earlier versions' files once the samplers have loaded `current`."""
    for old in shared_dir.glob("weights-v*.safetensors"):
        if old != current:
            old.unlink(missing_ok=True)


class GraderClient(_Client):
    error_cls = GraderError


ClientT = TypeVar("ClientT", bound=_Client)
ReplyT = TypeVar("ReplyT")

FAILOVER_DEADLINE_S = 5.0
"""With several replicas, a replica's own retries stop after this long and the request moves on
to the next replica (the dead one is being restarted by the watchdog meanwhile)."""
SET_ASIDE_S = 30.0
"""A replica that failed is asked last for this long, so that a replica that stays down (one this
learner did not start: no watchdog brings it back) does not cost every request its retries."""


class ReplicaPool(Generic[ClientT]):
    def __init__(self, clients: list[ClientT], deadline_s: float) -> None:
        self.clients = clients
        self.deadline_s = deadline_s
        self.outstanding = [0] * len(clients)
        self.served = [0] * len(clients)
        """Requests each replica has answered (how the load spread)."""
        self.failed_at = [-SET_ASIDE_S] * len(clients)
        """When each replica last failed a request (time.monotonic)."""

    def engine_busy(self, path: str, window: tuple[float, float]) -> float:
        """Seconds of `window` (start, end on the perf_counter clock) in which some replica's engine
        worked on this pool's `path` requests, as their replies reported it."""
        return busy_seconds((span for client in self.clients for span in client.engine_spans.get(path, ())), window)

    async def call(self, work: int, request: Callable[[ClientT], Awaitable[ReplyT]]) -> ReplyT:
        """`request` on the least-loaded replica; on an error retrying can fix, on the next one,
        round after round until the deadline. 4xx errors are raised at once."""
        deadline = time.monotonic() + self.deadline_s
        while True:
            error: ServiceError | None = None
            for index in self._in_order():
                self.outstanding[index] += work
                try:
                    reply = await request(self.clients[index])
                    self.served[index] += 1
                    return reply
                except ServiceError as exc:
                    if not _is_retryable(exc):
                        raise
                    error = exc
                    self.failed_at[index] = time.monotonic()
                    logger.warning("replica %s failed (%s); trying another", self.clients[index].base_url, _reason(exc))
                finally:
                    self.outstanding[index] -= work
            if error is not None and (len(self.clients) == 1 or time.monotonic() > deadline):
                raise error
            await asyncio.sleep(1.0)

    def _in_order(self) -> list[int]:
        """Replicas to ask, the least loaded first; those that failed lately after the others."""
        now = time.monotonic()
        return sorted(range(len(self.clients)),
                      key=lambda i: (now - self.failed_at[i] < SET_ASIDE_S, self.outstanding[i]))  # fmt: skip

    async def info(self) -> InfoResponse:
        """The first replica's /v1/info, once every replica's agrees on the model (see `infos`)."""
        return (await self.infos())[0]

    async def infos(self) -> list[InfoResponse]:
        """Every replica's /v1/info; they must serve the same model and tokenizer. Each replica gets
        the pool's whole deadline to answer (a replica may still be loading its model)."""
        infos = await asyncio.gather(*(self._info_of(client) for client in self.clients))
        first = infos[0]
        for client, info in zip(self.clients[1:], infos[1:], strict=True):
            if (info.model, info.tokenizer_hash, info.model_vocab_size) != (
                first.model, first.tokenizer_hash, first.model_vocab_size
            ):  # fmt: skip
                raise ServiceError(f"replica {client.base_url} serves {info.model}, the first one {first.model}: "
                                   "replicas of one service must serve the same model")  # fmt: skip
        return infos

    async def _info_of(self, client: ClientT) -> InfoResponse:
        deadline = time.monotonic() + self.deadline_s
        while True:
            try:
                return await client.info()
            except ServiceError as exc:
                if not _is_retryable(exc) or time.monotonic() > deadline:
                    raise

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def _clients(cls: type[ClientT], urls: list[str], timeout_s: float, retry: RetryPolicy, **kwargs: Any) -> list[ClientT]:
    """With several replicas each fails fast and the pool moves on; with one it keeps today's retries."""
    own = retry if len(urls) == 1 else replace(retry, deadline_s=min(FAILOVER_DEADLINE_S, retry.deadline_s))
    return [cls(url, timeout_s, own, **kwargs) for url in urls]


class SamplerPool(ReplicaPool[SamplerClient]):
    def __init__(self, urls: list[str], timeout_s: float, retry: RetryPolicy, api_key: str | None = None) -> None:
        super().__init__(_clients(SamplerClient, urls, timeout_s, retry, api_key=api_key), retry.deadline_s)
        self._buffer: WeightBuffer | None = None  # shared pushes: the weights the samplers copy from
        self._bufferless = False  # the buffer could not be made: shared pushes go over HTTP
        self._unshared: set[str] = set()  # samplers that refused a shared push: they get the body
        self._shared_file: Path | None = None  # the last push by path: removed at close (/dev/shm is RAM)
        self.latest_push: int | None = None
        """The learner sets it to the version of each push before it begins: no sampler of this
        learner can serve a newer one. None (the Python client's pools, which other writers may
        share): no version is refused for being newer."""

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """The reply of one replica; StaleSamplerError when it serves a version this learner never
        pushed (another learner's weights: it refused this one's pushes, or missed them)."""
        work = len(request.prompt_ids or request.messages or []) * request.n * request.max_tokens

        async def generate_on(client: SamplerClient) -> GenerateResponse:
            reply = await client.generate(request)
            if self.latest_push is not None and reply.policy_version > self.latest_push:
                raise StaleSamplerError(f"sampler {client.base_url} serves policy_version {reply.policy_version}, "
                                        f"newer than this learner's latest push ({self.latest_push}): another "
                                        "run's weights")  # fmt: skip
            return reply

        return await self.call(work, generate_on)

    async def push_weights(
        self, tensors: dict[str, torch.Tensor], version: int, metadata: dict[str, str] | None = None
    ) -> int:
        """The same safetensors body to every replica at once (see `_push_all`)."""
        body = weights_body(tensors, metadata)
        return await self._push_all(lambda client: client.push_body(body, version), version)

    async def push_weights_by_path(
        self, tensors: dict[str, torch.Tensor], version: int, shared_dir: Path, metadata: dict[str, str] | None = None
    ) -> int:
        """`tensors` written to `shared_dir` (see `write_shared`), loaded by every replica by path."""
        final = await write_shared(tensors, version, shared_dir, metadata)
        self._shared_file = final
        loaded = await self._push_all(lambda client: client.push_path(str(final.resolve()), version), version)
        remove_older(shared_dir, final)
        return loaded

    async def push_weights_in_memory(
        self, tensors: dict[str, torch.Tensor], version: int, metadata: dict[str, str] | None = None
    ) -> int:
        """Samplers on this host: the body copied once into an anonymous in-memory file, and its
        /proc path posted to every replica (`sampler/staging.py`); over HTTP where that file
        cannot be made, and to a replica that cannot open it (another PID namespace or host)."""
        body = weights_body(tensors, metadata)
        staged = await asyncio.to_thread(stage, *body.parts)
        if staged is None:
            logger.warning("cannot stage the weights in memory; pushing them over HTTP")
            return await self._push_all(lambda client: client.push_body(body, version), version)

        async def push(client: SamplerClient) -> int:
            try:
                return await client.push_path(staged.path, version)
            except SamplerError as exc:
                if exc.status != 400:  # a 400 on a path push: the sampler cannot open or read it
                    raise
                logger.warning("%s cannot read %s (%s); pushing over HTTP", client.base_url, staged.path, exc)
                return await client.push_body(body, version)

        try:
            return await self._push_all(push, version)
        finally:
            staged.close()

    async def push_weights_shared(self, tensors: dict[str, torch.Tensor], version: int) -> int:
        """Copy `tensors` into a buffer the samplers map, and post its layout (sampler/shared.py);
        over HTTP to a sampler that cannot map it (vLLM, another host, a GPU it cannot see), and
        to all where the buffer cannot be made."""
        if all(client.base_url in self._unshared for client in self.clients):  # no one would read the buffer
            return await self.push_weights(tensors, version)
        buffer = self._fill_buffer(tensors)
        if buffer is None:
            return await self.push_weights(tensors, version)
        body = WeightsShared(buffer=buffer.handle(), tensors=buffer.layout, version=version)

        async def push(client: SamplerClient) -> int:
            if client.base_url not in self._unshared:
                try:
                    return await client.push_shared(body)
                except SamplerError as exc:
                    if exc.status not in (400, 422):
                        raise
                    logger.warning("%s cannot copy from the learner's buffer (%s); pushing to it over HTTP",
                                   client.base_url, exc)  # fmt: skip
                    self._unshared.add(client.base_url)
            return await client.push_weights(tensors, version)

        return await self._push_all(push, version)

    def _fill_buffer(self, tensors: dict[str, torch.Tensor]) -> WeightBuffer | None:
        """The buffer, made (or made again, when the tensors' layout changed) and filled; None
        where it cannot be made."""
        if self._buffer is not None and not self._buffer.fits(tensors):
            self._buffer.close()
            self._buffer = None
        if self._buffer is None:
            if self._bufferless:
                return None
            try:
                self._buffer = WeightBuffer(layout_of(tensors), next(iter(tensors.values())).device)
            except (OSError, RuntimeError, ValueError, AttributeError) as exc:  # no memfd, no IPC, other dtypes
                logger.warning("cannot share the weights with the samplers (%s); pushing them over HTTP", exc)
                self._bufferless = True
                return None
        self._buffer.fill(tensors)
        return self._buffer

    async def aclose(self) -> None:
        await super().aclose()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        if self._shared_file is not None:  # every sampler has loaded it; the checkpoint keeps the weights
            self._shared_file.unlink(missing_ok=True)
            self._shared_file = None

    async def push_weights_by(
        self, transport: Transport, tensors: dict[str, torch.Tensor], version: int,
        metadata: dict[str, str] | None = None, shared_dir: Path | None = None,
    ) -> int:  # fmt: skip
        """One push by `transport`: `push_weights` (http), `push_weights_by_path` (path, into
        `shared_dir`), `push_weights_in_memory` (memory) or `push_weights_shared` (shared)."""
        if transport == "path":
            if shared_dir is None:
                raise ValueError("a push by path needs a shared_dir")
            return await self.push_weights_by_path(tensors, version, shared_dir, metadata)
        if transport == "memory":
            return await self.push_weights_in_memory(tensors, version, metadata)
        if transport == "shared" and metadata is None:  # (an adapter, small, goes over HTTP)
            return await self.push_weights_shared(tensors, version)
        return await self.push_weights(tensors, version, metadata)

    async def _push_all(self, push: Callable[[SamplerClient], Awaitable[int]], version: int) -> int:
        """Push to every replica in parallel. A replica that cannot be reached is left behind (it is
        down; when the watchdog brings it back it serves version 0, and its first reply sends the
        learner to push again). A replica that refuses the weights (4xx: they do not fit what it
        serves) fails the push: it would go on sampling with other weights. So does a push no
        replica took."""
        results = await asyncio.gather(*(push(client) for client in self.clients), return_exceptions=True)
        failed = [(c, r) for c, r in zip(self.clients, results, strict=True) if isinstance(r, BaseException)]
        for client, error in failed:
            if isinstance(error, ServiceError) and not _is_retryable(error):
                raise error
            logger.warning("weight push to %s failed: %s", client.base_url, error)
        if len(failed) == len(self.clients):
            raise failed[0][1]
        return version


class GraderPool(ReplicaPool[GraderClient]):
    def __init__(self, urls: list[str], timeout_s: float, retry: RetryPolicy) -> None:
        super().__init__(_clients(GraderClient, urls, timeout_s, retry), retry.deadline_s)

    async def logprobs_tensors(self, sequences: list[Sequence], top_k: int = 0) -> ScoredBatch:
        work = sum(len(s.prompt_ids or []) + len(s.completion_ids or []) for s in sequences)
        return await self.call(work, lambda client: client.logprobs_tensors(sequences, top_k))
