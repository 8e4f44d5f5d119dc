"""Logprobs of chosen tokens from hidden states, a chunk of positions at a time (pure functions).

Shape suffixes: N = scored positions (flattened), H = hidden size, V = the model's vocabulary
(logits, padded ids included), K = ids per position, C = positions in one chunk.

A causal LM's logits for N positions are N x V floats: at Qwen2.5's V = 151,936 that is 600 MB
per thousand positions in float32, and log-softmax, gather and their gradients keep several
copies. Here the LM head projects `chunk_size` positions at a time, each chunk is reduced to the
K logprobs asked for, and in backward each chunk's logits are recomputed and turned into their own
gradient in place (`_ChunkLogprobs`, the fused-linear-cross-entropy idea of liger-kernel, for
logprobs at any ids), so no tensor larger than chunk_size x V is ever alive, with or without
autograd, and backward holds one such tensor at a time.

Logits are upcast to at least float32 before the softmax (a bf16 head under autocast keeps ~3
significant digits) and keep float64 when the model is float64 (the reference tests).
"""

import torch
import torch.nn.functional as F


def _chunk_logprobs(
    hidden_CH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None, ids_CK: torch.Tensor,
    temperature: float, aux_temperature: float | None,
) -> torch.Tensor:  # fmt: skip
    """One chunk's [C, K] logprobs (and the aux column), without autograd."""
    raw_CV = _raw_logits(hidden_CH, weight_VH, bias_V)
    logprobs_CK = _log_softmax_at(raw_CV, temperature, ids_CK)
    if aux_temperature is None:
        return logprobs_CK
    return torch.cat([logprobs_CK, _log_softmax_at(raw_CV, aux_temperature, ids_CK[:, :1])], dim=1)


def _raw_logits(hidden_CH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None) -> torch.Tensor:
    raw_CV = F.linear(hidden_CH, weight_VH, bias_V)
    return raw_CV.to(torch.promote_types(raw_CV.dtype, torch.float32))


class _ChunkLogprobs(torch.autograd.Function):
    """One chunk's logprobs at ids, differentiable, with the backward written out.

    With z = raw logits / T and p = softmax(z), d log p_i / d z_v = 1{v = i} - p_v, so for upstream
    gradients g_k at ids i_k the gradient with respect to the raw logits is

        (scatter_add(g at i_k) - p * sum_k g_k) / T.

    Forward keeps the chunk's inputs and each position's logsumexp; backward recomputes the logits
    and turns that one [C, V] tensor into the gradient in place (exp, scale, scatter), then runs the
    head's two matmuls. Autograd through log_softmax and gather, replayed by activation
    checkpointing, needs three [C, V] tensors for the same step (the log-softmax it keeps, gather's
    zero-filled gradient, log-softmax's gradient) and as many more passes over them: at Qwen2.5's
    vocabulary each such pass costs a good part of the matmul. Under autocast the recompute and the
    matmuls run in the autocast dtype, as autograd would run them; the softmax stays float32.
    """

    @staticmethod
    def forward(ctx, hidden_CH, weight_VH, bias_V, ids_CK, temperature, aux_temperature):  # type: ignore[override]
        raw_CV = _raw_logits(hidden_CH, weight_VH, bias_V)
        logits_CV = raw_CV if temperature == 1.0 else raw_CV / temperature
        logprobs_CK = torch.log_softmax(logits_CV, dim=-1).gather(-1, ids_CK)
        # each position's logsumexp, read back from its first id (one fused log_softmax instead of
        # logsumexp's own passes)
        lse_C1 = logits_CV.gather(-1, ids_CK[:, :1]) - logprobs_CK[:, :1]
        device_type = hidden_CH.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.temperature = temperature
        ctx.save_for_backward(hidden_CH, weight_VH, bias_V, ids_CK, lse_C1)
        if aux_temperature is None:
            return logprobs_CK
        aux_C1 = _log_softmax_at(raw_CV, aux_temperature, ids_CK[:, :1])
        return torch.cat([logprobs_CK, aux_C1], dim=1)

    @staticmethod
    def backward(ctx, grad_CK):  # type: ignore[override]
        hidden_CH, weight_VH, bias_V, ids_CK, lse_C1 = ctx.saved_tensors
        grad_CK = grad_CK[:, : ids_CK.shape[1]]  # the aux column has no gradient
        device_type, autocast, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast):
            raw_CV = F.linear(hidden_CH, weight_VH, bias_V)
        compute_dtype = raw_CV.dtype
        # a tensor of our own (F.linear's output, or its float32 copy): overwritten in place below
        grad_CV = raw_CV.to(torch.promote_types(compute_dtype, torch.float32))
        del raw_CV
        if ctx.temperature != 1.0:
            grad_CV.div_(ctx.temperature)  # z
        grad_CV.sub_(lse_C1).exp_().mul_(-grad_CK.sum(-1, keepdim=True))  # -p * sum_k g_k
        grad_CV.scatter_add_(-1, ids_CK, grad_CK.to(grad_CV.dtype))  # + g_k at i_k: the gradient in z
        if ctx.temperature != 1.0:
            grad_CV.div_(ctx.temperature)  # in the raw logits
        grad_raw_CV = grad_CV.to(compute_dtype)
        del grad_CV
        grad_hidden = grad_raw_CV @ weight_VH.to(compute_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_raw_CV.t() @ hidden_CH.to(compute_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad_raw_CV.sum(0) if bias_V is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _log_softmax_at(logits_CV: torch.Tensor, temperature: float, ids_CK: torch.Tensor) -> torch.Tensor:
    """log softmax(logits / temperature) at `ids_CK`. At a 152k vocabulary each elementwise pass
    over a chunk's logits costs a good part of the head's matmul (on a GPU, where the matmul runs
    on tensor cores and the pass at memory speed, about as much), so: no scaled copy at
    temperature 1, the usual case, and one fused log_softmax instead of logsumexp's separate
    passes. A 512-position chunk's forward and backward at 152k, hidden 128, on 2 CPU cores:
    1.47 s -> 0.98 s."""
    scaled_CV = logits_CV if temperature == 1.0 else logits_CV / temperature
    return torch.log_softmax(scaled_CV, dim=-1).gather(-1, ids_CK)


def token_logprobs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    ids_NK: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    aux_temperature: float | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias) / temperature at `ids_NK`, shape [N, K]; with
    `aux_temperature`, [N, K + 1]: a last column with the first id's logprob at that temperature,
    from the same logits and without gradient (the behaviour policy's temperature, for
    importance weights).

    Differentiable in `hidden_NH` and the head's weights when grad is enabled; each chunk's
    logits are then recomputed in backward instead of being kept (`_ChunkLogprobs`).

    Args:
        hidden_NH: final hidden states (after the model's last norm) of the positions to score.
        weight_VH, bias_V: the LM head (`model.get_output_embeddings()`), bias usually None.
        ids_NK: the token ids whose logprobs are wanted at each position.
        temperature: logits are divided by it before the softmax.
        chunk_size: positions projected at once; memory is about 2 x chunk_size x V floats
            (forward: the logits and their log-softmax; backward: one float32 buffer, plus its
            bf16 copy under autocast).
    """
    needs_grad = torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad)
    chunks = []
    for start in range(0, hidden_NH.shape[0], chunk_size):
        args = (hidden_NH[start : start + chunk_size], weight_VH, bias_V, ids_NK[start : start + chunk_size])
        if needs_grad:
            chunks.append(_ChunkLogprobs.apply(*args, temperature, aux_temperature))
        else:
            chunks.append(_chunk_logprobs(*args, temperature, aux_temperature))
    if not chunks:
        width = ids_NK.shape[1] + (aux_temperature is not None)
        return hidden_NH.new_zeros((0, width), dtype=torch.promote_types(hidden_NH.dtype, torch.float32))
    return torch.cat(chunks)


@torch.no_grad()
def top_k_logprobs(
    hidden_NH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None, k: int, chunk_size: int = 512,
    ids_NC: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The k most likely ids at each position and their logprobs (temperature 1), [N, K] each, and
    with `ids_NC` the logprobs of those ids [N, C] from the same pass over the LM head (a grader
    asking for both projects each chunk once)."""
    ids, logprobs, gathered = [], [], []
    for start in range(0, hidden_NH.shape[0], chunk_size):
        logits_CV = F.linear(hidden_NH[start : start + chunk_size], weight_VH, bias_V)
        logprobs_CV = torch.log_softmax(logits_CV.to(torch.promote_types(logits_CV.dtype, torch.float32)), dim=-1)
        top_CK = logprobs_CV.topk(k, dim=-1)
        ids.append(top_CK.indices)
        logprobs.append(top_CK.values)
        if ids_NC is not None:
            gathered.append(logprobs_CV.gather(-1, ids_NC[start : start + chunk_size]))
    return torch.cat(ids), torch.cat(logprobs), torch.cat(gathered) if ids_NC is not None else None
