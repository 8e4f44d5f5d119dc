"""LoRA students: adapters trained on a frozen base, pushed alone, served like the merged model.

The reference for what a sampler serves is peft's own `merge_and_unload` of the same adapter;
the torch sampler is checked here, the vLLM one in tests/test_vllm.py (same helpers).
"""

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from learner.clients import RetryPolicy, SamplerClient, SamplerPool
from learner.config import LoraSpec, ModelSpec, TrainConfig, load_config
from learner.distributed import Processes
from learner.lora import adapter_push, merge_checkpoint
from learner.metrics import read_metrics
from learner.policy import student_policy, tensors_to_push
from learner.services import served_lora_rank
from learner.trainer import OnPolicyDistillationTrainer
from opd.errors import ConfigError, SamplerError, StaleSamplerError
from opd.launch import local_server
from sampler.schema import ADAPTER_CONFIG_KEY, GenerateRequest
from tests import reference
from tests.test_servers import EOS, PROMPTS, SAFETENSORS, generate

LORA = ["--max-lora-rank", "8"]


def trained_adapter(student_dir, seed: int = 0):
    """A LoRA student whose adapter is not the identity (lora_B is zero at init)."""
    policy = student_policy(ModelSpec(path=str(student_dir), lora=LoraSpec(r=8)), TrainConfig(), "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return policy.lm


def merged_reference(lm):
    """What the sampler must serve: peft's own merge of the adapter into a copy of the base."""
    import copy

    return copy.deepcopy(lm).merge_and_unload().eval()


async def push(url: str, tensors: dict, version: int, metadata: dict | None) -> int:
    client = SamplerClient(url)
    try:
        return await client.push_weights(tensors, version, metadata)
    finally:
        await client.aclose()


def check_serves(url: str, model) -> None:
    """Greedy completions and sampled logprobs of the sampler equal those of `model`."""
    reply = generate(url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=8)
    for prompt, result in zip(PROMPTS, reply.results, strict=True):
        completion = result.completions[0]
        assert completion.completion_ids == reference.greedy(model, prompt, 8, EOS)
        assert completion.logprobs == pytest.approx(reference.token_logprobs(model, prompt, completion.completion_ids),
                                                    abs=1e-4)  # fmt: skip
    sampled = generate(url, prompt_ids=PROMPTS, n=2, temperature=1.0, max_tokens=6, seed=3)
    for prompt, result in zip(PROMPTS, sampled.results, strict=True):
        for c in result.completions:
            assert c.logprobs == pytest.approx(reference.token_logprobs(model, prompt, c.completion_ids), abs=1e-4)


def test_an_adapter_push_moves_under_a_tenth_of_a_full_push(student_dir):
    lm = trained_adapter(student_dir)
    adapter, metadata = adapter_push(lm)
    full = reference.load(student_dir)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    assert adapter_bytes < 0.1 * full_bytes, (adapter_bytes, full_bytes)
    assert json.loads(metadata[ADAPTER_CONFIG_KEY])["r"] == 8
    assert all(name.startswith("base_model.model.") and ".lora_" in name for name in adapter)


@pytest.fixture(scope="module")
def lora_sampler(student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A torch sampler of the tiny student that serves LoRA adapters (rank up to 8); each test
    pushes the adapter it needs first."""
    logs = tmp_path_factory.mktemp("lora-sampler-logs")
    with local_server("sampler", ["--model", str(student_dir), "--engine", "torch", *LORA], logs) as url:
        yield url


def test_the_torch_sampler_serves_a_pushed_adapter_as_the_merged_model(student_dir, lora_sampler):
    lm, other = trained_adapter(student_dir, seed=0), trained_adapter(student_dir, seed=1)
    url = lora_sampler
    assert httpx.get(f"{url}/v1/info").json()["max_lora_rank"] == 8
    assert asyncio.run(push(url, adapter_push(lm)[0], 1, adapter_push(lm)[1])) == 1
    check_serves(url, merged_reference(lm))
    # a second adapter replaces the first (not added on top of it)
    assert asyncio.run(push(url, adapter_push(other)[0], 2, adapter_push(other)[1])) == 2
    check_serves(url, merged_reference(other))


def test_bad_adapters_are_refused_and_the_old_one_keeps_serving(student_dir, lora_sampler, servers):
    lm = trained_adapter(student_dir)
    tensors, metadata = adapter_push(lm)
    name = next(n for n in tensors if n.endswith("q_proj.lora_A.weight"))
    wrong_shape = {**tensors, name: torch.zeros(8, 7)}
    not_finite = {**tensors, name: tensors[name].clone().index_fill_(1, torch.tensor([3]), float("nan"))}
    rank_16 = {ADAPTER_CONFIG_KEY: json.dumps({**json.loads(metadata[ADAPTER_CONFIG_KEY]), "r": 16})}
    full = {n: p.detach() for n, p in reference.load(student_dir).named_parameters()}
    url = lora_sampler
    assert asyncio.run(push(url, tensors, 1, metadata)) == 1
    before = generate(url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=6)
    for body, param in [(save(wrong_shape, metadata), "weights."), (save(not_finite, metadata), f"weights.{name}"),
                        (save(tensors, rank_16), "adapter_config.r"), (save(full), "weights")]:  # fmt: skip
        response = httpx.post(f"{url}/v1/weights", content=body, params={"version": 7}, headers=SAFETENSORS)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"].startswith(param)
    assert httpx.get(f"{url}/v1/info").json()["policy_version"] == 1
    assert generate(url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=6) == before
    # and a sampler of full weights refuses an adapter, saying what it serves (the shared one: nothing changes)
    response = httpx.post(
        f"{servers[0]}/v1/weights", content=save(tensors, metadata), params={"version": 1}, headers=SAFETENSORS
    )
    assert response.status_code == 422 and "--max-lora-rank" in response.json()["error"]["message"]


def test_a_lora_sampler_among_full_replicas_is_refused(lora_sampler, servers, student_dir, tmp_path):
    """A LoRA sampler listed beside a full student's: refused at start, naming it. Its pushes are
    refused (422) and fail the push, instead of leaving it to sample with its own weights. And a
    sampler at a version newer than the learner's latest push serves another run's weights."""
    full, graders = servers
    weights = {name: p.detach() for name, p in reference.load(student_dir).named_parameters()}

    async def push_then_generate(urls: list[str]) -> None:
        pool = SamplerPool(urls, 60, RetryPolicy(deadline_s=5))
        try:
            with pytest.raises(SamplerError, match=f"sampler {lora_sampler}/v1/weights answered 422"):
                await pool.push_weights(weights, 0)
            pool.latest_push = -1  # as if this learner had pushed nothing the servers serve
            with pytest.raises(StaleSamplerError, match="newer than this learner's latest push"):
                await pool.generate(GenerateRequest(prompt_ids=[[5, 6, 7]], max_tokens=2))
        finally:
            await pool.aclose()

    config = load_config("examples/tiny/config.yml", [
        "--run_dir", str(tmp_path / "run"), "--train.steps", "1", "--eval.eval_steps", "0", "--services.sampler_urls",
        f"[{full}, {lora_sampler}]", "--services.grader_url", graders, "--logging.progress", "false"])  # fmt: skip
    with pytest.raises(ConfigError, match=f"sampler {lora_sampler}, grader {graders}: .*serves LoRA adapters"):
        OnPolicyDistillationTrainer(config).train()
    asyncio.run(push_then_generate([full, lora_sampler]))


def lora_args(run_dir, steps: int, *extra: str) -> list[str]:
    return ["--run_dir", str(run_dir), "--train.steps", str(steps), "--train.lr", "1e-2", "--student.lora", "{r: 8}",
            "--services.engine", "torch", "--logging.progress", "false", *extra]  # fmt: skip


@pytest.mark.slow
def test_a_lora_run_learns_pushes_little_and_saves_a_peft_adapter_that_exports(tmp_path, student_dir):
    from peft import PeftModel

    config = load_config("examples/tiny/config.yml", lora_args(tmp_path / "run", 30, "--eval.eval_steps", "30",
                                                                "--eval.max_items", "32"))  # fmt: skip
    history = OnPolicyDistillationTrainer(config).train()
    evals = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/reverse_kl_per_token" in m]
    before, after = evals[0]["eval/reverse_kl_per_token"], evals[-1]["eval/reverse_kl_per_token"]
    assert after <= 0.7 * before, (before, after)
    full_bytes = sum(p.numel() * 4 for p in reference.load(student_dir).parameters())
    assert all(0 < m["push/bytes"] < 0.1 * full_bytes and m["push/seconds"] > 0 for m in history)

    checkpoint = tmp_path / "run" / "checkpoints" / "step_000030"
    assert (checkpoint / "adapter_config.json").exists() and not (checkpoint / "model.safetensors").exists()
    adapted = PeftModel.from_pretrained(reference.load(student_dir), checkpoint).eval()  # peft loads it as is
    export = [sys.executable, "-m", "opd.cli", "export", str(checkpoint), "--merge", str(tmp_path / "m")]
    result = subprocess.run(export, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = reference.load(tmp_path / "m")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, reference.load(student_dir)(ids).logits, atol=1e-3)

    (tmp_path / "a-file").write_text("kept")
    taken = "exists and is not an empty directory"
    for out, base, refusal in [(tmp_path / "m", None, taken), (tmp_path / "a-file", None, taken),
                               (tmp_path / "m2", "tiny:teacher", "does not fit the base model")]:  # fmt: skip
        with pytest.raises(ConfigError, match=refusal):
            merge_checkpoint(checkpoint, out, base)
    with pytest.raises(ConfigError, match="no checkpoint directory"):
        merge_checkpoint(tmp_path / "run" / "checkpoints" / "step_999999", tmp_path / "m3")
    assert (tmp_path / "a-file").read_text() == "kept" and not (tmp_path / "m2").exists()


@pytest.mark.slow
def test_a_resumed_lora_run_ends_with_the_uninterrupted_runs_adapter(tmp_path):
    from safetensors.torch import load_file

    def run(name: str, steps: int, *extra: str) -> None:
        args = lora_args(tmp_path / name, steps, "--eval.eval_steps", "0", "--checkpoint.save_steps", "2", *extra)
        OnPolicyDistillationTrainer(load_config("examples/tiny/config.yml", args)).train()

    run("straight", 4)
    run("resumed", 2)
    config = load_config("examples/tiny/config.yml", lora_args(tmp_path / "resumed", 4, "--eval.eval_steps", "0",
                                                                "--checkpoint.save_steps", "2"))  # fmt: skip
    OnPolicyDistillationTrainer(config, resume_from=tmp_path / "resumed" / "checkpoints" / "step_000002").train()
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step_000004" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step_000004" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    full = load_config("examples/tiny/config.yml", ["--run_dir", str(tmp_path / "full")])  # no student.lora
    with pytest.raises(ConfigError, match="holds a LoRA adapter, but this run's student is full"):
        OnPolicyDistillationTrainer(full, resume_from=tmp_path / "resumed" / "checkpoints" / "step_000004")


def test_tensors_to_push_for_a_full_student_are_its_parameters(student_dir):
    policy = student_policy(ModelSpec(path=str(student_dir)), TrainConfig(), "cpu")
    tensors, metadata = tensors_to_push(Processes(False, "cpu"), policy, "bfloat16")
    assert metadata is None and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert set(tensors) == {name for name, _ in reference.load(student_dir).named_parameters()}


def test_a_lora_rank_is_served_at_the_next_rank_vllm_builds_and_one_over_the_largest_is_refused():
    assert [served_lora_rank(r) for r in (1, 8, 9, 16, 17, 512)] == [1, 8, 16, 16, 32, 512]
    with pytest.raises(ConfigError, match="at most 512"):
        served_lora_rank(513)
