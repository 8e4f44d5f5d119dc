"""One evaluator for every model in the toy comparison, run in-process with transformers.

The teacher, the students before and after, and the TRL student are all scored here, with the same
greedy decoding and the same `SortItem.get_reward`, so their rewards compare directly. The
reverse-KL estimate matches the learner's: sample the student at temperature 1 and average
`logp_student - logp_teacher` over the sampled completion tokens. Each model runs on the device
it is on (the TRL run scores its student where it trains it); results come back as Python values.
"""

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from examples.toy.task import NUM_DIGITS, SortItem
from opd.modeling import completion_logprobs, pack_left_padded

MAX_NEW_TOKENS = NUM_DIGITS + 2
"""The digits and the end token, plus one: a completion that runs on is cut, and scored wrong."""


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    sample: bool,
    seed: int = 0,
) -> list[list[int]]:
    """Completion ids (up to and including the end token) for each prompt: greedy, or sampled at T=1."""
    pad_id, device = int(tokenizer.pad_token_id), str(model.device)
    prompts_only = pack_left_padded(list(prompts), [[] for _ in prompts], pad_id, device)
    ids_BL, mask_BL = prompts_only.input_ids_BL, prompts_only.attention_mask_BL
    # the caller's RNG (e.g. a trainer's sampling) is left as it was, on the model's device too
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids_BL, attention_mask=mask_BL, max_new_tokens=MAX_NEW_TOKENS,  # type: ignore[operator]
                             do_sample=sample, temperature=1.0 if sample else None, top_k=0 if sample else None,
                             top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    completions = []
    for row in out[:, ids_BL.shape[1] :].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        completions.append(row[:end])
    return completions


def greedy_rewards(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[SortItem]
) -> list[float]:
    """`item.get_reward(greedy completion)` for each item, in order."""
    was_training = model.training
    model.eval()
    completions = generate(model, tokenizer, [item.prompt_ids for item in items], sample=False)
    model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return [item.get_reward(text) for item, text in zip(items, texts, strict=True)]


@torch.no_grad()
def reverse_kl_per_token(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[SortItem],
    seed: int,
) -> float:
    """Monte-Carlo KL(student || teacher) per completion token on the student's own samples."""
    was_training = student.training
    student.eval()
    prompts = [item.prompt_ids for item in items]
    completions = generate(student, tokenizer, prompts, sample=True, seed=seed)
    student.train(was_training)
    pad_id = int(tokenizer.pad_token_id)
    student_BT = completion_logprobs(student, pack_left_padded(prompts, completions, pad_id, str(student.device)))
    teacher_BT = completion_logprobs(teacher, pack_left_padded(prompts, completions, pad_id, str(teacher.device)))
    gap_BT = student_BT.cpu() - teacher_BT.cpu()
    lengths_B = torch.tensor([len(c) for c in completions])
    mask_BT = torch.arange(gap_BT.shape[1]) < lengths_B[:, None]  # right-padded
    return float((gap_BT * mask_BT).sum() / mask_BT.sum())
