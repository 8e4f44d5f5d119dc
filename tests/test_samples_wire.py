"""The /v1/generate reply as flat tensors (`"format": "safetensors"`, sampler/samples.py): the same
samples as the JSON reply, from a real sampler on loopback, and malformed replies refused."""

import httpx
import pytest
import torch
from safetensors.torch import load

from sampler import samples
from sampler.engine import Sample
from sampler.schema import GenerateResponse


@pytest.mark.parametrize("top_logprobs", [0, 3])
def test_the_safetensors_reply_holds_the_json_replys_samples(servers, top_logprobs):
    sampler_url, _ = servers
    body = {"prompt_ids": [[1, 365, 201, 89], [1, 67, 360]], "n": 2, "temperature": 1.0, "max_tokens": 7,
            "seed": 5, "top_logprobs": top_logprobs}  # fmt: skip
    as_json = httpx.post(f"{sampler_url}/v1/generate", json=body, timeout=60)
    as_tensors = httpx.post(f"{sampler_url}/v1/generate", json=body | {"format": "safetensors"}, timeout=60)
    assert as_json.status_code == as_tensors.status_code == 200, as_tensors.text
    assert as_tensors.headers["content-type"] == samples.MEDIA_TYPE
    assert "engine;dur=" in as_tensors.headers["server-timing"]
    expected = GenerateResponse.model_validate_json(as_json.content)
    got = samples.decode(as_tensors.content)
    assert got.model_dump() == expected.model_dump()  # ids, logprobs (float32 both ways), finish reasons
    wire = load(as_tensors.content)  # a plain safetensors file, as documented
    assert wire["completion_ids"].dtype == torch.int32 and wire["completion_lengths"].tolist() == [
        len(c.completion_ids) for r in expected.results for c in r.completions
    ]
    assert ("top_ids" in wire) == bool(top_logprobs)


def test_a_json_reply_writes_the_logprobs_top_p_excludes_as_a_floor_the_tensors_as_inf(servers):
    """JSON has no -inf: pydantic wrote null, which the reply's own schema (and opd.client) refused."""
    sampler_url, _ = servers
    body = {"prompt_ids": [[1, 365, 201, 89]], "max_tokens": 3, "top_p": 0.1, "top_logprobs": 3, "seed": 1}
    as_json = httpx.post(f"{sampler_url}/v1/generate", json=body, timeout=60)
    as_tensors = httpx.post(f"{sampler_url}/v1/generate", json=body | {"format": "safetensors"}, timeout=60)
    assert as_json.status_code == as_tensors.status_code == 200, as_json.text
    by_json = GenerateResponse.model_validate_json(as_json.content).results[0].completions[0].top_logprobs
    by_tensors = samples.decode(as_tensors.content).results[0].completions[0].top_logprobs
    assert by_json is not None and by_tensors is not None
    assert any(v == float("-inf") for row in by_tensors for v in row)  # top_p 0.1 leaves tokens out
    assert by_json == [[-9999.0 if v == float("-inf") else v for v in row] for row in by_tensors]


def test_samples_of_no_tokens_and_both_finish_reasons_survive_the_round_trip():
    per_prompt = [
        [Sample([], [], "stop", [], []), Sample([4, 5], [-0.5, -1.25], "length", [[4, 1], [5, 2]], [[-0.5, -2.0]] * 2)],
        [Sample([9], [-3.0], "stop", [[9, 0]], [[-3.0, -4.0]]), Sample([], [], "length", [], [])],
    ]
    payload = samples.encode(7, [[1, 2, 3], [4]], per_prompt, n=2, top_k=2)
    reply = samples.decode(payload)
    assert reply.policy_version == 7
    assert [r.prompt_ids for r in reply.results] == [[1, 2, 3], [4]]
    got = [[(c.completion_ids, c.logprobs, c.finish_reason, c.top_ids, c.top_logprobs) for c in r.completions]
           for r in reply.results]  # fmt: skip
    assert got == [[(s.completion_ids, s.logprobs, s.finish_reason, s.top_ids, s.top_logprobs) for s in row]
                   for row in per_prompt]  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda w: w.pop("logprobs"), "has no ['logprobs']"),
        (lambda w: w.update(completion_lengths=torch.tensor([2, 1, 0], dtype=torch.int64)), "3 samples for 2 prompts"),
        (lambda w: w.update(logprobs=torch.zeros(2)), "logprobs has 2 rows for 3 completion tokens"),
        (lambda w: w.update(prompt_ids=torch.tensor([1], dtype=torch.int32)), "prompt_ids has 1 ids"),
        (lambda w: w.update(completion_lengths=torch.tensor([4, -1], dtype=torch.int64)), "a negative length"),
        (lambda w: w.update(completion_ids=torch.zeros(3)), "completion_ids is not a 1-d integer tensor"),
    ],
)
def test_a_malformed_reply_is_a_value_error_naming_what_is_wrong(damage, message):
    from sampler.wire import encode

    wire = {
        "prompt_lengths": torch.tensor([2, 1], dtype=torch.int64),
        "prompt_ids": torch.tensor([1, 2, 3], dtype=torch.int32),
        "completion_lengths": torch.tensor([2, 1], dtype=torch.int64),
        "completion_ids": torch.tensor([4, 5, 6], dtype=torch.int32),
        "logprobs": torch.tensor([-1.0, -2.0, -3.0]),
        "stopped": torch.tensor([1, 0], dtype=torch.uint8),
    }
    samples.decode(b"".join(encode(wire, {"policy_version": "1", "n": "1"}).parts))  # intact: reads
    damage(wire)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        samples.decode(b"".join(encode(wire, {"policy_version": "1", "n": "1"}).parts))
    with pytest.raises(ValueError, match="not a samples reply"):
        samples.decode(b"\x00" * 12)


def test_reading_a_reply_leaves_the_garbage_collector_as_it_found_it():
    import gc

    payload = samples.encode(1, [[1, 2]], [[Sample([3, 4], [-1.0, -2.0], "stop", [[3], [4]], [[-1.0], [-2.0]])]], 1, 1)
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            assert samples.decode(payload).results[0].completions[0].top_ids == [[3], [4]]
            assert gc.isenabled() is enabled
        gc.enable()
        with pytest.raises(ValueError), samples.gc_paused():
            raise ValueError("inside")
        assert gc.isenabled()
    finally:
        gc.enable()
