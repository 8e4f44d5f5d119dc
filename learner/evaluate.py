"""Evaluation on held-out prompts: reverse KL to the teacher, and reward where items have answers.

The KL estimate samples the student at temperature 1 (the unbiased Monte-Carlo estimator of
KL(student || teacher) needs the student's own distribution) with a fixed seed, so two evals
differ only through the weights; the learner scores the samples in the same micro-batches as
training. Rewards use greedy completions of the items with an `answer`.
"""

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from learner.api import EvalItem
from learner.clients import GraderPool, SamplerPool
from learner.config import EvalConfig
from learner.rollout import generate, grade, sample
from learner.update import distillation_metrics, micro_batches, old_logprobs
from opd.errors import ConfigError
from sampler.schema import GenerateRequest

EVAL_SEED_OFFSET = 7_777_777
"""Keeps eval sampling seeds apart from training seeds."""


async def evaluate(
    *,
    sampler: SamplerPool,
    grader: GraderPool,
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[EvalItem],
    config: EvalConfig,
    pad_id: int,
    seed: int,
    temperature: float,
    micro_batch_tokens: int,
    device: torch.device | str,
    version: int,
) -> dict[str, float]:
    """Eval metrics of `policy` (a `learner.policy.Policy`, unwrapped) on `items`; every sample
    must come from the sampler's `version` (else StaleSamplerError)."""
    prompts = [item.prompt_ids for item in items]
    request = GenerateRequest(
        prompt_ids=prompts, n=config.n, temperature=1.0, max_tokens=config.max_tokens, seed=seed + EVAL_SEED_OFFSET
    )
    rollouts = await sample(sampler, prompts, request, eos_id=tokenizer.eos_token_id, min_version=version)
    graded = await grade(grader, rollouts)
    batches = micro_batches(rollouts, graded, pad_id=pad_id, max_tokens=micro_batch_tokens, device=device)
    tokens = torch.stack([b.mask_BT.sum() for b in batches]).sum()
    kl = distillation_metrics(batches, old_logprobs(policy, batches, temperature), tokens)["kl/reverse_per_token"]
    metrics = {
        "eval/reverse_kl_per_token": kl.item(),
        "eval/completion_length": rollouts.num_tokens / len(rollouts.completion_ids),
    }
    answered = [item for item in items if item.answer is not None]
    if answered:
        metrics["eval/reward"] = await mean_reward(sampler, tokenizer, answered, max_tokens=config.max_tokens,
                                                   version=version)  # fmt: skip
    return metrics


async def mean_reward(
    sampler: SamplerPool, tokenizer: PreTrainedTokenizerBase, items: Sequence[EvalItem], *, max_tokens: int,
    version: int,
) -> float:  # fmt: skip
    """Mean `item.get_reward(greedy completion text)` over items that have an answer."""
    request = GenerateRequest(
        prompt_ids=[item.prompt_ids for item in items], n=1, temperature=0.0, max_tokens=max_tokens
    )
    reply = await generate(sampler, request, version)
    texts = [str(tokenizer.decode(r.completions[0].completion_ids, skip_special_tokens=True)) for r in reply.results]
    rewards = [reward_of(item, text) for item, text in zip(items, texts, strict=True)]
    return sum(rewards) / len(rewards)


def reward_of(item: EvalItem, completion: str) -> float:
    """`item.get_reward(completion)` as a float; a reward function that fails, or gives no number,
    is an error that says so (the user's code, not opd's)."""
    try:
        reward = item.get_reward(completion)
        return float(reward)
    except Exception as exc:
        raise ConfigError(f"the eval reward failed on a completion ({type(exc).__name__}: {exc}): a reward takes "
                          "(completion, answer) and returns a number") from exc  # fmt: skip
