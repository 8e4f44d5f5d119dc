"""Who may write weights, and how much a request may ask for: real servers on loopback."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from schemathesis.checks import not_a_server_error

from learner.clients import SamplerClient
from opd.errors import SamplerError
from opd.launch import LocalServer, local_server, local_servers
from opd.serving import MAX_JSON_BYTES
from tests.test_servers import SAFETENSORS, _new_student_weights

KEY = "s3cret-token"


def test_weight_push_needs_the_bearer_token_when_a_key_is_set(student_dir, tmp_path):
    body = save(_new_student_weights(seed=4))
    args = ["--model", str(student_dir), "--engine", "torch"]
    with local_server("sampler", args, tmp_path, env={"OPD_API_KEY": KEY}) as url:
        missing = httpx.post(f"{url}/v1/weights", content=body, headers=SAFETENSORS)
        wrong = httpx.post(f"{url}/v1/weights", content=body, headers=SAFETENSORS | {"authorization": "Bearer nope"})
        path_form = httpx.post(f"{url}/v1/weights", json={"path": "/etc/passwd"})
        assert httpx.get(f"{url}/v1/info").json()["policy_version"] == 0
        right = httpx.post(f"{url}/v1/weights", content=body, headers=SAFETENSORS | {"authorization": f"Bearer {KEY}"})
        # generation stays open: only the weight endpoint is guarded
        assert httpx.post(f"{url}/v1/generate", json={"prompt_ids": [[1, 2]], "max_tokens": 2}).status_code == 200

        async def push_with(key: str | None) -> int:
            client = SamplerClient(url, api_key=key)
            try:
                return await client.push_weights(_new_student_weights(seed=5), version=9)
            finally:
                await client.aclose()

        assert asyncio.run(push_with(KEY)) == 9
        with pytest.raises(SamplerError, match="401"):
            asyncio.run(push_with(None))
    assert (missing.status_code, wrong.status_code, path_form.status_code) == (401, 403, 401)
    assert missing.json()["error"]["param"] == "authorization"
    assert right.status_code == 200


def test_weights_come_as_octet_stream_or_json_and_nothing_else(servers):
    # A web page may post text, a form or a typeless blob to any origin without a CORS preflight:
    # none of them may replace the student of a sampler without a key (the default on loopback).
    url = servers[0]
    before = httpx.get(f"{url}/v1/info").json()["policy_version"]
    body = save(_new_student_weights(seed=4))
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]:
        headers = {"content-type": content_type} if content_type else {}
        response = httpx.post(f"{url}/v1/weights", content=body, headers=headers)
        assert response.status_code == 415, (content_type, response.text)
        assert response.json()["error"]["param"] == "body"
        assert "application/octet-stream" in response.json()["error"]["message"]
    # JSON is JSON whatever its case, and names its version in the body
    mixed_case = httpx.post(
        f"{url}/v1/weights", content=b'{"path": "/nowhere"}', headers={"content-type": "Application/JSON"}
    )
    assert (mixed_case.status_code, mixed_case.json()["error"]["param"]) == (400, "path")
    query_version = httpx.post(f"{url}/v1/weights", params={"version": 5}, json={"path": "/nowhere"})
    assert (query_version.status_code, query_version.json()["error"]["param"]) == (422, "version")
    for too_big in [httpx.post(f"{url}/v1/weights", params={"version": 2**63}, content=body, headers=SAFETENSORS),
                    httpx.post(f"{url}/v1/weights", json={"path": "/nowhere", "version": 2**63})]:  # fmt: skip
        assert too_big.status_code == 422, too_big.text
    assert httpx.get(f"{url}/v1/info").json()["policy_version"] == before


def test_sampler_refuses_to_listen_beyond_loopback_without_a_key(student_dir):
    result = subprocess.run(
        [sys.executable, "-m", "opd.cli", "sampler", "--model", str(student_dir), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "set OPD_API_KEY or --api-key-file" in result.stderr


def json_past_the_limit() -> Iterator[bytes]:
    """A JSON body streamed in 1 MiB chunks, 1 MiB longer than the servers' JSON limit."""
    yield b'{"sequences": ['
    for _ in range(MAX_JSON_BYTES // 2**20 + 1):
        yield b" " * 2**20
    yield b"]}"


def test_size_limits_answer_413(student_dir, teacher_dir, tmp_path):
    limits = ["--engine", "torch", "--max-request-sequences", "4"]
    sampler = LocalServer("sampler", ["--model", str(student_dir), *limits, "--max-weights-bytes", "1000"], tmp_path)
    grader = LocalServer("grader", ["--model", str(teacher_dir), *limits], tmp_path)
    with local_servers([sampler, grader]) as (sampler_url, grader_url):
        many = httpx.post(f"{sampler_url}/v1/generate", json={"prompt_ids": [[1], [2], [3]], "n": 2, "max_tokens": 1})
        weights = httpx.post(f"{sampler_url}/v1/weights", content=b"x" * 5000, headers=SAFETENSORS)
        sequences = [{"prompt_ids": [1], "completion_ids": [2]}] * 5
        graded = httpx.post(f"{grader_url}/v1/logprobs", json={"sequences": sequences})
        ok = httpx.post(f"{grader_url}/v1/logprobs", json={"sequences": sequences[:4]})
        chunked = httpx.post(f"{grader_url}/v1/logprobs", content=json_past_the_limit())  # no Content-Length
    assert (many.status_code, weights.status_code, graded.status_code, ok.status_code) == (413, 413, 413, 200)
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "too_large"
    assert many.json()["error"]["param"] == "n"
    assert graded.json()["error"]["param"] == "sequences"


# ---- schema-driven fuzzing: no 5xx, no answer slower than 2 s, every error in the envelope ---------


@pytest.fixture(scope="module")
def fuzz_servers(student_dir, teacher_dir, tmp_path_factory):
    # A short context and a small request cap keep every generated request cheap on CPU.
    limits = ["--engine", "torch", "--max-model-len", "48", "--max-request-sequences", "8"]
    logs = tmp_path_factory.mktemp("fuzz-logs")
    servers = [LocalServer("sampler", ["--model", str(student_dir), *limits], logs),
               LocalServer("grader", ["--model", str(teacher_dir), *limits], logs)]  # fmt: skip
    with local_servers(servers) as urls:
        yield urls


# OPD_FUZZ_EXAMPLES=2000 for a longer hunt than CI's
FUZZ = settings(
    max_examples=int(os.environ.get("OPD_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def error_in_the_envelope(ctx, response, case) -> None:
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


def answered_within_2_s(ctx, response, case) -> None:
    assert response.elapsed < 2.0, f"{case.operation.label} took {response.elapsed:.1f} s"


def fuzz(url: str) -> list[str]:
    """Run every operation of the server's OpenAPI schema on generated inputs; list what was fuzzed.

    Uses schemathesis's strategies under plain hypothesis (its pytest plugin does not load under
    this pytest); the checks: no 5xx, every error in the envelope, every answer within 2 s.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    fuzzed = []
    for result in schema.get_all_operations():
        operation = result.ok()

        # positive (schema-valid) and negative (schema-violating) inputs alike
        modes = [operation.as_strategy(mode) for mode in schemathesis.GenerationMode]

        @given(case=st.one_of(modes))
        @FUZZ
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error, error_in_the_envelope, answered_within_2_s], timeout=60)

        check()
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    return fuzzed


def test_sampler_fuzz_finds_no_server_error(fuzz_servers):
    assert sorted(fuzz(fuzz_servers[0])) == ["GET /health", "GET /v1/info", "POST /v1/generate", "POST /v1/logprobs",
                                            "POST /v1/weights"]  # fmt: skip


def test_grader_fuzz_finds_no_server_error(fuzz_servers):
    assert sorted(fuzz(fuzz_servers[1])) == ["GET /health", "GET /v1/info", "POST /v1/logprobs"]
