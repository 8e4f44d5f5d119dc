"""Loading causal LMs and scoring completions with them (torch path).

Shared by the torch engines of both services and by the learner, so the grader's teacher
logprobs and the learner's student logprobs come from the same packing and gather code.

Shape suffixes: B = sequences, L = padded full length, T = completion tokens, K = top-k.
Batches are left-padded so every completion ends at the last position: the model then only
has to project the last T + 1 hidden states onto the vocabulary (`logits_to_keep`).
"""

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from opd.tiny import resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a HF model id, a local dir, or `tiny:NAME`."""
    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """A causal LM from a HF model id, a local dir, or `tiny:NAME`, in eval mode on `device`."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=DTYPES[dtype])
    return model.to(device).eval()  # type: ignore[arg-type]


@dataclass(frozen=True)
class PackedBatch:
    """prompt + completion rows, left-padded to a common length L."""

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    completion_lengths_B: torch.Tensor
    targets_BT: torch.Tensor  # completion ids, left-padded to T = max completion length


def pack_left_padded(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: str = "cpu"
) -> PackedBatch:
    """Left-pad `prompt + completion` rows; position ids skip the padding."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    length = max(len(r) for r in rows)
    max_completion = max(len(c) for c in completions)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), max_completion), pad_id, dtype=torch.long)
    for b, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        input_ids[b, length - len(row) :] = torch.tensor(row)
        attention_mask[b, length - len(row) :] = 1
        if completion:
            targets[b, max_completion - len(completion) :] = torch.tensor(completion)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
    return PackedBatch(
        input_ids.to(device),
        attention_mask.to(device),
        position_ids.to(device),
        lengths.to(device),
        targets.to(device),
    )


def completion_logits(model: PreTrainedModel, batch: PackedBatch) -> torch.Tensor:
    """Logits that predict each completion token, left-padded: shape [B, T, V].

    Row b's completion token i sits at position L - C_b + i and is predicted by the logits one
    position earlier; keeping the last T + 1 positions and dropping the final one lines these up
    with `batch.targets_BT`.
    """
    max_completion = batch.targets_BT.shape[1]
    out = model(
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
        logits_to_keep=max_completion + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]


def left_to_right_padded(values_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """Move each row's last `length` entries to the front (left- to right-padded), zero the rest."""
    max_len = values_BT.shape[1]
    positions_T = torch.arange(max_len, device=values_BT.device)
    source_BT = (positions_T[None, :] + (max_len - lengths_B)[:, None]).clamp(max=max_len - 1)
    index = source_BT.view(*source_BT.shape, *([1] * (values_BT.dim() - 2))).expand_as(values_BT)
    valid = (positions_T[None, :] < lengths_B[:, None]).view(*source_BT.shape, *([1] * (values_BT.dim() - 2)))
    return values_BT.gather(1, index) * valid


def completion_logprobs(model: PreTrainedModel, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logprob of every completion token under `model` at `temperature`, right-padded [B, T].

    Differentiable when called with grad enabled (the learner's update), float32 regardless of
    the model's dtype.
    """
    logits_BTV = completion_logits(model, batch).float() / temperature
    token_logits_BT = logits_BTV.gather(-1, batch.targets_BT.unsqueeze(-1)).squeeze(-1)
    logprobs_BT = token_logits_BT - torch.logsumexp(logits_BTV, dim=-1)
    return left_to_right_padded(logprobs_BT, batch.completion_lengths_B)


def completion_top_k(
    model: PreTrainedModel, batch: PackedBatch, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token logprobs [B, T] plus the top-k ids and logprobs [B, T, K], all right-padded."""
    logprobs_BTV = torch.log_softmax(completion_logits(model, batch).float(), dim=-1)
    token_BT = logprobs_BTV.gather(-1, batch.targets_BT.unsqueeze(-1)).squeeze(-1)
    top_logprobs_BTK, top_ids_BTK = logprobs_BTV.topk(k, dim=-1)
    lengths = batch.completion_lengths_B
    return (
        left_to_right_padded(token_BT, lengths),
        left_to_right_padded(top_ids_BTK, lengths),
        left_to_right_padded(top_logprobs_BTK, lengths),
    )
