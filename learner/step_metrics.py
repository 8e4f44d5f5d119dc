"""A step's metrics beyond the update's own: the distillation numbers over the whole global batch,
the policy lag and what the pipeline did. Sums and counts are all-reduced, so N processes log what
one process holding the whole batch would."""

import torch

from learner.distributed import Processes
from learner.producer import Batch
from learner.update import MicroBatch, Scored, distillation_metrics, global_token_count


def batch_metrics(
    batch: Batch, micro: list[MicroBatch], scored: list[Scored], *, processes: Processes, learner_version: int,
    step_seconds: float,
) -> dict[str, float]:  # fmt: skip
    """Reverse KL, sampler mismatch, importance ratios, lag, completion length, tokens/s."""
    tokens = global_token_count(micro, processes) * processes.world_size
    olds = [s.old_logprobs_BT for s in scored]
    out = {key: processes.sum(value).item() for key, value in distillation_metrics(micro, olds, tokens).items()}
    out |= importance_metrics(micro, scored, tokens, processes)
    rollouts, device = batch.rollouts, processes.device
    lags = torch.tensor([learner_version - v for v in rollouts.versions], dtype=torch.float64, device=device)
    counts = processes.sum(torch.tensor([rollouts.num_tokens, len(rollouts.versions), lags.sum().item(),
                                         float(batch.dropped_stale)], dtype=torch.float64, device=device))  # fmt: skip
    return out | {
        "completion/mean_length": (counts[0] / counts[1]).item(),
        "throughput/tokens_per_s": counts[0].item() / step_seconds,
        "policy/lag": (counts[2] / counts[1]).item(),
        "policy/lag_max": processes.max(lags.max().reshape(1)).item(),
        "pipeline/dropped_stale": counts[3].item(),
    }


def importance_metrics(
    micro: list[MicroBatch], scored: list[Scored], tokens: torch.Tensor, processes: Processes
) -> dict[str, float]:
    """mismatch/is_ratio_mean (proximal / behaviour, untruncated) and mismatch/is_clip_frac (the share
    of tokens whose ratio the cap truncated); only where the update weighted tokens."""
    sums = torch.zeros(2, dtype=torch.float64, device=processes.device)
    for s, b in zip(scored, micro, strict=True):
        if s.is_ratios_BT is None or s.is_weights_BT is None:
            return {}
        sums += torch.stack(
            [(s.is_ratios_BT * b.mask_BT).sum(), ((s.is_ratios_BT > s.is_weights_BT) * b.mask_BT).sum()]
        )
    sums = processes.sum(sums)
    return {"mismatch/is_ratio_mean": (sums[0] / tokens).item(), "mismatch/is_clip_frac": (sums[1] / tokens).item()}


def mean_over_processes(metrics: dict[str, float], processes: Processes) -> dict[str, float]:
    if processes.world_size == 1:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=processes.device)
    means = (processes.sum(values) / processes.world_size).tolist()
    return dict(zip(metrics, means, strict=True))
