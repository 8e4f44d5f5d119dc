"""The PPO update over micro-batches: memory bounded by a token budget, not by the batch.

A step's samples are packed into micro-batches of at most `train.micro_batch_tokens` padded tokens
(prompt + completion; a longer sample goes alone). Each of the `ppo_steps` updates runs forward and
backward micro-batch by micro-batch, accumulating gradients, then takes one optimizer step. The
loss of every micro-batch is divided by the whole step's completion-token count (the global count
under data parallelism), so the accumulated gradient is the whole-batch gradient.

The first update's forwards also score the samples: before the first optimizer step the policy
is the old one, so its logprobs, detached, are the old logprobs (and with them the advantages);
a separate scoring pass would run the same forwards again.

Shape suffixes as in `learner/loss.py`: B = samples of one micro-batch, T = completion tokens.
"""

from dataclasses import dataclass

import torch

from learner.config import TrainConfig
from learner.distributed import Processes
from learner.loss import advantages, clipped_policy_loss, completion_mask, reverse_kl_per_token, sampler_mismatch
from learner.policy import policy_inputs
from learner.rollout import Rollouts
from opd.modeling import PackedBatch, length_sorted_chunks, pack_left_padded


@dataclass(frozen=True)
class MicroBatch:
    """Some of a step's samples, packed for one forward; [B, T] tensors right-padded."""

    rows: list[int]
    """Each sample's place in the step's rollouts."""
    packed: PackedBatch
    mask_BT: torch.Tensor
    sampler_logprobs_BT: torch.Tensor
    teacher_logprobs_BT: torch.Tensor


@dataclass(frozen=True)
class Scored:
    """One micro-batch as the update saw it first: the learner's old logprobs and the advantages."""

    old_logprobs_BT: torch.Tensor
    advantages_BT: torch.Tensor


def right_padded(rows: list[list[float]], width: int, device: torch.device | str) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


def micro_batches(
    rollouts: Rollouts, teacher_logprobs: list[list[float]], *, pad_id: int, max_tokens: int,
    device: torch.device | str,
) -> list[MicroBatch]:  # fmt: skip
    """Pack the samples by length into micro-batches of at most `max_tokens` padded tokens."""
    lengths = [len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)]
    return [
        _micro_batch(rollouts, teacher_logprobs, rows, pad_id, device)
        for rows in length_sorted_chunks(lengths, max_tokens)
    ]


def _micro_batch(
    rollouts: Rollouts, teacher_logprobs: list[list[float]], rows: list[int], pad_id: int, device: torch.device | str
) -> MicroBatch:
    completions = [rollouts.completion_ids[r] for r in rows]
    packed = pack_left_padded([rollouts.prompt_ids[r] for r in rows], completions, pad_id, str(device))
    width = max(len(c) for c in completions)
    return MicroBatch(
        rows=rows,
        packed=packed,
        mask_BT=completion_mask(packed.completion_lengths_B, width),
        sampler_logprobs_BT=right_padded([rollouts.sampler_logprobs[r] for r in rows], width, device),
        teacher_logprobs_BT=right_padded([teacher_logprobs[r] for r in rows], width, device),
    )


def policy_logprobs(policy: torch.nn.Module, batch: MicroBatch, temperature: float) -> torch.Tensor:
    return policy(*policy_inputs(batch.packed), temperature)


@torch.no_grad()
def old_logprobs(policy: torch.nn.Module, batches: list[MicroBatch], temperature: float) -> list[torch.Tensor]:
    """The policy's logprobs of every micro-batch, without gradients (evaluation)."""
    return [policy_logprobs(policy, batch, temperature) for batch in batches]


def accumulate_gradients(
    policy: torch.nn.Module,
    batches: list[MicroBatch],
    scored: list[Scored] | None,
    *,
    train: TrainConfig,
    num_tokens: torch.Tensor,
    processes: Processes,
) -> tuple[list[Scored], dict[str, float]]:
    """Forward and backward of the clipped loss over every micro-batch, gradients summed in place.

    `scored` is None on the first update: its forwards then give the old logprobs and advantages,
    returned for the later updates. Metrics are token-weighted over the micro-batches.
    """
    first = scored is None
    out: list[Scored] = []
    # loss, clipped tokens, approx-KL sum, tokens: summed on the device, read once at the end
    sums = torch.zeros(4, dtype=torch.float64, device=num_tokens.device)
    for i, batch in enumerate(batches):
        with processes.no_sync(policy, sync=i == len(batches) - 1):
            new_BT = policy_logprobs(policy, batch, train.logprob_temperature)
            this = _score(batch, new_BT.detach(), train) if first else scored[i]  # type: ignore[index]
            policy_loss = clipped_policy_loss(new_BT, this.old_logprobs_BT, this.advantages_BT, batch.mask_BT,
                                              train.clip_eps, num_tokens)  # fmt: skip
            processes.backward(policy_loss.loss)
        out.append(this)
        tokens = batch.mask_BT.sum()
        sums += torch.stack([policy_loss.loss.detach(), policy_loss.clip_frac * tokens,
                             policy_loss.approx_kl * tokens, tokens]).double()  # fmt: skip
    loss, clipped, approx_kl, tokens = sums.tolist()
    return out, {"ppo/loss": loss, "ppo/clip_frac": clipped / tokens, "ppo/approx_kl": approx_kl / tokens}


def _score(batch: MicroBatch, old_BT: torch.Tensor, train: TrainConfig) -> Scored:
    return Scored(old_BT, advantages(batch.teacher_logprobs_BT, old_BT, batch.mask_BT, train.kl_coef, train.discount))


def global_token_count(batches: list[MicroBatch], processes: Processes) -> torch.Tensor:
    """Completion tokens of the whole step over all processes, divided by the number of processes:
    the loss normaliser under which N processes' averaged gradients equal one process's."""
    local = torch.stack([batch.mask_BT.sum() for batch in batches]).sum()
    return processes.sum(local) / processes.world_size


def ppo_update(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[MicroBatch],
    *,
    train: TrainConfig,
    processes: Processes,
) -> tuple[list[Scored], dict[str, float]]:
    """`train.ppo_steps` clipped updates on one step's micro-batches; metrics of the last one."""
    num_tokens = global_token_count(batches, processes)
    scored: list[Scored] | None = None
    for _ in range(train.ppo_steps):
        optimizer.zero_grad(set_to_none=True)
        scored, metrics = accumulate_gradients(policy, batches, scored, train=train, num_tokens=num_tokens,
                                               processes=processes)  # fmt: skip
        grad_norm = processes.clip_grad_norm(policy, train.max_grad_norm)
        optimizer.step()
    assert scored is not None  # ppo_steps >= 1
    return scored, metrics | {"optim/grad_norm": grad_norm.item()}


def distillation_metrics(
    batches: list[MicroBatch], old_logprobs_BT: list[torch.Tensor], num_tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Reverse KL to the teacher and the sampler-vs-learner logprob gap, summed over micro-batches
    and divided by `num_tokens` (a data-parallel shard passes the global count; shards then sum)."""
    kl = sum(reverse_kl_per_token(old, b.teacher_logprobs_BT, b.mask_BT, num_tokens)
             for b, old in zip(batches, old_logprobs_BT, strict=True))  # fmt: skip
    gap = sum(sampler_mismatch(b.sampler_logprobs_BT, old, b.mask_BT, num_tokens)
              for b, old in zip(batches, old_logprobs_BT, strict=True))  # fmt: skip
    return {"kl/reverse_per_token": kl, "mismatch/sampler_vs_old": gap}  # type: ignore[dict-item]
