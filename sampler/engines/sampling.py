"""The torch sampler's draw: one uniform per row, inverted through the row's CDF, so that a sample
does not depend on what else is in the batch and the whole batch samples in one vectorised step
(a multinomial call per row took half of the decode time at batch 128)."""

import torch


def sampling_logprobs(logits_BV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution a row samples from [B, V] (float32): the logits at
    `temperature` restricted to the top_p nucleus; at temperature 0 (greedy) the raw distribution."""
    logits_BV = logits_BV.float()
    if temperature == 0.0:
        return torch.log_softmax(logits_BV, -1)
    scaled_BV = logits_BV / temperature
    if top_p < 1.0:
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p. The first token always stays, also when
        # top_p is below float32's range (1e-147 rounds to 0 and would drop every token).
        drop_sorted_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        drop_sorted_BV[:, 0] = False
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        scaled_BV = scaled_BV.masked_fill(drop_BV, float("-inf"))
    return torch.log_softmax(scaled_BV, dim=-1)


def draw(
    logits_BV: torch.Tensor, temperature: float, top_p: float, uniforms_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row [B] and the sampled distribution's logprobs [B, V], with no host sync:
    row b inverts its CDF at `uniforms_B[b]` (greedy: argmax). A parallel cumsum may round so that
    a token of probability 0 is picked; the caller redraws those rows."""
    logprobs_BV = sampling_logprobs(logits_BV, temperature, top_p)
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1), logprobs_BV
    return inverse_cdf(logprobs_BV.exp(), uniforms_B), logprobs_BV


def inverse_cdf(probs_BV: torch.Tensor, uniforms_B: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds u x (total mass): token v is
    drawn with probability p_v (u uniform on [0, 1)). The target stays strictly below the total,
    so the search always lands on a token; a token with p = 0 adds nothing to the CDF and so is
    never the first to exceed it."""
    cdf_BV = probs_BV.cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    target_B1 = torch.minimum(
        uniforms_B[:, None].to(cdf_BV) * total_B1, torch.nextafter(total_B1, total_B1.new_zeros(()))
    )
    # Clamped: NaN probabilities (weights that overflow) put the search past the end; such rows
    # get some token and a NaN logprob, which the app refuses to hand out.
    return torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(-1).clamp(max=probs_BV.shape[-1] - 1)


def redraw(logprobs_V: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from one row's distribution on the host, for the rare row whose parallel draw
    landed on a token of probability 0."""
    return int(torch.multinomial(logprobs_V.exp().cpu(), 1, generator=generator)[0])


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float,
    top_p: float,
    uniforms_B: torch.Tensor,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw`, then the rare rows that landed on a token of probability 0 drawn again from their
    own host generators (`generators`, one per row)."""
    ids_B, logprobs_BV = draw(logits_BV, temperature, top_p, uniforms_B)
    for b in (logprobs_BV.gather(-1, ids_B[:, None]).squeeze(-1).exp() == 0).nonzero().flatten().tolist():
        ids_B[b] = redraw(logprobs_BV[b], generators[b])
    return ids_B, logprobs_BV
