"""Python clients of the sampler and the grader: the ones the learner uses, synchronous.

    from opd.client import GraderClient, SamplerClient

    with GraderClient("http://localhost:8002") as grader:
        reply = grader.logprobs([{"prompt": "what is 2 + 3?", "completion": "5"}], return_tokens=True)
        print(reply.results[0].tokens, reply.results[0].logprobs)

    with SamplerClient("http://localhost:8001") as sampler:
        reply = sampler.generate(messages=[[{"role": "user", "content": "hi"}]], max_tokens=16, seed=1)

Each wraps the learner's async client (`learner/clients.py`) on an event loop of its own, so both
share one retry policy (transport errors and 5xx retried with backoff until `retry_deadline_s`,
4xx never: the request itself is wrong) and one bearer-token auth (the sampler's weight pushes).
Failures raise `opd.errors.GraderError` / `SamplerError` carrying the status and the server's message.
"""

import asyncio
from collections.abc import Coroutine
from collections.abc import Sequence as Sequence_
from pathlib import Path
from typing import Any, TypeVar

import torch

from grader.schema import LogprobsResponse, Sequence
from grader.tensors import ScoredBatch
from learner.clients import GraderClient as AsyncGraderClient
from learner.clients import RetryPolicy, SamplerPool
from learner.clients import SamplerClient as AsyncSamplerClient
from learner.config import Transport
from opd.auth import load_api_key
from opd.serving import InfoResponse
from sampler.schema import GenerateRequest, GenerateResponse

T = TypeVar("T")
SequenceLike = Sequence | dict[str, Any]
"""A sequence to score: the wire model, or a dict with its fields (`prompt`/`prompt_ids`/`messages`,
`completion`/`completion_ids`, optional `candidate_ids`)."""


def _wire_sequences(sequences: Sequence_[SequenceLike]) -> list[Sequence]:
    """Dicts validated into the wire model (a bad one fails here, before anything is sent)."""
    return [s if isinstance(s, Sequence) else Sequence.model_validate(s) for s in sequences]


class _SyncClient:
    def __init__(self, client: AsyncGraderClient | AsyncSamplerClient) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = client

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(call)

    def info(self) -> InfoResponse:
        """GET /v1/info: model, engine, tokenizer fingerprint, context, policy_version."""
        return self._run(self._client.info())

    def logprobs(
        self, sequences: Sequence_[SequenceLike], *, top_k: int = 0, return_tokens: bool = False
    ) -> LogprobsResponse:
        """POST /v1/logprobs: the logprob of every completion token (and the top-k, the token strings)."""
        return self._run(self._client.logprobs(_wire_sequences(sequences), top_k, return_tokens))

    def logprobs_tensors(self, sequences: Sequence_[SequenceLike], *, top_k: int = 0) -> ScoredBatch:
        """POST /v1/logprobs with format safetensors: the same scores as flat tensors in request
        order (`grader/tensors.py`); sequences as ids. A third of JSON's bytes at top-k."""
        return self._run(self._client.logprobs_tensors(_wire_sequences(sequences), top_k))

    def close(self) -> None:
        self._run(self._client.aclose())
        self._loop.close()

    def __enter__(self) -> "_SyncClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class GraderClient(_SyncClient):
    """The grader (teacher): `logprobs` and `info`."""

    def __init__(self, url: str, *, timeout_s: float = 300.0, retry_deadline_s: float = 120.0) -> None:
        super().__init__(AsyncGraderClient(url, timeout_s, RetryPolicy(deadline_s=retry_deadline_s)))

    def __enter__(self) -> "GraderClient":
        return self


class SamplerClient(_SyncClient):
    """The sampler (student): `generate`, `logprobs`, `push_weights` and `info`. `api_key` (else
    $OPD_API_KEY) is the bearer token weight pushes need when the sampler has one."""

    def __init__(
        self, url: str, *, timeout_s: float = 300.0, retry_deadline_s: float = 120.0, api_key: str | None = None
    ) -> None:
        # a pool of one: the learner's pushes (over HTTP, by path, through memory, shared) as they are
        self._pool = SamplerPool([url], timeout_s, RetryPolicy(deadline_s=retry_deadline_s),
                                 api_key or load_api_key(None))  # fmt: skip
        self._sampler = self._pool.clients[0]
        super().__init__(self._sampler)

    def __enter__(self) -> "SamplerClient":
        return self

    def close(self) -> None:
        self._run(self._pool.aclose())  # its client, and the buffer of shared pushes
        self._loop.close()

    def generate(self, request: GenerateRequest | None = None, **fields: Any) -> GenerateResponse:
        """POST /v1/generate with a request, or its fields: `prompt_ids` or `messages`, `n`,
        `temperature`, `top_p`, `max_tokens`, `seed`, `top_logprobs`."""
        return self._run(self._sampler.generate(request or GenerateRequest(**fields)))

    def push_weights(
        self, tensors: dict[str, torch.Tensor], version: int, *, shared_dir: str | Path | None = None,
        in_memory: bool = False, shared: bool = False, metadata: dict[str, str] | None = None,
    ) -> int:  # fmt: skip
        """POST /v1/weights; returns the sampler's new policy_version. The tensors go as a
        safetensors body (streamed from their memory), or written to `shared_dir` and loaded by
        path (each file removed at the next push, the last when the client closes), or with
        `in_memory` (a sampler on this host) copied once into an anonymous in-memory file whose
        /proc path the sampler opens, or with `shared` (a torch sampler on this host: the fastest,
        sampler/shared.py) copied into a buffer this client keeps until it closes, which the
        sampler maps and copies from; over HTTP where the sampler cannot."""
        if (shared_dir is not None) + in_memory + shared > 1:
            raise ValueError("push_weights: one of shared_dir, in_memory and shared")
        transport: Transport = (
            "path" if shared_dir is not None else "memory" if in_memory else "shared" if shared else "http"
        )
        folder = None if shared_dir is None else Path(shared_dir)
        return self._run(self._pool.push_weights_by(transport, tensors, version, metadata, folder))
