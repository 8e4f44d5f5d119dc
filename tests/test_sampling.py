"""The torch sampler's draw: inverse-CDF sampling from one uniform per row, checked by hand
values and by the frequencies of many draws against the distribution they come from."""

import torch

from sampler.engines.sampling import inverse_cdf, sample_next

LOGITS_V = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0, -3.0])
ONE_BELOW_1 = 1 - 2**-24  # the largest float32 uniform torch.rand returns


def test_inverse_cdf_hand_values():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])  # CDF 0.2, 0.2, 0.7, 1.0
    for u, want in [(0.0, 0), (0.1999, 0), (0.2, 2), (0.6999, 2), (0.7, 3), (ONE_BELOW_1, 3)]:
        assert inverse_cdf(probs, torch.tensor([u])).item() == want, u


def test_inverse_cdf_never_lands_on_a_token_of_probability_zero():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    for u in (0.0, 0.5, ONE_BELOW_1):
        ids = inverse_cdf(probs, torch.tensor([u, u])).tolist()
        assert ids[1] == 2 and ids[0] in (1, 2), (u, ids)
    # a total mass just under 1, as float32 softmax gives: u near 1 still lands on a real token
    assert inverse_cdf(torch.tensor([[0.3, 0.69999, 0.0]]), torch.tensor([ONE_BELOW_1])).item() == 1


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


def draw(temperature: float, top_p: float, rows: int = 60_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generators = [torch.Generator().manual_seed(0)]
    uniforms = torch.rand(rows, generator=torch.Generator().manual_seed(1))
    ids, logprobs_BV = sample_next(LOGITS_V.expand(rows, -1), temperature, top_p, uniforms, generators * rows)
    logprobs = logprobs_BV.gather(-1, ids[:, None]).squeeze(-1)
    return ids, torch.bincount(ids, minlength=len(LOGITS_V)).double(), logprobs


def test_draws_follow_the_tempered_distribution():
    ids, counts, logprobs = draw(temperature=0.7, top_p=1.0)
    probs = torch.softmax(LOGITS_V.double() / 0.7, -1)
    # 5 degrees of freedom: P(chi2 > 30) < 2e-5 for a correct sampler; fixed seeds, no flakes.
    assert chi_square(counts, probs) < 30
    torch.testing.assert_close(logprobs.double(), probs.log()[ids], rtol=0, atol=1e-6)  # each draw's own logprob


def test_top_p_draws_only_the_nucleus_in_proportion():
    _, counts, _ = draw(temperature=1.0, top_p=0.8)
    probs = torch.softmax(LOGITS_V.double(), -1)  # 0.57, 0.13, 0.03, 0.21, 0.08, 0.004
    nucleus = torch.tensor([0, 1, 3])  # 0.57 + 0.21 < 0.8 <= 0.57 + 0.21 + 0.13
    assert counts[[2, 4, 5]].sum() == 0
    assert chi_square(counts[nucleus], probs[nucleus] / probs[nucleus].sum()) < 25  # 2 dof: P < 4e-6


def test_a_decode_of_n_tokens_runs_n_forwards_and_a_seed_repeats_it(student_dir):
    from sampler.engine import SamplingParams
    from sampler.engines.torch import TorchSamplerEngine

    engine = TorchSamplerEngine(str(student_dir))
    engine.eos_ids = set()  # no row stops early: every row decodes max_tokens
    forwards = []
    engine.model.register_forward_hook(lambda *_: forwards.append(1))
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=5, seed=3)
    first = engine._generate_sync([[5, 6, 7], [8, 9]], params)
    # the prompt's forward, then one per token after the first; the last token needs no more logits
    assert len(forwards) == params.max_tokens
    assert [len(s.completion_ids) for rows in first for s in rows] == [5] * 4
    again = engine._generate_sync([[5, 6, 7], [8, 9]], params)
    assert [[s.completion_ids for s in rows] for rows in first] == [[s.completion_ids for s in rows] for rows in again]
