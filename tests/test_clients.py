"""The learner's retry policy, with faults injected at the transport (the servers are not mocked
anywhere else): 5xx and dropped connections are retried until the deadline, 4xx never."""

import asyncio
import time

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from grader.schema import Sequence
from learner.clients import GraderClient, RetryPolicy, SamplerClient, busy_seconds
from learner.services import check_context
from opd.errors import ConfigError, GraderError, SamplerError
from opd.serving import InfoResponse

FAST = RetryPolicy(deadline_s=1.0, first_backoff_s=0.05, max_backoff_s=0.2)
INFO = {"model": "m", "engine": "torch", "dtype": "float32", "vocab_size": 3, "tokenizer_hash": "h",
        "model_vocab_size": 3, "max_model_len": 8, "max_logprobs": 20, "policy_version": 0}  # fmt: skip


def client(cls, handler, calls: list) -> SamplerClient | GraderClient:
    def record(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        return handler(request, len(calls))

    return cls("http://fault.test", retry=FAST, transport=httpx.MockTransport(record))


def run(coro):
    return asyncio.run(coro)


def test_5xx_is_retried_until_it_succeeds():
    calls: list = []
    flaky = client(SamplerClient, lambda r, n: httpx.Response(503) if n < 3 else httpx.Response(200, json=INFO), calls)
    assert run(flaky.info()).model == "m"
    assert len(calls) == 3


def test_dropped_connections_are_retried_then_fail_naming_the_service():
    calls: list = []

    def drop(request: httpx.Request, n: int) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    grader = client(GraderClient, drop, calls)
    start = time.monotonic()
    with pytest.raises(GraderError, match=r"grader at http://fault.test/v1/info unreachable"):
        run(grader.info())
    assert len(calls) >= 3  # backoff 0.05, 0.1, 0.2, 0.2, ...
    assert time.monotonic() - start < FAST.deadline_s + 0.5  # the deadline holds


def test_a_retry_after_an_error_without_a_message_logs_its_kind(caplog):
    calls: list = []

    def dropped_once(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            raise httpx.RemoteProtocolError("", request=request)  # as httpx raises for a dropped connection
        return httpx.Response(200, json=INFO)

    assert run(client(SamplerClient, dropped_once, calls).info()).model == "m"
    assert "sampler http://fault.test/v1/info failed (RemoteProtocolError); retrying" in caplog.text


def test_4xx_is_never_retried_and_carries_the_server_message():
    calls: list = []
    error = {"error": {"message": "token id 9 is out of the vocabulary", "type": "invalid_request",
                       "param": "prompt_ids.0", "code": 400}}  # fmt: skip
    sampler = client(SamplerClient, lambda r, n: httpx.Response(400, json=error), calls)
    with pytest.raises(SamplerError, match="answered 400: token id 9 is out of the vocabulary") as info:
        run(sampler.info())
    assert info.value.status == 400
    assert len(calls) == 1


def test_a_5xx_no_retry_can_fix_and_a_url_without_a_scheme_fail_at_once():
    calls: list = []
    error = {"error": {"message": "the model produced non-finite logprobs; its weights overflow",
                       "type": "non_finite_output", "param": None, "code": 500}}  # fmt: skip
    sampler = client(SamplerClient, lambda r, n: httpx.Response(500, json=error), calls)
    with pytest.raises(SamplerError, match="non-finite logprobs") as info:
        run(sampler.info())
    assert (info.value.status, info.value.error_type, len(calls)) == (500, "non_finite_output", 1)
    started = time.monotonic()
    no_scheme = GraderClient("localhost:8002", retry=RetryPolicy(deadline_s=30))
    with pytest.raises(GraderError, match="unreachable"):
        run(no_scheme.info())
    assert time.monotonic() - started < 5


def test_persistent_5xx_fails_with_the_status_after_the_deadline():
    calls: list = []
    sampler = client(SamplerClient, lambda r, n: httpx.Response(500, json={"error": {"message": "boom"}}), calls)
    with pytest.raises(SamplerError, match="answered 500: boom") as info:
        run(sampler.info())
    assert info.value.status == 500
    assert len(calls) > 1


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(200, json={"results": [{"logprobs": [-1.0]}]}),  # a server that ignores format
        httpx.Response(200, content=save({"completion_lengths": torch.tensor([2]), "logprobs": torch.zeros(3)})),
        httpx.Response(200, content=save({"logprobs": torch.zeros(1)})),
    ],
)
def test_a_tensor_reply_that_is_not_the_scores_asked_for_is_a_grader_error(reply):
    grader = client(GraderClient, lambda r, n: reply, [])
    sequence = Sequence(prompt_ids=[1], completion_ids=[2])
    with pytest.raises(GraderError, match="no scores in safetensors"):
        run(grader.logprobs_tensors([sequence]))


@settings(max_examples=300, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)).map(sorted).map(tuple), max_size=12),
    window=st.tuples(st.integers(0, 40), st.integers(0, 40)).map(sorted).map(tuple),
)
def test_busy_seconds_is_the_length_of_the_spans_union_inside_the_window(spans, window):
    """Against counting, unit by unit, the moments that some span covers (integer ends, so the
    reference is exact)."""
    covered = sum(1 for t in range(window[0], window[1]) if any(a <= t < b for a, b in spans))
    assert busy_seconds([(float(a), float(b)) for a, b in spans], (float(window[0]), float(window[1]))) == covered


def test_a_run_whose_longest_prompt_and_samples_pass_a_servers_context_fails_at_start():
    sampler = InfoResponse.model_validate(INFO | {"max_model_len": 1024})
    grader = InfoResponse.model_validate(INFO | {"engine": "vllm", "max_model_len": 1023})
    check_context((1000, 23), sampler, grader)  # 1023 tokens: both take it
    with pytest.raises(ConfigError, match=r"1000 tokens\) plus up to 24 .* grader's \(m, vllm\) context of 1023"):
        check_context((1000, 24), sampler, grader)
    with pytest.raises(ConfigError, match=r"sampler's .*: lower sampling\.max_tokens"):
        check_context((1000, 25), sampler, grader)
    with pytest.raises(ConfigError, match=r"context of 1024 tokens: shorten the prompt \(data.max_prompt_tokens"):
        check_context((1500, 24), sampler, grader)  # the prompt alone is too long: fewer samples cannot help
