"""The micro-batched PPO update against a whole-batch float64 reference on a real tiny model.

The reference runs each sample alone (no padding), takes the full log-softmax over the
vocabulary, and writes the clipped surrogate out token by token; the learner packs the samples
into micro-batches, projects the LM head a few positions at a time and accumulates gradients.
In float64 the two must agree to rounding, whatever the micro-batch budget.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grader.engine import Scored as TeacherScores
from grader.engine import batch_of
from grader.tensors import ScoredBatch
from learner.config import TrainConfig
from learner.distributed import Processes
from learner.policy import Policy
from learner.rollout import Rollouts
from learner.update import Scored, accumulate_gradients, adamw, global_token_count, micro_batches, old_logprobs
from opd.modeling import load_causal_lm, pack_left_padded

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [9, 10], [12, 13, 14], [20, 21, 22, 23], [30], [40, 41]]
COMPLETIONS = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [24, 25], [31, 32, 33, 34], [42, 43, 44]]
PAD_ID = 0


def rollouts() -> Rollouts:
    return Rollouts(
        PROMPTS * 1, COMPLETIONS * 1, [[-1.0] * len(c) for c in COMPLETIONS], versions=[0] * len(COMPLETIONS)
    )


def graded() -> ScoredBatch:
    return batch_of([TeacherScores(row) for row in teacher_logprobs()])


def teacher_logprobs() -> list[list[float]]:
    gen = torch.Generator().manual_seed(0)
    # float32 values: the learner holds teacher logprobs in float32, so both sides see the same numbers
    return [(-3 * torch.rand(len(c), generator=gen)).tolist() for c in COMPLETIONS]


@pytest.fixture(scope="module")
def policy(student_dir) -> Policy:
    return Policy(load_causal_lm(str(student_dir), "float32", "cpu").double(), chunk_size=3).train()


def reference_logprobs(lm: torch.nn.Module, temperature: float) -> list[torch.Tensor]:
    """Each sample alone, full-vocabulary log-softmax in float64."""
    out = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        logits = lm(input_ids=torch.tensor([prompt + completion])).logits[0].double() / temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        out.append(torch.stack([logprobs[len(prompt) + i - 1, t] for i, t in enumerate(completion)]))
    return out


def reference_gradients(lm, old, advantages, clip_eps, temperature) -> dict[str, torch.Tensor]:
    """-sum over all tokens of min(r A, clip(r) A) / (all tokens), backpropagated."""
    lm.zero_grad(set_to_none=True)
    new = reference_logprobs(lm, temperature)
    total = sum(len(c) for c in COMPLETIONS)
    surrogate = 0.0
    for new_T, old_T, adv_T in zip(new, old, advantages, strict=True):
        for t in range(len(new_T)):
            ratio = torch.exp(new_T[t] - old_T[t])
            surrogate = surrogate + torch.minimum(ratio * adv_T[t], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv_T[t])
    (-surrogate / total).backward()
    return {name: p.grad.clone() for name, p in lm.named_parameters()}


def reference_advantages(teacher, old, discount) -> list[torch.Tensor]:
    out = []
    for teacher_T, old_T in zip(teacher, old, strict=True):
        terms = [teacher_T[t] - old_T[t].item() for t in range(len(old_T))]
        discounted = [sum(discount**k * terms[t + k] for k in range(len(terms) - t)) for t in range(len(terms))]
        out.append(torch.tensor(discounted, dtype=torch.float64))
    return out


def learner_gradients(policy, train, budget, scored=None):
    batches = micro_batches(rollouts(), graded(), pad_id=PAD_ID, max_tokens=budget, device="cpu")
    policy.zero_grad(set_to_none=True)
    processes = Processes(False, "cpu")
    num_tokens = global_token_count(batches, processes)
    scored, _ = accumulate_gradients(policy, batches, scored, train=train, num_tokens=num_tokens, processes=processes)
    grads = {name.removeprefix("lm."): p.grad.clone() for name, p in policy.named_parameters()}
    return batches, scored, grads


def per_sample(batches, tensors_BT) -> list[torch.Tensor]:
    """Right-padded [B, T] tensors of each micro-batch back to one row per sample, in step order."""
    rows: dict[int, torch.Tensor] = {}
    for batch, values_BT in zip(batches, tensors_BT, strict=True):
        for b, row in enumerate(batch.rows):
            rows[row] = values_BT[b, : len(COMPLETIONS[row])]
    return [rows[i] for i in range(len(COMPLETIONS))]


def assert_same_gradients(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name  # every parameter really gets a gradient
        torch.testing.assert_close(ours[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("budget", [1, 12, 10_000])  # one sample per micro-batch, a few, all in one
@pytest.mark.parametrize(("temperature", "discount"), [(1.0, 0.0), (0.8, 0.5)])
def test_first_update_equals_the_whole_batch_float64_gradient(policy, budget, temperature, discount):
    # First update: old = the policy's own logprobs (ratio 1), advantages teacher - old.
    train = TrainConfig(logprob_temperature=temperature, discount=discount)
    batches, scored, ours = learner_gradients(policy, train, budget)
    assert len(batches) == {1: 6, 12: 4, 10_000: 1}[budget]

    with torch.no_grad():
        old = reference_logprobs(policy.lm, temperature)
    for mine, ref in zip(per_sample(batches, [s.old_logprobs_BT for s in scored]), old, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)
    advantages = reference_advantages(teacher_logprobs(), old, discount)
    for mine, ref in zip(per_sample(batches, [s.advantages_BT for s in scored]), advantages, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)
    assert_same_gradients(ours, reference_gradients(policy.lm, old, advantages, train.clip_eps, temperature))


@pytest.mark.parametrize("budget", [12, 10_000])
def test_later_update_with_clipped_ratios_equals_the_whole_batch_float64_gradient(policy, budget):
    # A later update: old logprobs from before the first step, so ratios differ from 1 and some
    # lie outside the clip range (their tokens then pass no gradient on one side).
    train = TrainConfig()
    batches = micro_batches(rollouts(), graded(), pad_id=PAD_ID, max_tokens=budget, device="cpu")
    current = old_logprobs(policy, batches, 1.0)
    gen = torch.Generator().manual_seed(1)
    olds = [c + 0.8 * (torch.rand(c.shape, generator=gen, dtype=torch.float64) - 0.5) for c in current]
    advs = [
        torch.randn(c.shape, generator=gen, dtype=torch.float64) * b.mask_BT
        for c, b in zip(current, batches, strict=True)
    ]
    ratios = torch.cat([(c - o)[b.mask_BT.bool()].exp() for c, o, b in zip(current, olds, batches, strict=True)])
    assert ((ratios - 1).abs() > train.clip_eps).any() and ((ratios - 1).abs() < train.clip_eps).any()

    scored = [Scored(o, a) for o, a in zip(olds, advs, strict=True)]
    _, _, ours = learner_gradients(policy, train, budget, scored)
    reference = reference_gradients(
        policy.lm, per_sample(batches, olds), per_sample(batches, advs), train.clip_eps, 1.0
    )
    assert_same_gradients(ours, reference)


def test_micro_batches_hold_the_budget_and_every_sample_once():
    lengths = [len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    for budget in (1, 8, 12, 20, 10_000):
        batches = micro_batches(rollouts(), graded(), pad_id=PAD_ID, max_tokens=budget, device="cpu")
        assert sorted(r for b in batches for r in b.rows) == list(range(len(PROMPTS)))
        for batch in batches:
            padded = batch.packed.input_ids_BL.numel()
            assert padded <= budget or len(batch.rows) == 1, (budget, batch.rows)
            assert padded == len(batch.rows) * max(lengths[r] for r in batch.rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 999), max_size=6), st.lists(st.integers(1, 999), max_size=6)),
                min_size=1, max_size=8).filter(lambda rows: any(p or c for p, c in rows)))  # fmt: skip
def test_packing_left_pads_each_row_and_positions_skip_the_padding(rows):
    packed = pack_left_padded([p for p, _ in rows], [c for _, c in rows], PAD_ID)
    length = max(len(p) + len(c) for p, c in rows)
    assert packed.input_ids_BL.shape == (len(rows), length)
    for b, (prompt, completion) in enumerate(rows):
        pad = length - len(prompt) - len(completion)
        assert packed.input_ids_BL[b].tolist() == [PAD_ID] * pad + prompt + completion
        assert packed.attention_mask_BL[b].tolist() == [0] * pad + [1] * (length - pad)
        assert packed.position_ids_BL[b].tolist() == [0] * pad + list(range(length - pad))
        assert packed.completion_lengths_B[b] == len(completion)


def test_chunked_head_matches_the_models_own_logits_at_every_chunk_size(student_dir):
    lm = load_causal_lm(str(student_dir), "float32", "cpu").double()
    batches = micro_batches(rollouts(), graded(), pad_id=PAD_ID, max_tokens=10_000, device="cpu")
    with torch.no_grad():
        expected = reference_logprobs(lm, 1.0)
        for chunk in (1, 2, 7, 4096):
            got = per_sample(batches, old_logprobs(Policy(lm, chunk_size=chunk), batches, 1.0))
            for mine, ref in zip(got, expected, strict=True):
                torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)
    assert math.isfinite(float(torch.cat(expected).sum()))


def test_gradient_checkpointing_gives_the_same_gradients(student_dir):
    lm = load_causal_lm(str(student_dir), "float32", "cpu").double()
    plain = learner_gradients(Policy(lm).train(), TrainConfig(), 12)[2]
    recomputed = learner_gradients(Policy(lm, gradient_checkpointing=True).train(), TrainConfig(), 12)[2]
    assert lm.is_gradient_checkpointing
    assert_same_gradients(recomputed, plain)


def test_bf16_autocast_keeps_float32_master_weights_and_close_gradients(student_dir):
    fp32 = learner_gradients(Policy(load_causal_lm(str(student_dir), "float32", "cpu")).train(), TrainConfig(), 12)
    policy = Policy(load_causal_lm(str(student_dir), "float32", "cpu"), precision="bf16").train()
    bf16 = learner_gradients(policy, TrainConfig(), 12)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in policy.parameters())
    for ours, theirs in zip(bf16[1], fp32[1], strict=True):  # old logprobs: bf16 matmuls, float32 softmax
        assert ours.old_logprobs_BT.dtype == torch.float32
        torch.testing.assert_close(ours.old_logprobs_BT, theirs.old_logprobs_BT, rtol=0, atol=0.1)
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in bf16[2].values()]), torch.cat([g.flatten() for g in fp32[2].values()]), dim=0
    )
    assert cosine > 0.99


def full_teacher(vocab: int) -> list[torch.Tensor]:
    """A teacher distribution over the whole vocabulary at every completion position (float32 values)."""
    gen = torch.Generator().manual_seed(2)
    return [torch.log_softmax(3 * torch.randn(len(c), vocab, generator=gen), -1).double() for c in COMPLETIONS]


@pytest.mark.parametrize("budget", [12, 10_000])
# behaviour 1.0: off-policy samples (max_staleness >= 1) whose sampler logprobs, -1 a token, put every
# token's importance weight far from 1; a head that sums over every token exactly must not take it
@pytest.mark.parametrize("behaviour", [None, 1.0])
def test_topk_loss_with_the_whole_vocabulary_as_head_is_the_exact_reverse_kl_gradient(policy, budget, behaviour):
    vocab = policy.lm.config.vocab_size
    teacher = full_teacher(vocab)
    every_id = list(range(vocab))
    whole_head = batch_of([
        TeacherScores([row[t].item() for row, t in zip(q, c, strict=True)], top_ids=[every_id for _ in c],
                      top_logprobs=q.tolist())
        for q, c in zip(teacher, COMPLETIONS, strict=True)
    ])  # fmt: skip
    batches = micro_batches(rollouts(), whole_head, pad_id=PAD_ID, max_tokens=budget, device="cpu",
                            behaviour_temperature=behaviour)  # fmt: skip
    processes, train = Processes(False, "cpu"), TrainConfig(loss="topk")
    policy.zero_grad(set_to_none=True)
    num_tokens = global_token_count(batches, processes)
    scored, _ = accumulate_gradients(policy, batches, None, train=train, num_tokens=num_tokens, processes=processes)
    if behaviour is not None:  # the weights the tail term takes are far from 1 at every token
        weights = torch.cat([s.is_weights_BT[b.mask_BT.bool()] for s, b in zip(scored, batches, strict=True)])
        assert (weights - 1).abs().min() > 0.5, weights
    ours = {name.removeprefix("lm."): p.grad.clone() for name, p in policy.named_parameters()}

    policy.lm.zero_grad(set_to_none=True)
    kl = 0.0
    for prompt, completion, q in zip(PROMPTS, COMPLETIONS, teacher, strict=True):
        logits = policy.lm(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)], -1)
        kl = kl + (logp.exp() * (logp - q)).sum()
    (kl / sum(len(c) for c in COMPLETIONS)).backward()
    assert_same_gradients(ours, {name: p.grad.clone() for name, p in policy.lm.named_parameters()})


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a GPU (bench/device.sh profile runs this)"
            ),
        ),
    ],
)
def test_learner_adamw_takes_the_textbook_step_fused_on_cuda(device):
    """Two steps of the learner's optimizer against AdamW written out in float64."""
    train = TrainConfig(lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5, 3, generator=gen).to(device))
    grads = [torch.randn(5, 3, generator=gen).to(device) for _ in range(2)]
    optimizer = adamw([param], train)
    assert bool(optimizer.param_groups[0]["fused"]) == (device == "cuda")
    expected, m, v = param.detach().double().clone(), 0.0, 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step, grad in enumerate(grads, start=1):
        param.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        expected *= 1 - train.lr * train.weight_decay
        expected -= train.lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=1e-6)
