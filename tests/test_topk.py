"""The top-k loss's estimator (learner/topk.py) against the exact reverse KL gradient, in float64.

One position, a 10-token vocabulary, student logits as the parameters: the exact gradient of
KL(softmax(theta) || q) by autograd over the whole vocabulary, against the estimator's gradient for
each possible sampled token y, averaged exactly (enumerating y, weighted by p_y) and by Monte Carlo.
Two biased variants seen in peers' code serve as negative controls, so the checks can fail.
"""

import asyncio

import pytest
import torch

import learner.rollout
from grader.schema import LogprobsRequest, Sequence
from learner.clients import GraderPool, RetryPolicy, SamplerPool
from learner.loss import advantages
from learner.rollout import grade, sample
from learner.topk import Head, first_occurrence, head_tensors, sampled_in_head, topk_policy_loss
from learner.update import micro_batches
from sampler.schema import GenerateRequest

V = 10
THETA = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.0, 0.7, -2.0, 0.4, 1.5], dtype=torch.float64)
TEACHER_LOGITS = torch.tensor([0.1, 1.8, -0.3, 1.0, -1.5, 0.6, 2.2, -0.8, 0.0, -0.2], dtype=torch.float64)
Q = torch.log_softmax(TEACHER_LOGITS, -1)


def exact_gradient() -> torch.Tensor:
    theta = THETA.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    (logp.exp() * (logp - Q)).sum().backward()
    return theta.grad


def head_ids(k: int) -> list[int]:
    """Teacher's top-k and student's top-k at the position: fixed by the prefix, not by y."""
    return Q.topk(k).indices.tolist() + THETA.topk(k).indices.tolist()


def estimator_gradient(y: int, ids: list[int]) -> torch.Tensor:
    """The gradient the learner takes when token y was sampled, through topk_policy_loss."""
    theta = THETA.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    ids_BTK = torch.tensor([[ids]])
    head = Head(ids_BTK, Q[ids_BTK], first_occurrence(ids_BTK).double())
    new_BT, old_BT, mask_BT = logp[y].view(1, 1), logp[y].detach().view(1, 1), torch.ones(1, 1, dtype=torch.float64)
    adv_BT = advantages(Q[y].view(1, 1), old_BT, mask_BT, 1.0, 0.0)
    in_head_BT = sampled_in_head(torch.tensor([[y]]), head).double()
    loss = topk_policy_loss(new_BT, logp[ids_BTK], old_BT, adv_BT, in_head_BT, head, mask_BT,
                            clip_eps=0.2, kl_coef=1.0, num_tokens=mask_BT.sum())  # fmt: skip
    loss.loss.backward()
    return theta.grad


def expected_over_samples(gradient_for) -> torch.Tensor:
    p = torch.softmax(THETA, -1)
    return sum(p[y] * gradient_for(y) for y in range(V))


def test_with_the_whole_vocabulary_as_head_every_sample_gives_the_exact_gradient():
    for y in range(V):
        torch.testing.assert_close(estimator_gradient(y, list(range(V))), exact_gradient(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_small_heads_are_unbiased_exactly_in_expectation(k):
    expected = expected_over_samples(lambda y: estimator_gradient(y, head_ids(k)))
    torch.testing.assert_close(expected, exact_gradient(), rtol=0, atol=1e-12)


def test_the_mean_over_many_samples_converges_to_the_exact_gradient():
    # Averaging per-sample gradients over n draws = weighting each token's gradient by its count.
    per_token = torch.stack([estimator_gradient(y, head_ids(2)) for y in range(V)])
    p = torch.softmax(THETA, -1)
    counts = torch.bincount(torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0)),
                            minlength=V).double()  # fmt: skip
    mean = (counts[:, None] * per_token).sum(0) / counts.sum()
    # standard error of the mean gradient, per coordinate: sd over the sample distribution / sqrt(n)
    sd = ((p[:, None] * (per_token - (p[:, None] * per_token).sum(0)) ** 2).sum(0)).sqrt()
    error = (mean - exact_gradient()).abs()
    assert (error < 5 * sd / counts.sum().sqrt() + 1e-12).all(), (error, sd)


def biased_with_the_sampled_token_in_the_head(y: int) -> torch.Tensor:
    return estimator_gradient(y, [*head_ids(2), y])


def biased_renormalised_head_without_tail(y: int) -> torch.Tensor:
    theta = THETA.clone().requires_grad_()
    ids = torch.tensor(sorted(set(head_ids(2))))
    logp_head = torch.log_softmax(theta[ids], -1)
    q_head = torch.log_softmax(Q[ids], -1)
    (logp_head.exp() * (logp_head - q_head)).sum().backward()
    return theta.grad


@pytest.mark.parametrize("variant", [biased_with_the_sampled_token_in_the_head, biased_renormalised_head_without_tail])
def test_the_known_biased_variants_miss_the_exact_gradient(variant):
    # Negative controls: the checks above would catch either mistake.
    bias = (expected_over_samples(variant) - exact_gradient()).abs().max()
    assert bias > 1e-2, bias


def flat_head(ids: list[list[list[int]]], logprobs: list[list[list[float]]], width: int) -> Head:
    """head_tensors of per-sample lists, flattened as the grader's reply is."""
    lengths_B = torch.tensor([len(rows) for rows in ids])
    ids_NK = torch.tensor([position for rows in ids for position in rows])
    return head_tensors(ids_NK, torch.tensor([p for rows in logprobs for p in rows]), lengths_B, width, "cpu")


def test_head_tensors_mask_repeated_ids_and_padding():
    head = flat_head([[[3, 5, 3], [1, 1, 2]], [[4, 4, 4]]], [[[-1.0, -2.0, -1.0], [-3.0, -3.0, -4.0]], [[-5.0] * 3]],
                     width=2)  # fmt: skip
    assert head.mask_BTK.tolist() == [[[1, 1, 0], [1, 0, 1]], [[1, 0, 0], [0, 0, 0]]]
    in_head = sampled_in_head(torch.tensor([[5, 9], [4, 0]]), head)
    assert in_head.tolist() == [[1.0, 0.0], [1.0, 0.0]]  # padding (row 1, position 1) never counts


def test_head_tensors_place_each_rows_values_from_the_flat_reply():
    # rows of 2, 1 and 3 positions, right-padded to 3: each row's values in place, padding zero and masked
    ids = [[[7, 8], [9, 6]], [[1, 2]], [[5, 4], [3, 2], [1, 0]]]
    logprobs = [[[-0.5, -1.5], [-2.5, -3.5]], [[-0.25, -0.75]], [[-4.5, -5.5], [-6.5, -7.5], [-8.5, -9.5]]]
    head = flat_head(ids, logprobs, width=3)
    assert head.ids_BTK.tolist() == [[[7, 8], [9, 6], [0, 0]], [[1, 2], [0, 0], [0, 0]], [[5, 4], [3, 2], [1, 0]]]
    pad = [0, 0]
    assert head.teacher_logprobs_BTK.tolist() == [[*logprobs[0], pad], [*logprobs[1], pad, pad], logprobs[2]]
    assert head.mask_BTK.tolist() == [[[1, 1], [1, 1], [0, 0]], [[1, 1], [0, 0], [0, 0]], [[1, 1]] * 3]


async def sampled_and_graded(sampler: SamplerPool, grader: GraderPool, prompts, request):
    """The servers' samples of `prompts` and the teacher's top-4 of them; the pools closed after."""
    try:
        rollouts = await sample(sampler, prompts, request, eos_id=2, min_version=0)
        return rollouts, await grade(grader, rollouts, top_k=4)
    finally:
        await sampler.aclose()
        await grader.aclose()


def test_a_both_head_is_the_teachers_top_k_then_the_students_top_ids_scored_by_the_teacher(servers):
    # Real servers on loopback: the sampler reports its top 4 with each sample, the grader scores
    # them as candidate_ids, and each micro-batch's head holds the teacher's top 4, then those.
    sampler_url, grader_url = servers
    retry = RetryPolicy(deadline_s=30)
    prompts = [[1, 365, 201, 89], [1, 67, 360], [5, 500, 6, 7, 8]]
    request = GenerateRequest(prompt_ids=prompts, n=2, temperature=1.0, max_tokens=6, seed=3, top_logprobs=4)

    pools = SamplerPool([sampler_url], 60, retry), GraderPool([grader_url], 60, retry)
    rollouts, scores = asyncio.run(sampled_and_graded(*pools, prompts, request))
    assert rollouts.student_top_ids is not None and scores.candidate_logprobs_NC is not None
    batches = micro_batches(rollouts, scores, pad_id=0, max_tokens=16, device="cpu")  # several micro-batches
    assert len(batches) > 1
    for batch in batches:
        assert batch.head is not None and batch.head.ids_BTK.shape[-1] == 8
        for b, row in enumerate(batch.rows):
            mine = scores.select([row])
            assert mine.top_ids_NK is not None and mine.candidate_logprobs_NC is not None
            length = len(rollouts.completion_ids[row])
            ids, values = batch.head.ids_BTK[b, :length], batch.head.teacher_logprobs_BTK[b, :length]
            assert ids[:, :4].tolist() == mine.top_ids_NK.tolist()
            assert ids[:, 4:].tolist() == rollouts.student_top_ids[row]
            assert values[:, 4:].tolist() == mine.candidate_logprobs_NC.tolist()


def test_a_step_too_large_for_one_grade_request_goes_as_several_with_the_same_scores(servers, monkeypatch):
    """Long completions with the student's top-k as candidates pass the servers' 64 MiB body limit
    in one request; `grade` cuts the step by its JSON size, and the scores come back as from one."""
    sampler_url, grader_url = servers
    retry = RetryPolicy(deadline_s=30)
    prompts = [[1, 365, 201, 89], [1, 67, 360], [5, 500, 6, 7, 8]]
    request = GenerateRequest(prompt_ids=prompts, n=2, temperature=1.0, max_tokens=6, seed=3, top_logprobs=4)
    sent: list[int] = []

    async def graded_at(max_bytes: int):
        monkeypatch.setattr(learner.rollout, "GRADE_REQUEST_BYTES", max_bytes)
        sampler, grader = SamplerPool([sampler_url], 60, retry), GraderPool([grader_url], 60, retry)
        real = grader.logprobs_tensors

        async def counted(sequences, top_k=0):
            sent.append(len(sequences))
            return await real(sequences, top_k)

        grader.logprobs_tensors = counted  # type: ignore[method-assign]
        try:
            rollouts = await sample(sampler, prompts, request, eos_id=2, min_version=0)
            return await grade(grader, rollouts, top_k=4)
        finally:
            await sampler.aclose()
            await grader.aclose()

    whole = asyncio.run(graded_at(learner.rollout.GRADE_REQUEST_BYTES))
    assert sent == [6]
    sent.clear()
    cut = asyncio.run(graded_at(400))  # a few sequences' worth
    assert len(sent) > 2 and sum(sent) == 6
    # (each request pads its batch to its own longest sequence, so float32 sums round differently)
    for name in ("lengths_B", "logprobs_N", "top_ids_NK", "top_logprobs_NK", "candidate_logprobs_NC"):
        torch.testing.assert_close(getattr(cut, name), getattr(whole, name), rtol=0, atol=1e-5, msg=name)


def test_more_samples_than_a_request_may_carry_go_as_several_requests_with_the_same_draws(servers, monkeypatch):
    """Past MAX_REQUEST_SEQUENCES samples (the servers' default cap), `sample` and `grade` send
    several requests; each prompt keeps its seeds, so the samples and scores are those of one."""
    sampler_url, grader_url = servers
    prompts = [[1, 365, 201, 89], [1, 67, 360], [5, 500, 6, 7, 8]]
    request = GenerateRequest(prompt_ids=prompts, n=2, temperature=1.0, max_tokens=6, seed=11)
    sent: dict[str, list[int]] = {"generate": [], "grade": []}

    async def split_at(cap: int):
        monkeypatch.setattr(learner.rollout, "MAX_REQUEST_SEQUENCES", cap)
        retry = RetryPolicy(deadline_s=30)
        sampler, grader = SamplerPool([sampler_url], 60, retry), GraderPool([grader_url], 60, retry)
        generate, score = sampler.generate, grader.logprobs_tensors

        async def counted_generate(body):
            sent["generate"].append(len(body.prompt_ids) * body.n)
            return await generate(body)

        async def counted_score(sequences, top_k=0):
            sent["grade"].append(len(sequences))
            return await score(sequences, top_k)

        sampler.generate, grader.logprobs_tensors = counted_generate, counted_score  # type: ignore[method-assign]
        return await sampled_and_graded(sampler, grader, prompts, request)

    whole, whole_scores = asyncio.run(split_at(learner.rollout.MAX_REQUEST_SEQUENCES))
    assert sent == {"generate": [6], "grade": [6]}
    sent = {"generate": [], "grade": []}
    cut, cut_scores = asyncio.run(split_at(4))  # two prompts x 2 samples a request
    assert sent == {"generate": [4, 2], "grade": [4, 2]}
    assert cut.prompt_ids == whole.prompt_ids and cut.completion_ids == whole.completion_ids
    torch.testing.assert_close(cut_scores.top_logprobs_NK, whole_scores.top_logprobs_NK, rtol=0, atol=1e-5)
    assert cut_scores.top_ids_NK.tolist() == whole_scores.top_ids_NK.tolist()


def test_request_chunks_keep_the_order_and_bound_each_chunks_json():
    sequences = [Sequence(prompt_ids=[151_000] * 10, completion_ids=[9] * n, candidate_ids=[[151_000] * 16] * n)
                 for n in (1, 50, 3, 200, 7)]  # fmt: skip
    chunks = learner.rollout.request_chunks(sequences, 4000, 3)
    assert [s for chunk in chunks for s in chunk] == sequences
    for chunk in chunks:
        body = LogprobsRequest(sequences=chunk, top_k=4, format="safetensors").model_dump_json(exclude_none=True)
        assert len(chunk) == 1 or len(body) <= 4000
        assert len(chunk) <= 3
    assert len(chunks) > 1
