"""The pipelined loop (train.max_staleness) and sampler/grader replicas, with real servers on loopback.

The math of the decoupled objective is checked by hand; the loop by runs of the tiny demo: with
max_staleness 1 the next batch is generated while the learner learns (lag 1, never more) and the
held-out KL falls as far as the serial loop's; two sampler replicas share the work, end at the
same version, and a run survives one of them being killed.
"""

import asyncio
import logging
import socket
import time
from functools import partial
from types import SimpleNamespace

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from learner import clients
from learner.clients import GraderPool, RetryPolicy, SamplerPool
from learner.config import OpdConfig, load_config
from learner.data import PromptStream
from learner.loss import clipped_policy_loss, truncated_importance_weights
from learner.metrics import read_metrics
from learner.producer import Producer, step_plan
from learner.services import cpu_shares, embedded_servers
from learner.trainer import OnPolicyDistillationTrainer
from opd.launch import LocalServer, local_servers
from sampler.schema import GenerateRequest
from tests.faults import KillSamplerAfterPush

EXAMPLE = "examples/tiny/config.yml"
QUIET = ["--services.engine", "torch", "--logging.progress", "false"]


def test_importance_weights_hand_values():
    # ratio = exp(proximal - behaviour): exp(0) = 1, exp(ln 3) = 3 -> capped at 2, exp(-ln 2) = 0.5.
    proximal = torch.tensor([[0.0, 1.0986123, -0.6931472, 0.0]])
    behaviour = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    ratios, weights = truncated_importance_weights(proximal, behaviour, mask, cap=2.0)
    assert ratios.tolist()[0] == pytest.approx([1.0, 3.0, 0.5, 0.0], abs=1e-6)
    assert weights.tolist()[0] == pytest.approx([1.0, 2.0, 0.5, 0.0], abs=1e-6)


def test_weighted_advantages_are_the_decoupled_objective():
    # w * min(r A, clip(r) A) == min(r (w A), clip(r) (w A)) for w >= 0, token by token.
    gen = torch.Generator().manual_seed(0)
    new, old = (
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
    )
    adv, w = (
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
        2 * torch.rand(3, 5, generator=gen, dtype=torch.float64),
    )
    mask = torch.ones(3, 5, dtype=torch.float64)
    ours = clipped_policy_loss(new, old, adv * w, mask, 0.2).loss
    r = torch.exp(new - old)
    reference = -(w * torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)).sum() / mask.sum()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_replica_config_errors():
    base = {"student": {"path": "tiny:student"}, "teacher": {"path": "tiny:teacher"}}
    with pytest.raises(ValueError, match="sampler_url or sampler_urls"):
        OpdConfig.model_validate(base | {"services": {"sampler_url": "http://a", "sampler_urls": ["http://b"],
                                                      "grader_url": "http://c"}})  # fmt: skip
    with pytest.raises(ValueError, match="both, or neither"):
        OpdConfig.model_validate(base | {"services": {"sampler_urls": ["http://a", "http://b"]}})
    both = OpdConfig.model_validate(
        base | {"services": {"sampler_urls": ["http://a", "http://b"], "grader_url": "http://c"}}
    )
    assert (both.services.sampler_list, both.services.grader_list) == (["http://a", "http://b"], ["http://c"])


def test_the_pipelined_loop_splits_the_cpu_between_the_learner_and_its_local_servers(tmp_path):
    base = {"student": {"path": "tiny:student"}, "teacher": {"path": "tiny:teacher"}}
    pipelined = OpdConfig.model_validate(base | {"train": {"max_staleness": 1}})
    # (learner threads, each server's) for 1, 2, 3 and 16 cores: the learner the larger half
    assert [tuple(cpu_shares(pipelined, cores) or ()) for cores in (1, 2, 3, 16)] == [(1, 1), (1, 1), (2, 1), (8, 8)]
    urls = {"sampler_url": "http://127.0.0.1:1", "grader_url": "http://127.0.0.1:2"}
    each_its_own = [  # the serial loop takes turns; servers elsewhere; a learner or servers on a GPU
        base,
        base | {"train": {"max_staleness": 1}, "services": urls},
        base | {"train": {"max_staleness": 1, "device": "cuda:0"}},
        base | {"train": {"max_staleness": 1}, "services": {"device": "cuda"}},
    ]
    assert [cpu_shares(OpdConfig.model_validate(c), 16) for c in each_its_own] == [None] * 4
    config = OpdConfig.model_validate(base | {"train": {"max_staleness": 1}, "services": {"samplers": 2}})
    servers = embedded_servers(config, tmp_path, threads=3)
    assert [(s.role, s.env["OMP_NUM_THREADS"]) for s in servers] == [("sampler", "3")] * 2 + [("grader", "3")]


def evals(run_dir) -> dict[int, float]:
    return {m["step"]: m["eval/reverse_kl_per_token"] for m in read_metrics(run_dir / "metrics.jsonl")
            if "eval/reverse_kl_per_token" in m}  # fmt: skip


@pytest.mark.slow
def test_staleness_1_overlaps_and_learns_as_far_as_the_serial_loop(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="learner.trainer")

    def run(name: str, steps: int, staleness: int) -> list[dict]:
        args = ["--run_dir", str(tmp_path / name), "--train.steps", str(steps), "--train.max_staleness", str(staleness),
                "--eval.eval_steps", "6", "--eval.max_items", "32", *QUIET]  # fmt: skip
        return OnPolicyDistillationTrainer(load_config(EXAMPLE, args)).train()

    serial = run("serial", 30, 0)
    assert "shares the CPU" not in caplog.text
    pipelined = run("pipelined", 36, 1)  # 1.2x the steps
    assert "the pipelined loop shares the CPU" in caplog.text  # learner and servers on this machine's CPU
    assert all(m["policy/lag_max"] == 0 and m["time/wait"] > 0 for m in serial)
    assert all(m["policy/lag_max"] <= 1 for m in pipelined)
    lags = [m["policy/lag"] for m in pipelined]
    assert sum(lags) / len(lags) > 0.5, lags  # the overlap happened: batches came from the previous weights
    assert all(m["pipeline/dropped_stale"] == 0 for m in pipelined)
    assert all(0.5 < m["mismatch/is_ratio_mean"] < 2.0 for m in pipelined)
    assert min(evals(tmp_path / "pipelined").values()) <= evals(tmp_path / "serial")[30]


@pytest.mark.slow
def test_two_sampler_replicas_share_the_work_and_a_run_survives_losing_one(tmp_path, student_dir, teacher_dir):
    args = ["--model", str(student_dir), "--engine", "torch"]
    samplers = [LocalServer("sampler", args, tmp_path, name=f"sampler-{i}") for i in range(2)]
    grader = LocalServer("grader", ["--model", str(teacher_dir), "--engine", "torch"], tmp_path)
    steps = 12
    config = load_config(EXAMPLE, ["--run_dir", str(tmp_path / "run"), "--train.steps", str(steps),
                                   "--eval.eval_steps", "0", *QUIET])  # fmt: skip
    with local_servers([*samplers, grader]) as urls:
        services = config.services.model_copy(update={"sampler_urls": urls[:2], "grader_url": urls[2]})
        trainer = KillSamplerAfterPush(config.model_copy(update={"services": services}), sampler=samplers[1], kill_at=2)
        history = trainer.train()
        versions = [httpx.get(f"{url}/v1/info").json()["policy_version"] for url in urls[:2]]
    assert len(history) == steps and samplers[1].restarts == 1
    assert versions == [steps, steps]  # the restarted replica got the later pushes
    assert all(served > 0 for served in trainer.sampler.served), trainer.sampler.served
    assert all(m["policy/lag_max"] == 0 for m in history)  # replies of the restarted replica's old weights refused


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def test_a_replica_that_is_down_or_silent_is_passed_over_then_asked_last(servers, monkeypatch, caplog):
    """Injected faults: a port nobody listens on, and a socket that takes connections and never
    answers (the kernel's backlog accepts them). Each costs the first request its own retries; the
    request then goes to the live replica, and the next request goes there first."""
    monkeypatch.setattr(clients, "FAILOVER_DEADLINE_S", 1.0)
    request = GenerateRequest(prompt_ids=[[5, 6, 7]], n=2, max_tokens=3, seed=0)

    async def twice(urls: list[str]) -> tuple[list, list[float], list[int]]:
        pool = SamplerPool(urls, 1.0, RetryPolicy(deadline_s=60, first_backoff_s=0.1, max_backoff_s=0.2))
        replies, seconds = [], []
        try:
            for _ in range(2):
                started = time.monotonic()
                replies.append(await pool.generate(request))
                seconds.append(time.monotonic() - started)
        finally:
            await pool.aclose()
        return replies, seconds, pool.served

    with socket.create_server(("127.0.0.1", 0)) as silent:
        down, mute = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{silent.getsockname()[1]}"
        replies, seconds, served = asyncio.run(twice([down, mute, servers[0]]))
    assert served == [0, 0, 2]
    assert replies[0].results == replies[1].results  # the live replica's samples, same seed
    assert seconds[0] > 1.0 and seconds[1] < 1.0, seconds  # the second went straight to the live one
    assert f"replica {down} failed" in caplog.text and f"replica {mute} failed" in caplog.text


def test_a_step_taken_again_comes_from_the_same_prompts(servers, student_dir):
    # Under accelerate every process takes a step again when any of them got a reply from older
    # weights; a process that had taken it must get that step's prompts back, not the next batch's.
    config = OpdConfig.model_validate({"student": {"path": "tiny:student"}, "teacher": {"path": "tiny:teacher"},
                                       "train": {"batch_size": 2}, "sampling": {"n": 1, "max_tokens": 4}})  # fmt: skip
    stream = PromptStream([SimpleNamespace(prompt_ids=[5 + i, 6 + i, 7]) for i in range(8)], 2, seed=0, shuffle=False)
    eos = AutoTokenizer.from_pretrained(student_dir).eos_token_id

    async def take_0_0_1() -> list:
        sampler = SamplerPool([servers[0]], 60, RetryPolicy(deadline_s=5))
        grader = GraderPool([servers[1]], 60, RetryPolicy(deadline_s=5))
        producer = Producer(sampler, grader, plan=partial(step_plan, stream, config, 0), lookahead=0,
                            pushed_version=lambda: 0, eos_id=eos, top_k=0, split_per_prompt=False)  # fmt: skip
        try:
            return [await producer.take(step, 0) for step in (0, 0, 1)]
        finally:
            producer.close()
            await sampler.aclose()
            await grader.aclose()

    first, again, second = asyncio.run(take_0_0_1())
    assert first.rollouts.prompt_ids == again.rollouts.prompt_ids == [[5, 6, 7], [6, 7, 7]]
    assert again.rollouts.completion_ids == first.rollouts.completion_ids  # the same seeds and weights
    assert second.rollouts.prompt_ids == [[7, 8, 7], [8, 9, 7]]


def test_no_batch_is_made_past_the_last_step(servers, student_dir):
    """At lookahead 5 a 2-step run plans (and generates and grades) steps 0 and 1 only."""
    config = OpdConfig.model_validate({"student": {"path": "tiny:student"}, "teacher": {"path": "tiny:teacher"},
                                       "train": {"batch_size": 1}, "sampling": {"n": 1, "max_tokens": 2}})  # fmt: skip
    stream = PromptStream([SimpleNamespace(prompt_ids=[5 + i, 6, 7]) for i in range(8)], 1, seed=0, shuffle=False)
    planned: list[int] = []

    def plan(step: int):
        planned.append(step)
        return step_plan(stream, config, 0, step)

    async def run_two_steps() -> list[int]:
        sampler = SamplerPool([servers[0]], 60, RetryPolicy(deadline_s=5))
        grader = GraderPool([servers[1]], 60, RetryPolicy(deadline_s=5))
        producer = Producer(sampler, grader, plan=plan, lookahead=5, pushed_version=lambda: 0, eos_id=0, top_k=0,
                            split_per_prompt=False, steps=2)  # fmt: skip
        try:
            return [len((await producer.take(step, 0)).rollouts.prompt_ids) for step in (0, 1)]
        finally:
            producer.close()
            await sampler.aclose()
            await grader.aclose()

    assert asyncio.run(run_two_steps()) == [1, 1]
    assert planned == [0, 1]
