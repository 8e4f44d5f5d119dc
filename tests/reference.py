"""Independent references for the engine tests: plain full forwards, no cache, no padding."""

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def load(path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def token_logprobs(model: PreTrainedModel, prompt: list[int], completion: list[int]) -> list[float]:
    """Logprob of each completion token, from one unpadded forward over prompt + completion."""
    logits = model(torch.tensor([prompt + completion])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt) + i - 1, token].item() for i, token in enumerate(completion)]


@torch.no_grad()
def greedy(model: PreTrainedModel, prompt: list[int], max_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy decoding with a full forward per token (no KV cache)."""
    ids = list(prompt)
    for _ in range(max_tokens):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token in eos_ids:
            break
    return ids[len(prompt) :]
