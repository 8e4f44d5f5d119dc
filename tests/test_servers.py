"""The sampler and grader as real uvicorn processes on loopback, driven over HTTP."""

import asyncio
import json
import os
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save, save_file
from transformers import AutoTokenizer

import learner.clients
from grader.schema import LogprobsResponse, Sequence
from learner.clients import GraderPool, RetryPolicy, SamplerPool
from opd.client import SamplerClient
from opd.launch import bind_listener, local_server
from opd.serving import engine_seconds
from opd.tiny import build_model, build_tokenizer
from sampler.schema import GenerateRequest, GenerateResponse, SharedBuffer
from sampler.shared import WeightBuffer, layout_of
from sampler.staging import ProcFile, stage
from tests import reference

# 500 and 470 are padded ids: the tiny models have 512 vocabulary rows for 456 tokenizer tokens,
# as Qwen2.5 has 151,936 for 151,665; every engine must take them like any other id.
PROMPTS = [[1, 365, 201, 89, 332], [1, 67, 360, 201, 44, 45, 46, 47, 48], [5, 500, 6]]
EOS = {0, 2}
SAFETENSORS = {"content-type": "application/octet-stream"}
"""The headers of a push of safetensors bytes (the sampler refuses a body of any other type)."""


def generate(url: str, **body) -> GenerateResponse:
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return GenerateResponse.model_validate(response.json())


# ---- sampler ------------------------------------------------------------------------------------


def test_generate_returns_n_completions_with_logprobs(servers):
    sampler_url, _ = servers
    reply = generate(sampler_url, prompt_ids=PROMPTS, n=3, temperature=1.0, max_tokens=12, seed=7)
    assert reply.policy_version == 0
    assert [r.prompt_ids for r in reply.results] == PROMPTS
    for result in reply.results:
        assert len(result.completions) == 3
        for c in result.completions:
            assert 1 <= len(c.completion_ids) <= 12
            assert len(c.logprobs) == len(c.completion_ids)
            assert c.finish_reason == ("stop" if c.completion_ids[-1] in EOS else "length")
    # samples of one prompt differ (one seed per request does not collapse them)
    assert len({tuple(c.completion_ids) for c in reply.results[0].completions}) > 1


def test_same_seed_same_samples(servers):
    sampler_url, _ = servers
    a = generate(sampler_url, prompt_ids=PROMPTS, n=2, temperature=1.0, max_tokens=8, seed=11)
    b = generate(sampler_url, prompt_ids=PROMPTS, n=2, temperature=1.0, max_tokens=8, seed=11)
    c = generate(sampler_url, prompt_ids=PROMPTS, n=2, temperature=1.0, max_tokens=8, seed=12)
    assert a == b
    assert a != c


def test_sampled_logprobs_match_a_direct_forward(servers, student_dir):
    # At temperature 1 and top_p 1 the sampled distribution is the model's own.
    sampler_url, _ = servers
    reply = generate(sampler_url, prompt_ids=PROMPTS, n=2, temperature=1.0, max_tokens=10, seed=3)
    model = reference.load(student_dir)
    for prompt, result in zip(PROMPTS, reply.results, strict=True):
        for c in result.completions:
            want = reference.token_logprobs(model, prompt, c.completion_ids)
            assert c.logprobs == pytest.approx(want, abs=1e-4)


def test_temperature_logprobs_are_of_the_sampled_distribution(servers, student_dir):
    sampler_url, _ = servers
    reply = generate(sampler_url, prompt_ids=PROMPTS[:1], n=1, temperature=0.5, max_tokens=6, seed=5)
    model = reference.load(student_dir)
    completion = reply.results[0].completions[0]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + completion.completion_ids])).logits[0].double() / 0.5
    logprobs = torch.log_softmax(logits, -1)
    want = [logprobs[len(PROMPTS[0]) + i - 1, t].item() for i, t in enumerate(completion.completion_ids)]
    assert completion.logprobs == pytest.approx(want, abs=1e-4)


def check_top_logprobs(reply: GenerateResponse, model, temperature: float, k: int) -> None:
    """Each position's top ids and logprobs are those of the tempered distribution sampled from."""
    for prompt, result in zip(PROMPTS, reply.results, strict=True):
        for c in result.completions:
            assert c.top_ids is not None and c.top_logprobs is not None
            assert len(c.top_ids) == len(c.completion_ids)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + c.completion_ids])).logits[0].double() / temperature
            logprobs = torch.log_softmax(logits, -1)
            for i, (ids, values) in enumerate(zip(c.top_ids, c.top_logprobs, strict=True)):
                want = logprobs[len(prompt) + i - 1].topk(k)
                assert ids == want.indices.tolist()
                assert values == pytest.approx(want.values.tolist(), abs=1e-4)


def test_top_logprobs_are_the_sampled_distributions_head(servers, student_dir):
    sampler_url, _ = servers
    reply = generate(sampler_url, prompt_ids=PROMPTS, n=2, temperature=0.7, max_tokens=6, seed=4, top_logprobs=5)
    check_top_logprobs(reply, reference.load(student_dir), 0.7, 5)
    plain = generate(sampler_url, prompt_ids=PROMPTS, n=2, temperature=0.7, max_tokens=6, seed=4)
    assert all(c.top_ids is None for r in plain.results for c in r.completions)
    # the same draws either way: asking for the head changes nothing else
    assert [c.completion_ids for r in plain.results for c in r.completions] == [
        c.completion_ids for r in reply.results for c in r.completions
    ]


def test_greedy_matches_reference_decoding(servers, student_dir):
    sampler_url, _ = servers
    reply = generate(sampler_url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=10)
    model = reference.load(student_dir)
    for prompt, result in zip(PROMPTS, reply.results, strict=True):
        assert result.completions[0].completion_ids == reference.greedy(model, prompt, 10, EOS)


def test_a_vanishing_temperature_is_greedy_not_an_overflow(servers):
    sampler_url, _ = servers
    greedy = generate(sampler_url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=10)
    for temperature in (5e-324, 1e-300, 9e-6):  # 5e-324 made the torch engine answer 500
        tiny = generate(sampler_url, prompt_ids=PROMPTS, n=1, temperature=temperature, top_p=5e-324, max_tokens=10)
        assert tiny.results == greedy.results


def test_a_vanishing_top_p_keeps_the_top_token(servers):
    sampler_url, _ = servers
    greedy = generate(sampler_url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=10)
    for top_p in (1e-147, 1e-30):  # 1e-147 rounds to 0 in float32: every token was dropped, a 500
        nucleus = generate(sampler_url, prompt_ids=PROMPTS, n=2, temperature=2.0, top_p=top_p, max_tokens=10, seed=1)
        for g, r in zip(greedy.results, nucleus.results, strict=True):
            for completion in r.completions:  # one token left to draw from: the argmax, with logprob 0
                assert completion.completion_ids == g.completions[0].completion_ids
                assert completion.logprobs == [0.0] * len(completion.logprobs)


def test_chat_messages_are_templated_by_the_sampler(servers, student_dir):
    sampler_url, _ = servers
    messages = [{"role": "user", "content": "what is 1 + 2?"}]
    reply = generate(sampler_url, messages=[messages], n=1, temperature=0.0, max_tokens=4)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert reply.results[0].prompt_ids == list(want)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt_ids": [[1, 2, 9999]]}, 400, "prompt_ids.0"),
        ({"prompt_ids": [[1, -2]]}, 422, "prompt_ids.0.1"),
        ({"prompt_ids": []}, 422, "prompt_ids"),
        ({"prompt_ids": [[]]}, 422, "prompt_ids.0"),
        ({"prompt_ids": [[1]], "bogus": 1}, 422, "bogus"),
        ({"prompt_ids": [[1]], "temperature": "hot"}, 422, "temperature"),
        ('{"prompt_ids": [[1]], "temperature": NaN}', 422, "temperature"),  # raw JSON text: non-finite
        ('{"prompt_ids": [[1]], "top_p": Infinity}', 422, "top_p"),
        ('{"prompt_ids": [[1]', 422, "body"),  # not JSON at all
        ({"prompt_ids": [[1.5]]}, 422, "prompt_ids.0.0"),
        ({"prompt_ids": [[1]], "max_tokens": 5000}, 400, "prompt_ids.0"),
        ({"prompt_ids": [[1]], "messages": [[{"role": "user", "content": "x"}]]}, 422, "body"),  # one or the other
    ],
)
def test_generate_rejects_bad_input_naming_the_field(servers, body, status, param):
    sampler_url, _ = servers
    if isinstance(body, str):
        response = httpx.post(f"{sampler_url}/v1/generate", content=body, timeout=30,
                              headers={"content-type": "application/json"})  # fmt: skip
    else:
        response = httpx.post(f"{sampler_url}/v1/generate", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]


# ---- grader -------------------------------------------------------------------------------------

SEQUENCES = [
    {"prompt_ids": [1, 365, 201, 89], "completion_ids": [332, 426, 223, 2]},
    {"prompt_ids": [1, 67, 360, 201, 44, 45, 46, 47, 48, 49, 50], "completion_ids": [19]},
    {"prompt_ids": [5, 500], "completion_ids": [6, 7, 470, 9, 10, 511, 12]},
]


def test_grader_logprobs_match_a_direct_forward(servers, teacher_dir):
    _, grader_url = servers
    response = httpx.post(f"{grader_url}/v1/logprobs", json={"sequences": SEQUENCES, "top_k": 3}, timeout=60)
    assert response.status_code == 200, response.text
    reply = LogprobsResponse.model_validate(response.json())
    model = reference.load(teacher_dir)
    for seq, scored in zip(SEQUENCES, reply.results, strict=True):
        want = reference.token_logprobs(model, seq["prompt_ids"], seq["completion_ids"])
        assert scored.logprobs == pytest.approx(want, abs=1e-4)
        assert len(scored.top_ids) == len(seq["completion_ids"])
        for token, logprob, ids, top in zip(
            seq["completion_ids"], scored.logprobs, scored.top_ids, scored.top_logprobs, strict=True
        ):
            assert top == sorted(top, reverse=True)
            assert logprob <= top[0] + 1e-6
            if token in ids:
                assert top[ids.index(token)] == pytest.approx(logprob, abs=1e-5)


def test_replies_report_their_engines_share_of_the_round_trip(servers):
    """/v1/generate and /v1/logprobs (JSON and safetensors, on both servers) say in Server-Timing
    how long their engine took: more than nothing, less than the whole round trip."""
    sampler_url, grader_url = servers
    asked = [
        (sampler_url, "/v1/generate", {"prompt_ids": PROMPTS, "n": 2, "max_tokens": 8, "seed": 1}),
        (grader_url, "/v1/logprobs", {"sequences": SEQUENCES, "top_k": 3}),
        (grader_url, "/v1/logprobs", {"sequences": SEQUENCES, "top_k": 3, "format": "safetensors"}),
        (sampler_url, "/v1/logprobs", {"sequences": SEQUENCES}),
    ]
    for url, path, body in asked:
        started = time.perf_counter()
        response = httpx.post(f"{url}{path}", json=body, timeout=60)
        round_trip = time.perf_counter() - started
        assert response.status_code == 200, response.text
        seconds = engine_seconds(response.headers)
        assert seconds is not None and 0 < seconds < round_trip, (path, response.headers.get("server-timing"))
    refused = httpx.post(f"{sampler_url}/v1/generate", json={"prompt_ids": PROMPTS, "n": 0}, timeout=60)
    assert refused.status_code == 422 and engine_seconds(refused.headers) is None


def test_the_learners_pools_know_when_their_servers_engines_worked(servers):
    """Each reply's engine time, placed before its arrival: inside its own round trip, none of it
    in the next one's."""
    sampler_url, grader_url = servers

    async def run() -> list[float]:
        samplers = SamplerPool([sampler_url], 60.0, RetryPolicy())
        graders = GraderPool([grader_url], 60.0, RetryPolicy())
        try:
            started = time.perf_counter()
            await samplers.generate(GenerateRequest(prompt_ids=PROMPTS, max_tokens=8, seed=3))
            generated = time.perf_counter()
            await graders.logprobs_tensors([Sequence(**seq) for seq in SEQUENCES])
            graded = time.perf_counter()
            return [
                samplers.engine_busy("/v1/generate", (started, generated)) / (generated - started),
                graders.engine_busy("/v1/logprobs", (generated, graded)) / (graded - generated),
                samplers.engine_busy("/v1/generate", (generated, graded)),
                graders.engine_busy("/v1/logprobs", (started, generated)),
            ]
        finally:
            await samplers.aclose()
            await graders.aclose()

    generating, grading, sampler_after, grader_before = asyncio.run(run())
    assert 0 < generating < 1 and 0 < grading < 1
    assert sampler_after == grader_before == 0.0


def test_the_servers_connections_send_at_once_under_plain_asyncio():
    """Nagle is off on a server's accepted connections without uvloop too (uvloop turns it off
    itself): asyncio sets TCP_NODELAY only where the listening socket says IPPROTO_TCP. With Nagle
    on, uvicorn's h11 protocol sent a small reply's body only after the client's delayed ACK of its
    headers, 43 ms later."""
    listener = bind_listener("127.0.0.1", 0)

    async def nagle_off_on_accept() -> int:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[int] = loop.create_future()

        class Accepted(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Accepted, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()

    assert asyncio.run(nagle_off_on_accept()) != 0


def test_server_timing_is_read_as_the_w3c_header_writes_it():
    headers = httpx.Headers({"Server-Timing": 'queue;dur=3, engine;desc="forward";dur=12.5, total;dur=20'})
    assert engine_seconds(headers) == pytest.approx(0.0125)
    assert engine_seconds(httpx.Headers({"server-timing": "engine;dur=1.5"})) == pytest.approx(0.0015)
    for header in ({}, {"server-timing": "total;dur=4"}, {"server-timing": "engine"}, {"server-timing": "engine;dur="}):
        assert engine_seconds(httpx.Headers(header)) is None
    for dur in ("inf", "nan", "-1"):  # no span that covers every window, or breaks their order
        assert engine_seconds(httpx.Headers({"server-timing": f"engine;dur={dur}"})) is None


def test_grader_batches_in_chunks_without_changing_results(teacher_dir, tmp_path):
    # A token budget of 16 forces one sequence per forward; results must equal the direct forward.
    with local_server(
        "grader", ["--model", str(teacher_dir), "--engine", "torch", "--max-batch-tokens", "16"], tmp_path
    ) as url:
        response = httpx.post(f"{url}/v1/logprobs", json={"sequences": SEQUENCES}, timeout=60)
    model = reference.load(teacher_dir)
    for seq, scored in zip(SEQUENCES, response.json()["results"], strict=True):
        assert scored["logprobs"] == pytest.approx(
            reference.token_logprobs(model, seq["prompt_ids"], seq["completion_ids"]), abs=1e-4
        )
        assert scored.get("top_ids") is None


def candidate_rows(seq: dict, width: int, offset: int) -> list[list[int]]:
    """Per completion position, `width` distinct ids (padded ids among them), the actual token first."""
    return [[t] + [(t + offset + 37 * j) % 512 for j in range(1, width)] for t in seq["completion_ids"]]


def check_candidates(url: str, teacher_dir) -> None:
    sequences = [dict(seq, candidate_ids=candidate_rows(seq, 4, i)) for i, seq in enumerate(SEQUENCES)]
    response = httpx.post(f"{url}/v1/logprobs", json={"sequences": sequences, "top_k": 2}, timeout=120)
    assert response.status_code == 200, response.text
    model = reference.load(teacher_dir)
    for seq, scored in zip(sequences, LogprobsResponse.model_validate(response.json()).results, strict=True):
        with torch.no_grad():
            full = torch.log_softmax(
                model(torch.tensor([seq["prompt_ids"] + seq["completion_ids"]])).logits[0].double(), -1
            )
        assert scored.candidate_logprobs is not None and len(scored.top_ids) == len(seq["completion_ids"])
        for i, (ids, values) in enumerate(zip(seq["candidate_ids"], scored.candidate_logprobs, strict=True)):
            assert values == pytest.approx(full[len(seq["prompt_ids"]) + i - 1, ids].tolist(), abs=1e-4)
            assert values[0] == pytest.approx(scored.logprobs[i], abs=1e-5)  # the actual token, asked again
    check_tensor_reply(url, {"sequences": sequences, "top_k": 2}, LogprobsResponse.model_validate(response.json()))


def check_tensor_reply(url: str, body: dict, json_reply: LogprobsResponse) -> None:
    """The same request with format safetensors: the same numbers, flat in request order (read
    with the safetensors library itself, as a user would)."""
    response = httpx.post(f"{url}/v1/logprobs", json=body | {"format": "safetensors"}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.opd.logprobs+safetensors"
    wire = load_safetensors(response.content)
    results = json_reply.results
    assert wire["completion_lengths"].tolist() == [len(r.logprobs) for r in results]
    assert wire["logprobs"].tolist() == [x for r in results for x in r.logprobs]
    assert wire["top_ids"].dtype == torch.int32
    assert wire["top_ids"].tolist() == [row for r in results for row in r.top_ids or []]
    assert wire["top_logprobs"].tolist() == [row for r in results for row in r.top_logprobs or []]
    assert wire["candidate_logprobs"].tolist() == [row for r in results for row in r.candidate_logprobs or []]


def test_grader_scores_candidate_ids_at_every_position(servers, teacher_dir):
    check_candidates(servers[1], teacher_dir)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"sequences": []}, 422, "sequences"),
        ({"sequences": [{"prompt_ids": [1], "completion_ids": [2, 3], "candidate_ids": [[4]]}]}, 422, "sequences.0"),
        (
            {"sequences": [{"prompt_ids": [1], "completion_ids": [2, 3], "candidate_ids": [[4], [5, 6]]}]},
            422,
            "sequences.0",
        ),
        (
            {"sequences": [{"prompt_ids": [1], "completion_ids": [2], "candidate_ids": [[512]]}]},
            400,
            "sequences.0.candidate_ids",
        ),
        (
            {"sequences": [{"prompt_ids": [1], "completion_ids": [2], "candidate_ids": [list(range(21))]}]},
            422,
            "sequences.0.candidate_ids",
        ),
        ({"sequences": [{"prompt_ids": [1], "completion_ids": [512]}]}, 400, "sequences.0.completion_ids"),
        ({"sequences": [{"prompt_ids": [1], "completion_ids": []}]}, 422, "sequences.0.completion_ids"),
        ({"sequences": [{"prompt_ids": [1] * 1000, "completion_ids": [1] * 100}]}, 400, "sequences.0"),
        ({"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "top_k": 21}, 422, "top_k"),
        ({"sequences": "nope"}, 422, "sequences"),
        ({"sequences": [{"prompt": "hi", "completion_ids": [2]}], "format": "safetensors"}, 422, "format"),
        (
            {"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "format": "safetensors", "return_tokens": True},
            422,
            "format",
        ),
        (
            {
                "sequences": [
                    {"prompt_ids": [1], "completion_ids": [2], "candidate_ids": [[3]]},
                    {"prompt_ids": [1], "completion_ids": [2]},
                ],
                "format": "safetensors",
            },
            422,
            "format",
        ),
        ({"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "format": "msgpack"}, 422, "format"),
    ],
)
def test_logprobs_rejects_bad_input_naming_the_field(servers, body, status, param):
    _, grader_url = servers
    response = httpx.post(f"{grader_url}/v1/logprobs", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_the_openapi_documents_describe_the_json_bodies_the_routes_parse_themselves(servers):
    """The bodies the routes read themselves (`parse_json`) are named schemas under components,
    as FastAPI's own bodies would be, so that client generators name their types."""
    sampler_url, grader_url = servers
    documents = {url: httpx.get(f"{url}/openapi.json").json() for url in servers}

    def body(url: str, path: str) -> dict:
        document = documents[url]
        ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.removeprefix("#/components/schemas/")
        return {"name": name, **document["components"]["schemas"][name]}

    generate = body(sampler_url, "/v1/generate")
    assert generate["name"] == "GenerateRequest"
    assert {"prompt_ids", "messages", "n", "top_logprobs"} <= set(generate["properties"])
    for url in (sampler_url, grader_url):
        logprobs = body(url, "/v1/logprobs")
        assert logprobs["name"] == "LogprobsRequest"
        sequence_ref = logprobs["properties"]["sequences"]["items"]["$ref"]
        sequence = documents[url]["components"]["schemas"][sequence_ref.removeprefix("#/components/schemas/")]
        assert {"prompt_ids", "completion_ids", "candidate_ids"} <= set(sequence["properties"])
    weights = documents[sampler_url]["paths"]["/v1/weights"]["post"]["requestBody"]["content"]
    assert {ref["$ref"] for ref in weights["application/json"]["schema"]["oneOf"]} == {
        "#/components/schemas/WeightsFromPath", "#/components/schemas/WeightsShared"}  # fmt: skip
    assert "application/octet-stream" in weights
    for document in documents.values():  # every reference resolves
        for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document)):
            assert ref in document["components"]["schemas"], ref


def test_info_reports_the_same_tokenizer_for_student_and_teacher(servers, student_dir):
    sampler_info = httpx.get(f"{servers[0]}/v1/info").json()
    grader_info = httpx.get(f"{servers[1]}/v1/info").json()
    assert sampler_info["tokenizer_hash"] == grader_info["tokenizer_hash"]
    # Like Qwen2.5, the embedding (512 rows) is larger than the tokenizer.
    assert sampler_info["vocab_size"] == grader_info["vocab_size"] == len(AutoTokenizer.from_pretrained(student_dir))
    assert sampler_info["model_vocab_size"] == 512
    assert (sampler_info["engine"], sampler_info["max_model_len"]) == ("torch", 1024)
    assert "max_lora_rank" not in sampler_info and "max_lora_rank" not in grader_info  # null fields are left out


# ---- weight push --------------------------------------------------------------------------------


def _with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of `tensor` with one entry, in the middle, set to `value`."""
    out = tensor.clone()
    out.view(-1)[out.numel() // 2] = value
    return out


def _new_student_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model("student", build_tokenizer())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _model_with(student_dir: Path, weights: dict[str, torch.Tensor]):
    model = reference.load(student_dir)
    missing = model.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys
    return model


def _greedy_all(url: str) -> list[list[int]]:
    reply = generate(url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=10)
    return [r.completions[0].completion_ids for r in reply.results]


def test_the_learners_pool_pushes_through_memory_and_over_http_where_memory_fails(student_dir, tmp_path, monkeypatch):
    first, second = _new_student_weights(seed=7), _new_student_weights(seed=8)

    async def push_thrice(url: str) -> list[list[list[int]]]:
        pool = SamplerPool([url], timeout_s=60, retry=RetryPolicy(deadline_s=5))
        try:
            assert await pool.push_weights_in_memory(first, 1) == 1
            served = [_greedy_all(url)]
            monkeypatch.setattr(learner.clients, "stage", lambda *parts: None)  # injected fault: no memfd
            assert await pool.push_weights_in_memory(second, 2) == 2
            served.append(_greedy_all(url))
            # injected fault: a sampler in another PID namespace cannot open the learner's /proc path
            monkeypatch.setattr(learner.clients, "stage", lambda *parts: _Elsewhere(stage(*parts)))
            assert await pool.push_weights_in_memory(first, 3) == 3
            return [*served, _greedy_all(url)]
        finally:
            await pool.aclose()

    with local_server("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path) as url:
        served = asyncio.run(push_thrice(url))
    for weights, greedy in zip((first, second, first), served, strict=True):
        assert greedy == [reference.greedy(_model_with(student_dir, weights), p, 10, EOS) for p in PROMPTS]
    log = (tmp_path / "sampler.log").read_text()
    origins = re.findall(r"loaded \d+ weight tensors from (.+), policy_version=", log)
    assert len(origins) == 3 and re.fullmatch(r"/proc/\d+/fd/\d+", origins[0]), origins
    assert origins[1:] == ["the request body"] * 2


def test_the_python_client_pushes_through_memory_by_path_over_http_and_shared(student_dir, tmp_path):
    first, second = _new_student_weights(seed=7), _new_student_weights(seed=8)
    shared = tmp_path / "shared"
    with (
        local_server("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path) as url,
        SamplerClient(url) as sampler,
    ):
        assert sampler.push_weights(first, 1, in_memory=True) == 1
        served = [_greedy_all(url)]
        assert sampler.push_weights(second, 2, shared_dir=shared) == 2
        served.append(_greedy_all(url))
        assert sampler.push_weights(first, 3) == 3
        served.append(_greedy_all(url))
        with pytest.raises(ValueError, match="one of"):
            sampler.push_weights(second, 4, shared_dir=shared, in_memory=True)
        assert sampler.push_weights(second, 4, shared=True) == 4
        served.append(_greedy_all(url))
        assert sampler.info().policy_version == 4
    for weights, greedy in zip((first, second, first, second), served, strict=True):
        assert greedy == [reference.greedy(_model_with(student_dir, weights), p, 10, EOS) for p in PROMPTS]
    log = (tmp_path / "sampler.log").read_text()
    origins = re.findall(r"loaded \d+ weight tensors from (.+), policy_version=", log)
    assert len(origins) == 4 and re.fullmatch(r"/proc/\d+/fd/\d+", origins[0]), origins
    assert origins[1:] == [str(shared.resolve() / "weights-v000002.safetensors"), "the request body",
                           "the learner's memfd buffer"]  # fmt: skip
    assert list(shared.iterdir()) == []  # the client removes what it wrote there when it closes


class _Elsewhere:
    """A staged body under a /proc path the sampler cannot open (a process it cannot see)."""

    def __init__(self, staged: ProcFile) -> None:
        self.staged, self.path = staged, "/proc/999999999/fd/3"

    def close(self) -> None:
        self.staged.close()


def test_the_learners_pool_pushes_through_its_shared_buffer_and_over_http_where_refused(
    student_dir, tmp_path, monkeypatch, caplog
):
    first, second = _new_student_weights(seed=7), _new_student_weights(seed=8)

    async def push_four_times(url: str) -> list[list[list[int]]]:
        pool = SamplerPool([url], timeout_s=60, retry=RetryPolicy(deadline_s=5))
        served = []
        try:
            for version, weights in [(1, first), (2, second)]:  # the second push writes the buffer the sampler mapped
                assert await pool.push_weights_by("shared", weights, version) == version
                served.append(_greedy_all(url))
            # injected fault: a sampler in another PID namespace cannot open the learner's /proc path
            monkeypatch.setattr(learner.clients.WeightBuffer, "handle", _handle_elsewhere)
            for version, weights in [(3, first), (4, second)]:  # refused once, then sent over HTTP directly
                assert await pool.push_weights_by("shared", weights, version) == version
                served.append(_greedy_all(url))
            return served
        finally:
            await pool.aclose()

    with local_server("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path) as url:
        served = asyncio.run(push_four_times(url))
    for weights, greedy in zip((first, second, first, second), served, strict=True):
        assert greedy == [reference.greedy(_model_with(student_dir, weights), p, 10, EOS) for p in PROMPTS]
    log = (tmp_path / "sampler.log").read_text()
    origins = re.findall(r"loaded \d+ weight tensors from (.+), policy_version=", log)
    assert origins == ["the learner's memfd buffer"] * 2 + ["the request body"] * 2, origins
    refusals = [r.message for r in caplog.records if "cannot copy from the learner's buffer" in r.message]
    assert len(refusals) == 1 and "cannot open the learner's weight buffer" in refusals[0], refusals


def _handle_elsewhere(buffer):
    return SharedBuffer(kind="memfd", size=buffer.flat.numel(), path="/proc/999999999/fd/3")


def test_shared_pushes_that_do_not_fit_the_buffer_are_refused(student_dir, tmp_path):
    weights = _new_student_weights(seed=5)
    buffer = WeightBuffer(layout_of(weights), torch.device("cpu"))
    buffer.fill(weights)
    layout = [t.model_dump() for t in buffer.layout]
    last = dict(layout[-1])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    push_file = stage(b"x" * 4096)  # an in-memory file, but a staged push, not a weight buffer

    def body(**changes):
        return {"buffer": buffer.handle().model_dump(exclude_none=True), "tensors": layout} | changes

    refused = [
        (body(tensors=[*layout[:-1], last | {"offset": buffer.flat.numel()}]), 400, f"tensors.{last['name']}"),
        (body(tensors=[*layout[:-1], last | {"offset": last["offset"] + 4}]), 400, f"tensors.{last['name']}"),
        (body(tensors=[*layout, layout[0]]), 400, f"tensors.{layout[0]['name']}"),
        (body(tensors=layout[:-1]), 422, f"weights.{last['name']}"),
        (body(tensors=[*layout[:-1], last | {"dtype": "float16"}]), 422, f"weights.{last['name']}"),
        (body(tensors=[*layout[:-1], last | {"dtype": "int8"}]), 422, f"tensors.{len(layout) - 1}.dtype"),
        (body(buffer={"kind": "memfd", "size": buffer.flat.numel() + 1, "path": buffer.handle().path}), 400,
         "buffer.size"),
        (body(buffer={"kind": "memfd", "size": 8, "path": str(tmp_path)}), 400, "buffer.path"),  # a directory
        (body(buffer={"kind": "memfd", "size": 8, "path": str(fifo)}), 400, "buffer.path"),  # would block
        (body(buffer={"kind": "memfd", "size": 8, "path": str(student_dir / "config.json")}), 400, "buffer.path"),
        (body(buffer={"kind": "memfd", "size": 8, "path": push_file.path}), 400, "buffer.path"),  # not a buffer
        (body(buffer={"kind": "memfd", "size": 8}), 422, "buffer"),
        (body(buffer={"kind": "cuda", "size": 8, "cuda": {"device": 0, "handle": "AA==", "storage_bytes": 8,
                                                          "storage_offset": 0, "tensor_offset": 0,
                                                          "ref_counter": "AA==", "ref_counter_offset": 0}}),
         400, "buffer.cuda"),  # this sampler has no GPU
    ]  # fmt: skip
    nan = dict(weights) | {last["name"]: _with_value(weights[last["name"]], float("nan"))}
    with local_server("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path) as url:
        serving = _greedy_all(url)
        for request, status, param in refused:
            response = httpx.post(f"{url}/v1/weights", json=request, timeout=60)
            assert response.status_code == status, (param, response.text)
            assert response.json()["error"]["param"] == param, response.text
        buffer.fill(nan)
        response = httpx.post(f"{url}/v1/weights", json=body(), timeout=60)
        assert response.status_code == 422 and response.json()["error"]["param"] == f"weights.{last['name']}"
        assert httpx.get(f"{url}/v1/info").json()["policy_version"] == 0
        assert _greedy_all(url) == serving
        buffer.fill(weights)
        assert httpx.post(f"{url}/v1/weights", json=body(version=9), timeout=60).json() == {"policy_version": 9}
        assert _greedy_all(url) == [reference.greedy(_model_with(student_dir, weights), p, 10, EOS) for p in PROMPTS]
    buffer.close()
    push_file.close()


def test_weight_push_stream_then_path_then_refusal(student_dir, tmp_path):
    with local_server("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path) as url:
        before = _greedy_all(url)

        weights = _new_student_weights(seed=5)
        response = httpx.post(
            f"{url}/v1/weights",
            params={"version": 3},
            content=save(weights),
            headers={"content-type": "application/octet-stream"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"policy_version": 3}
        pushed = _model_with(student_dir, weights)
        after_stream = _greedy_all(url)
        assert after_stream != before
        assert after_stream == [reference.greedy(pushed, p, 10, EOS) for p in PROMPTS]
        assert generate(url, prompt_ids=PROMPTS[:1], max_tokens=2).policy_version == 3

        other = _new_student_weights(seed=6)
        save_file(other, tmp_path / "w.safetensors")
        response = httpx.post(f"{url}/v1/weights", json={"path": str(tmp_path / "w.safetensors")}, timeout=60)
        assert response.json() == {"policy_version": 4}
        assert _greedy_all(url) == [reference.greedy(_model_with(student_dir, other), p, 10, EOS) for p in PROMPTS]
        serving = _greedy_all(url)

        name = "model.layers.0.mlp.up_proj.weight"
        bad = dict(other) | {name: torch.zeros(3, 3)}
        response = httpx.post(f"{url}/v1/weights", content=save(bad), headers=SAFETENSORS, timeout=60)
        assert response.status_code == 422
        assert response.json()["error"]["param"] == f"weights.{name}"
        for body, param in [
            (save({k: v for k, v in other.items() if k != name}), f"weights.{name}"),
            (save(dict(other) | {name: other[name].double()}), f"weights.{name}"),
            (save(dict(other) | {"extra.weight": torch.zeros(1)}), "weights.extra.weight"),
            (save(other)[:-100], "body"),
            *((save(dict(other) | {name: _with_value(other[name], value)}), f"weights.{name}")
              for value in (float("nan"), float("inf"), float("-inf"))),
        ]:  # fmt: skip
            response = httpx.post(f"{url}/v1/weights", content=body, headers=SAFETENSORS, timeout=60)
            assert 400 <= response.status_code < 500, response.text
            assert response.json()["error"]["param"] == param
        for path, says in [(tmp_path / "missing.safetensors", "no such file"), (Path("/dev/zero"), "a device"),
                           (tmp_path / ("\u1e70" * 200), "cannot look up")]:  # (600 bytes: too long)  # fmt: skip
            response = httpx.post(f"{url}/v1/weights", json={"path": str(path)})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "path" and says in response.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/info").json()["policy_version"] == 4
        assert _greedy_all(url) == serving


def test_a_push_of_a_state_dict_with_a_tied_output_layer_is_told_why_it_is_refused():
    from opd.errors import RequestError
    from sampler.engine import WeightSpec
    from sampler.weights import check_weights

    specs = {"model.embed_tokens.weight": WeightSpec((4, 2), torch.float32)}  # tied: no lm_head.weight of its own
    state_dict = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}
    with pytest.raises(RequestError, match=r"no lm_head.weight of its own \(its output layer is tied") as refused:
        check_weights(state_dict, specs)
    assert refused.value.status == 422 and refused.value.param == "weights.lm_head.weight"
    with pytest.raises(RequestError, match=r"unknown weight names: \['extra'\]$"):  # no hint for other names
        check_weights({**specs_tensors(specs), "extra": torch.zeros(1)}, specs)


def specs_tensors(specs: dict) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(spec.shape, dtype=spec.dtype) for name, spec in specs.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_finds_one_bad_value_anywhere_and_accepts_the_largest_finite_ones(dtype):
    from sampler.weights import all_finite

    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 1000, 100_003):
        for where in (0, n // 2, n - 1):
            for value in (float("nan"), float("inf"), float("-inf")):
                tensor = torch.randn(n, generator=gen).to(dtype)
                tensor[where] = value
                assert not all_finite(tensor), (n, where, value)
    for extreme in (torch.finfo(dtype).max, torch.finfo(dtype).min):
        assert all_finite(torch.full((5,), extreme, dtype=dtype))
    assert all_finite(torch.randn(64, 33, generator=gen).to(dtype).t())  # not contiguous
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(5))


def test_non_finite_names_every_bad_tensor_of_a_push_in_order():
    from sampler.weights import non_finite

    fine = {"a": torch.randn(4, 3), "big": torch.full((2,), torch.finfo(torch.float64).max, dtype=torch.float64),
            "ids": torch.arange(3), "empty": torch.empty(0, dtype=torch.bfloat16)}  # fmt: skip
    assert non_finite(fine) == []
    bad = fine | {"b": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16),
                  "c": torch.tensor([float("nan")], dtype=torch.float16)}  # fmt: skip
    assert non_finite(dict(reversed(bad.items()))) == ["c", "b"]


def test_checksum_header_is_enforced(student_dir, tmp_path):
    import hashlib

    weights = _new_student_weights(seed=8)
    body = save(weights)
    with local_server("sampler", ["--model", str(student_dir), "--engine", "torch"], tmp_path) as url:
        wrong = httpx.post(f"{url}/v1/weights", content=body, headers=SAFETENSORS | {"x-content-sha256": "0" * 64})
        assert wrong.status_code == 400
        assert json.loads(wrong.text)["error"]["param"] == "body"
        right = httpx.post(
            f"{url}/v1/weights",
            content=body,
            headers=SAFETENSORS | {"x-content-sha256": hashlib.sha256(body).hexdigest()},
        )
        assert right.status_code == 200
        assert right.json() == {"policy_version": 1}


def test_the_vllm_scorers_token_budget_runs_jobs_in_order_within_it_and_gets_every_token_back():
    from grader.engines.vllm import TokenBudget, within_budget

    held, starts = [0], []

    def job(tokens: int, value: int, fail: bool = False):
        async def run() -> int:
            held[0] += tokens
            starts.append((tokens, held[0]))
            await asyncio.sleep(0.001 * (value % 3))
            held[0] -= tokens
            if fail:
                raise RuntimeError("engine failed")
            return value

        return run

    async def main(jobs) -> tuple[list[int], TokenBudget]:
        budget = TokenBudget(10)
        try:
            return await within_budget(budget, jobs), budget
        finally:
            assert budget.used == 0  # every job gave its tokens back, also failed and cancelled ones

    # 12 tokens exceed the limit alone: that job runs once it is the only one
    results, _ = asyncio.run(main([(t, job(t, i)) for i, t in enumerate([4, 4, 4, 12, 3, 3, 3, 3])]))
    assert results == list(range(8))
    assert all(total <= 10 or (tokens, total) == (12, 12) for tokens, total in starts), starts
    assert (12, 12) in starts and max(total for tokens, total in starts if tokens != 12) > 4  # jobs did overlap

    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(main([(5, job(5, 0)), (5, job(5, 1, fail=True)), (5, job(5, 2))]))
