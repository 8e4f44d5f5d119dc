"""opd/logprobs.py: chunked LM-head logprobs against the full float64 log-softmax, values and
gradients, and proof that autograd never keeps a [N, V] tensor."""

import pytest
import torch
import torch.nn.functional as F

from opd.logprobs import token_logprobs, top_k_logprobs

N, H, V, K = 11, 8, 97, 3


def inputs(bias: bool = True):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    bias_V = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    ids = torch.randint(0, V, (N, K), generator=gen)
    return hidden, weight, bias_V, ids


def reference(hidden, weight, bias_V, ids, temperature):
    """Plain full logits and log-softmax: the [N, V] tensor the chunked version avoids."""
    logits = hidden @ weight.T + (bias_V if bias_V is not None else 0.0)
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids)


@pytest.mark.parametrize("chunk", [1, 4, N, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_the_full_log_softmax(chunk, temperature, bias):
    hidden, weight, bias_V, ids = inputs(bias)
    upstream = torch.randn(N, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = token_logprobs(hidden, weight, bias_V, ids, temperature, chunk)
    grads = torch.autograd.grad((ours * upstream).sum(), [t for t in (hidden, weight, bias_V) if t is not None])
    ref = reference(hidden, weight, bias_V, ids, temperature)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [t for t in (hidden, weight, bias_V) if t is not None])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature, aux_temperature", [(1.0, 0.7), (0.7, 1.0)])
def test_aux_column_is_the_first_ids_logprob_at_its_own_temperature_without_gradient(temperature, aux_temperature):
    hidden, weight, bias_V, ids = inputs()
    ours = token_logprobs(hidden, weight, bias_V, ids, temperature, chunk_size=4, aux_temperature=aux_temperature)
    assert ours.shape == (N, K + 1)
    torch.testing.assert_close(ours[:, :K], reference(hidden, weight, bias_V, ids, temperature), rtol=0, atol=1e-12)
    aux_ref = reference(hidden, weight, bias_V, ids[:, :1], aux_temperature)[:, 0]
    torch.testing.assert_close(ours[:, K], aux_ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(ours[:, K].sum(), [hidden, weight, bias_V], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_an_id_asked_twice_at_a_position_gets_both_gradients():
    hidden, weight, bias_V, ids = inputs()
    ids[:, 1] = ids[:, 0]
    upstream = torch.randn(N, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = torch.autograd.grad((token_logprobs(hidden, weight, bias_V, ids, 0.7, 4) * upstream).sum(), [hidden, weight])
    ref = torch.autograd.grad((reference(hidden, weight, bias_V, ids, 0.7) * upstream).sum(), [hidden, weight])
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


def test_under_bf16_autocast_gradients_are_as_close_to_float32_as_autograds():
    """The hand-written backward recomputes the head under the forward's autocast state, keeps the
    softmax in float32 and runs the matmuls in bf16, as autograd through F.linear under autocast,
    an upcast, log_softmax and gather does: its gradients (float32, for float32 master weights)
    are no further from the float32 ones than autograd's own."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    ids = torch.randint(0, V, (N, K), generator=gen)
    upstream = torch.randn(N, K, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = token_logprobs(hidden, weight, None, ids, 0.7, chunk_size=4)
        autograds = torch.log_softmax(F.linear(hidden, weight).float() / 0.7, dim=-1).gather(-1, ids)
    exact = torch.log_softmax(F.linear(hidden, weight) / 0.7, dim=-1).gather(-1, ids)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, autograds, rtol=0, atol=1e-5)
    grads = [torch.autograd.grad((out * upstream).sum(), [hidden, weight]) for out in (ours, autograds, exact)]
    for mine, theirs, truth in zip(*grads, strict=True):
        assert mine.dtype == torch.float32
        scale = float(truth.abs().max())
        assert float((mine - truth).abs().max()) <= 2 * float((theirs - truth).abs().max()) + 1e-3 * scale


def test_hand_values():
    # One position, vocabulary of 2, hidden 1: logits [2, 0]; log softmax = [2, 0] - log(e^2 + 1)
    # = [-0.126928, -2.126928]; at temperature 2 the logits are [1, 0]: [-0.313262, -1.313262].
    hidden = torch.tensor([[1.0]], dtype=torch.float64)
    weight = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1]])
    assert token_logprobs(hidden, weight, None, ids).tolist()[0] == pytest.approx([-0.126928, -2.126928], abs=1e-6)
    assert token_logprobs(hidden, weight, None, ids, 2.0).tolist()[0] == pytest.approx([-0.313262, -1.313262], abs=1e-6)


def test_autograd_never_keeps_a_full_logits_tensor():
    hidden, weight, bias_V, ids = inputs()
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(hidden, weight, bias_V, ids, 1.0, chunk_size=2).sum().backward()
    # checkpointing keeps the chunk's inputs (hidden rows, the shared weight), never its logits
    assert max(saved) == V * H
    assert not any(numel >= 2 * V for numel in saved if numel != V * H and numel != V)

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference(hidden, weight, bias_V, ids, 1.0).sum().backward()
    assert max(saved) >= N * V  # the reference does keep them: the check above can fail


def test_top_k_matches_the_full_distribution():
    hidden, weight, bias_V, _ = inputs()
    with torch.no_grad():
        full = torch.log_softmax(hidden @ weight.T + bias_V, dim=-1)
        asked = torch.randint(0, V, (N, 5), generator=torch.Generator().manual_seed(3))
        ids, logprobs, gathered = top_k_logprobs(hidden, weight, bias_V, K, chunk_size=4, ids_NC=asked)
    expected = full.topk(K, dim=-1)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(logprobs, expected.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(gathered, full.gather(-1, asked), rtol=0, atol=1e-12)
