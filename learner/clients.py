"""Async HTTP clients of the sampler and grader, with the project's one retry policy.

Transport errors and 5xx are retried with exponential backoff until a total deadline; 4xx are
never retried (the request itself is wrong). A failure raises SamplerError / GraderError with the
status and the server's own message.
"""

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from pydantic import BaseModel
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from grader.schema import InfoResponse, LogprobsRequest, LogprobsResponse, Sequence
from opd.errors import GraderError, SamplerError, ServiceError
from sampler.schema import GenerateRequest, GenerateResponse, WeightsFromPath, WeightsResponse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float = 120.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ServiceError) and exc.status is not None and exc.status >= 500


def _server_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


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
                logger.warning("%s %s failed (%s); retrying in %.1f s", self.error_cls.service, path, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry.max_backoff_s)

    async def _request_once(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise self.error_cls(
                f"{self.error_cls.service} {path} answered {response.status_code}: {_server_message(response)}",
                status=response.status_code,
            )
        return response

    def _give_up(self, path: str, exc: Exception) -> ServiceError:
        if isinstance(exc, ServiceError):
            return exc
        return self.error_cls(f"{self.error_cls.service} at {self.base_url}{path} unreachable: {exc!r}")

    async def _post_model(self, path: str, body: BaseModel, reply: type[BaseModel]) -> BaseModel:
        # pydantic's Rust serialiser: json= would encode the token ids with Python's json module
        content = body.model_dump_json(exclude_none=True)
        response = await self._request("POST", path, content=content, headers={"content-type": "application/json"})
        return reply.model_validate_json(response.content)

    async def info(self) -> InfoResponse:
        return InfoResponse.model_validate_json((await self._request("GET", "/v1/info")).content)

    async def aclose(self) -> None:
        await self._http.aclose()


def _host_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: what safetensors can serialise."""
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


class SamplerClient(_Client):
    error_cls = SamplerError

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        reply = await self._post_model("/v1/generate", request, GenerateResponse)
        assert isinstance(reply, GenerateResponse)
        return reply

    async def push_weights(self, tensors: dict[str, torch.Tensor], version: int) -> int:
        """Stream `tensors` as one safetensors body; returns the sampler's new policy_version."""
        payload = await asyncio.to_thread(save_safetensors, _host_tensors(tensors))
        response = await self._request(
            "POST",
            "/v1/weights",
            params={"version": version},
            content=payload,
            headers={"content-type": "application/octet-stream"},
        )
        return WeightsResponse.model_validate_json(response.content).policy_version

    async def push_weights_by_path(self, tensors: dict[str, torch.Tensor], version: int, shared_dir: Path) -> int:
        """Write `tensors` to `shared_dir` (temporary name, then rename) and have the sampler load them.

        The rename makes the file appear complete or not at all; the previous version's file is
        removed once the sampler has loaded the new one.
        """
        shared_dir.mkdir(parents=True, exist_ok=True)
        final = shared_dir / f"weights-v{version:06d}.safetensors"
        tmp = shared_dir / f".{final.name}.{os.getpid()}.tmp"
        await asyncio.to_thread(save_file, _host_tensors(tensors), tmp)
        os.replace(tmp, final)
        body = WeightsFromPath(path=str(final.resolve()), version=version)
        response = await self._request("POST", "/v1/weights", json=body.model_dump())
        for old in shared_dir.glob("weights-v*.safetensors"):
            if old != final:
                old.unlink(missing_ok=True)
        return WeightsResponse.model_validate_json(response.content).policy_version


class GraderClient(_Client):
    error_cls = GraderError

    async def logprobs(self, sequences: list[Sequence], top_k: int = 0) -> LogprobsResponse:
        reply = await self._post_model("/v1/logprobs", LogprobsRequest(sequences=sequences, top_k=top_k),
                                       LogprobsResponse)  # fmt: skip
        assert isinstance(reply, LogprobsResponse)
        return reply
