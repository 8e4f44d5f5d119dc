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

from grader.tensors import ScoredBatch
from learner.config import TrainConfig
from learner.distributed import Processes
from learner.loss import (
    PolicyLoss,
    advantages,
    clipped_policy_loss,
    completion_mask,
    reverse_kl_per_token,
    sampler_mismatch,
    truncated_importance_weights,
)
from learner.policy import policy_inputs
from learner.rollout import Rollouts
from learner.topk import Head, head_columns, head_tensors, sampled_in_head, topk_policy_loss
from opd.modeling import (
    PackedBatch,
    completion_targets,
    length_sorted_chunks,
    pack_left_padded,
    padded_rows,
    right_padded,
)


@dataclass(frozen=True)
class MicroBatch:
    """Some of a step's samples, packed for one forward; [B, T] tensors right-padded."""

    rows: list[int]
    """Each sample's place in the step's rollouts."""
    packed: PackedBatch
    mask_BT: torch.Tensor
    sampler_logprobs_BT: torch.Tensor
    teacher_logprobs_BT: torch.Tensor
    head: Head | None = None
    """Each position's head for the top-k loss (`learner/topk.py`)."""
    behaviour_temperature: float | None = None
    """The temperature the samples were drawn at, when they may be off-policy (max_staleness > 0):
    the update then weights each token by a truncated importance ratio. None: on-policy."""


@dataclass(frozen=True)
class Scored:
    """One micro-batch as the update saw it first: the learner's old (proximal) logprobs, the
    advantages, and with off-policy samples the truncated importance weights."""

    old_logprobs_BT: torch.Tensor
    advantages_BT: torch.Tensor
    is_ratios_BT: torch.Tensor | None = None
    """proximal / behaviour probability of each sampled token, untruncated (for metrics)."""
    is_weights_BT: torch.Tensor | None = None


def micro_batches(
    rollouts: Rollouts, graded: ScoredBatch, *, pad_id: int, max_tokens: int, device: torch.device | str,
    behaviour_temperature: float | None = None,
) -> list[MicroBatch]:  # fmt: skip
    """Pack the samples by length into micro-batches of at most `max_tokens` padded tokens."""
    lengths = [len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)]
    return [
        _micro_batch(rollouts, graded, rows, pad_id, device, behaviour_temperature)
        for rows in length_sorted_chunks(lengths, max_tokens)
    ]


def _micro_batch(
    rollouts: Rollouts, graded: ScoredBatch, rows: list[int], pad_id: int, device: torch.device | str,
    behaviour_temperature: float | None,
) -> MicroBatch:  # fmt: skip
    completions = [rollouts.completion_ids[r] for r in rows]
    packed = pack_left_padded([rollouts.prompt_ids[r] for r in rows], completions, pad_id, str(device))
    width = max(len(c) for c in completions)
    teacher = graded.select(rows)
    student_top_ids = None if rollouts.student_top_ids is None else [rollouts.student_top_ids[r] for r in rows]
    columns = head_columns(teacher, student_top_ids)
    head = None if columns is None else head_tensors(*columns, teacher.lengths_B, width, device)
    return MicroBatch(
        rows=rows,
        packed=packed,
        mask_BT=completion_mask(packed.completion_lengths_B, width),
        sampler_logprobs_BT=padded_rows([rollouts.sampler_logprobs[r] for r in rows], width, torch.float32).to(device),
        teacher_logprobs_BT=right_padded(teacher.logprobs_N, teacher.lengths_B, width).to(device),
        head=head,
        behaviour_temperature=behaviour_temperature,
    )


def _policy_loss(
    policy: torch.nn.Module, batch: MicroBatch, scored: Scored | None, train: TrainConfig, num_tokens: torch.Tensor
) -> tuple[Scored, PolicyLoss]:
    """One micro-batch's forward and loss; `scored` None: the first update, which scores."""
    first = scored is None
    # The proximal policy at the behaviour temperature, when it differs from the learner's own.
    aux = batch.behaviour_temperature if first and batch.behaviour_temperature != train.logprob_temperature else None
    head_ids = None if batch.head is None else batch.head.ids_BTK
    new_BT, head_logprobs_BTK, aux_BT = policy(*policy_inputs(batch.packed), train.logprob_temperature, head_ids, aux)
    this = scored or _score(batch, new_BT.detach(), aux_BT, train)
    # w * min(r A, clip(r) A) = min(r wA, clip(r) wA) for w >= 0: the weight goes into the advantage
    weighted_BT = this.advantages_BT if this.is_weights_BT is None else this.advantages_BT * this.is_weights_BT
    if batch.head is None or head_logprobs_BTK is None:
        return this, clipped_policy_loss(new_BT, this.old_logprobs_BT, weighted_BT, batch.mask_BT,
                                         train.clip_eps, num_tokens)  # fmt: skip
    targets_BT = right_padded(completion_targets(batch.packed), batch.packed.completion_lengths_B)
    in_head_BT = sampled_in_head(targets_BT, batch.head)
    # only the tail term stands on the sampled token, so only it takes the token's importance weight;
    # the head term sums over the position's tokens exactly (learner/topk.py)
    return this, topk_policy_loss(new_BT, head_logprobs_BTK, this.old_logprobs_BT, weighted_BT, in_head_BT,
                                  batch.head, batch.mask_BT, clip_eps=train.clip_eps, kl_coef=train.kl_coef,
                                  num_tokens=num_tokens)  # fmt: skip


@torch.no_grad()
def old_logprobs(policy: torch.nn.Module, batches: list[MicroBatch], temperature: float) -> list[torch.Tensor]:
    """The policy's logprobs of every micro-batch, without gradients (evaluation)."""
    return [policy(*policy_inputs(batch.packed), temperature)[0] for batch in batches]


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
    out: list[Scored] = []
    # loss, clipped tokens, approx-KL sum, tokens: summed on the device, read once at the end
    sums = torch.zeros(4, dtype=torch.float64, device=num_tokens.device)
    for i, batch in enumerate(batches):
        with processes.no_sync(policy, sync=i == len(batches) - 1):
            this, policy_loss = _policy_loss(policy, batch, None if scored is None else scored[i], train, num_tokens)
            processes.backward(policy_loss.loss)
        out.append(this)
        tokens = batch.mask_BT.sum()
        sums += torch.stack([policy_loss.loss.detach(), policy_loss.clip_frac * tokens,
                             policy_loss.approx_kl * tokens, tokens]).double()  # fmt: skip
    loss, clipped, approx_kl, tokens = sums.tolist()
    return out, {"ppo/loss": loss, "ppo/clip_frac": clipped / tokens, "ppo/approx_kl": approx_kl / tokens}


def _score(batch: MicroBatch, old_BT: torch.Tensor, aux_BT: torch.Tensor | None, train: TrainConfig) -> Scored:
    adv_BT = advantages(batch.teacher_logprobs_BT, old_BT, batch.mask_BT, train.kl_coef, train.discount)
    if batch.behaviour_temperature is None:
        return Scored(old_BT, adv_BT)
    proximal_BT = old_BT if aux_BT is None else aux_BT
    ratios_BT, weights_BT = truncated_importance_weights(proximal_BT, batch.sampler_logprobs_BT, batch.mask_BT,
                                                         train.is_cap)  # fmt: skip
    return Scored(old_BT, adv_BT, ratios_BT, weights_BT)


def global_token_count(batches: list[MicroBatch], processes: Processes) -> torch.Tensor:
    """Completion tokens of the whole step over all processes, divided by the number of processes:
    the loss normaliser under which N processes' averaged gradients equal one process's."""
    local = torch.stack([batch.mask_BT.sum() for batch in batches]).sum()
    return processes.sum(local) / processes.world_size


def adamw(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """The learner's AdamW: on CUDA torch's fused kernel, as Hugging Face's Trainer (and so TRL)
    defaults to: one pass over weights, gradients and moments per step where the default
    multi-tensor path makes several, and one launch where a small model's step is launch-bound.
    Elsewhere torch's default. (On a CPU the fused kernel would save ~1.4 ms of the toy's ~200 ms
    step, and it rounds differently, which moves every CPU trajectory recorded in the tests and
    BENCHMARKS.md: at seed 0 the tiny run's sampled loss at ppo_steps 1 ends at 0.96 nats, not 3.57.)"""
    fused = all(p.is_floating_point() and p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused or None)


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
