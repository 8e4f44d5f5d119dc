"""learner/loss.py against an independent float64 reference written as plain loops over tokens,
and against hand-derived values (arithmetic in the comments)."""

import math

import pytest
import torch

from learner.loss import (
    advantages,
    clipped_policy_loss,
    completion_mask,
    masked_mean,
    reverse_kl_per_token,
    sampler_mismatch,
)

# ---- the reference: lists of floats, one token at a time ----------------------------------------


def ref_mask(lengths: list[int], width: int) -> list[list[float]]:
    rows = []
    for length in lengths:
        keep = max(length, 1)
        rows.append([1.0 if t < keep else 0.0 for t in range(width)])
    return rows


def ref_advantages(teacher, old, mask, kl_coef, discount):
    out = []
    for b in range(len(teacher)):
        row = []
        for t in range(len(teacher[b])):
            if mask[b][t] == 0.0:
                row.append(0.0)
                continue
            total, weight = 0.0, 1.0
            for k in range(t, len(teacher[b])):
                if mask[b][k] == 0.0:
                    break
                term = kl_coef * (teacher[b][k] - old[b][k])
                total += weight * term
                weight *= discount
                if discount == 0.0:
                    break
            row.append(total)
        out.append(row)
    return out


def ref_loss(new, old, adv, mask, eps):
    total, count, clipped, kl = 0.0, 0.0, 0.0, 0.0
    for b in range(len(new)):
        for t in range(len(new[b])):
            if mask[b][t] == 0.0:
                continue
            ratio = math.exp(new[b][t] - old[b][t])
            clamped = min(max(ratio, 1 - eps), 1 + eps)
            total += min(ratio * adv[b][t], clamped * adv[b][t])
            clipped += 1.0 if abs(ratio - 1) > eps else 0.0
            kl += (ratio - 1) - (new[b][t] - old[b][t])
            count += 1
    return -total / count, clipped / count, kl / count


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---- masks --------------------------------------------------------------------------------------


def test_mask_covers_completion_tokens_only():
    mask = completion_mask(torch.tensor([3, 1, 4]), 4)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_empty_completion_keeps_one_token():
    # A sample that stopped at once (length 0) still has one masked-in token, never an empty row.
    mask = completion_mask(torch.tensor([0, 2]), 3)
    assert mask.tolist() == [[1, 0, 0], [1, 1, 0]]
    assert mask.tolist() == ref_mask([0, 2], 3)


def test_masked_mean_ignores_padding_and_survives_all_masked():
    values = t64([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = t64([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ---- advantages ---------------------------------------------------------------------------------


def _random_case(seed: int, lengths=(5, 1, 3, 0)):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    teacher = -torch.rand(len(lengths), width, generator=g, dtype=torch.float64) * 5
    old = -torch.rand(len(lengths), width, generator=g, dtype=torch.float64) * 5
    mask = t64(ref_mask(list(lengths), width))
    return teacher, old, mask


@pytest.mark.parametrize("kl_coef", [1.0, 0.5])
def test_advantages_without_discount(kl_coef):
    teacher, old, mask = _random_case(0)
    got = advantages(teacher, old, mask, kl_coef, 0.0)
    want = ref_advantages(teacher.tolist(), old.tolist(), mask.tolist(), kl_coef, 0.0)
    torch.testing.assert_close(got, t64(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("discount", [0.5, 0.9, 1.0])
def test_advantages_with_discount(discount):
    teacher, old, mask = _random_case(1)
    got = advantages(teacher, old, mask, 1.0, discount)
    want = ref_advantages(teacher.tolist(), old.tolist(), mask.tolist(), 1.0, discount)
    torch.testing.assert_close(got, t64(want), rtol=0, atol=1e-12)


def test_advantages_hand_derived():
    # per-token a = teacher - old = [-1-(-2), -3-(-1), -2-(-2)] = [1, -2, 0]
    teacher, old, mask = t64([[-1.0, -3.0, -2.0]]), t64([[-2.0, -1.0, -2.0]]), t64([[1, 1, 1]])
    assert advantages(teacher, old, mask, 1.0, 0.0).tolist() == [[1.0, -2.0, 0.0]]
    # discount 0.5: A2 = 0; A1 = -2 + 0.5*0 = -2; A0 = 1 + 0.5*(-2) = 0
    assert advantages(teacher, old, mask, 1.0, 0.5).tolist() == [[0.0, -2.0, 0.0]]


# ---- clipped loss -------------------------------------------------------------------------------


def test_clipped_loss_matches_reference_on_random_inputs():
    teacher, old, mask = _random_case(2)
    g = torch.Generator().manual_seed(3)
    new = old + (torch.rand(old.shape, generator=g, dtype=torch.float64) - 0.5)  # ratios in ~[0.6, 1.65]
    adv = advantages(teacher, old, mask, 1.0, 0.0)
    got = clipped_policy_loss(new, old, adv, mask, 0.2)
    want_loss, want_clip, want_kl = ref_loss(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert got.loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert got.clip_frac.item() == pytest.approx(want_clip, abs=1e-12)
    assert got.approx_kl.item() == pytest.approx(want_kl, abs=1e-12)
    assert 0.0 < want_clip < 1.0  # the case really has tokens on both sides of the clip


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    old = t64([[-1.0, -2.0]])
    adv = t64([[2.0, -1.0]])
    out = clipped_policy_loss(old.clone(), old, adv, t64([[1, 1]]), 0.2)
    assert out.loss.item() == pytest.approx(-0.5)  # -(2 + -1) / 2
    assert out.clip_frac.item() == 0.0
    assert out.approx_kl.item() == 0.0


def _grad_of_loss(log_ratio: float, adv: float, eps: float = 0.2) -> float:
    old = t64([[-1.0]])
    new = (old + log_ratio).requires_grad_(True)
    clipped_policy_loss(new, old, t64([[adv]]), t64([[1.0]]), eps).loss.backward()
    return new.grad.item()


def test_gradient_inside_clip_is_minus_ratio_times_advantage():
    # loss = -r*A with r = exp(new - old): d loss / d new = -r * A
    r = 1.1
    assert _grad_of_loss(math.log(r), 2.0) == pytest.approx(-r * 2.0, rel=1e-12)
    assert _grad_of_loss(math.log(0.9), -3.0) == pytest.approx(0.9 * 3.0, rel=1e-12)


def test_gradient_is_zero_beyond_the_clip_in_the_advantage_direction():
    # A > 0 and r = 1.5 > 1.2: the clipped branch (constant) is the min, so no gradient.
    assert _grad_of_loss(math.log(1.5), 2.0) == 0.0
    # A < 0 and r = 0.5 < 0.8: likewise.
    assert _grad_of_loss(math.log(0.5), -2.0) == 0.0


def test_gradient_survives_beyond_the_clip_against_the_advantage():
    # A > 0 but r = 0.5 < 0.8: min picks the unclipped r*A (0.5*2 = 1 < 0.8*2 = 1.6), gradient -r*A.
    assert _grad_of_loss(math.log(0.5), 2.0) == pytest.approx(-0.5 * 2.0, rel=1e-12)
    # A < 0 and r = 1.5 > 1.2: r*A = -3 < 1.2*A = -2.4, so the unclipped branch, gradient -r*A = 3.
    assert _grad_of_loss(math.log(1.5), -2.0) == pytest.approx(3.0, rel=1e-12)


def test_clip_fraction_counts_ratios_outside_the_band():
    old = t64([[0.0, 0.0, 0.0, 0.0]])
    new = t64([[math.log(1.3), math.log(0.7), math.log(1.1), math.log(5.0)]])
    mask = t64([[1, 1, 1, 0]])  # the 5.0 ratio is padding and must not count
    out = clipped_policy_loss(new, old, t64([[1.0, 1.0, 1.0, 1.0]]), mask, 0.2)
    assert out.clip_frac.item() == pytest.approx(2 / 3)


# ---- diagnostics --------------------------------------------------------------------------------


def test_reverse_kl_and_mismatch():
    student, teacher = t64([[-1.0, -2.0, 9.0]]), t64([[-3.0, -1.0, 0.0]])
    mask = t64([[1, 1, 0]])
    assert reverse_kl_per_token(student, teacher, mask).item() == pytest.approx(0.5)  # (2 + -1) / 2
    assert sampler_mismatch(student, teacher, mask).item() == pytest.approx(1.5)  # (2 + 1) / 2
    # a shard divides by the global token count (here 4): 1 / 4 and 3 / 4
    assert reverse_kl_per_token(student, teacher, mask, torch.tensor(4.0)).item() == pytest.approx(0.25)
    assert sampler_mismatch(student, teacher, mask, torch.tensor(4.0)).item() == pytest.approx(0.75)


def test_global_token_normalizer_makes_shards_add_up_to_the_whole_batch():
    # Two data-parallel shards with 3 and 1 tokens: averaging their gradients (what DDP does) with
    # num_tokens = 4 / 2 must equal the gradient of the whole batch's token mean.
    old = t64([[-1.0, -2.0, -1.5], [-0.5, 0.0, 0.0]])
    adv = t64([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]])
    mask = t64([[1, 1, 1], [1, 0, 0]])
    new = (old + 0.05).requires_grad_(True)
    clipped_policy_loss(new, old, adv, mask, 0.2).loss.backward()
    whole = new.grad.clone()
    grads = []
    for rows in ([0], [1]):
        shard = (old[rows] + 0.05).requires_grad_(True)
        clipped_policy_loss(
            shard, old[rows], adv[rows], mask[rows], 0.2, num_tokens=torch.tensor(4.0 / 2)
        ).loss.backward()
        grads.append(shard.grad / 2)  # DDP averages over 2 processes
    torch.testing.assert_close(torch.cat(grads), whole, rtol=0, atol=1e-15)
