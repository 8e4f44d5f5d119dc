"""The sampler engine protocol: what `app.py` needs from the torch and vLLM engines."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from opd.serving import InfoResponse

if TYPE_CHECKING:  # sampler.adapters imports this module
    from grader.engine import ToScore
    from grader.tensors import ScoredBatch
    from sampler.adapters import Adapter


@dataclass(frozen=True)
class SamplingParams:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    top_logprobs: int = 0


def sample_seed(seed: int, prompt_index: int, sample_index: int, n: int) -> int:
    """The seed of sample j of prompt i in a request with `seed`: seed + i * n + j (mod 2^31 - 1).

    Distinct per sample (one seed shared by n samples would make them near-identical), and linear,
    so a learner process holding prompts [k, k + m) of a larger batch can send seed + k * n and
    draw exactly the samples one process holding the whole batch would.
    """
    return (seed + prompt_index * n + sample_index) % (2**31 - 1)


@dataclass(frozen=True)
class Sample:
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    top_ids: list[list[int]] | None = None
    """With `top_logprobs` k: the k most likely ids at each position, under the distribution sampled."""
    top_logprobs: list[list[float]] | None = None


@dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class SamplerEngine(Protocol):
    """Generation and in-place weight swaps. Implementations serialise the two internally so a
    generate call never sees a mix of old and new weights."""

    policy_version: int
    tokenizer: PreTrainedTokenizerBase

    def info(self) -> InfoResponse: ...

    def alive(self) -> bool: ...

    def chat_to_ids(self, messages: list[dict[str, str]]) -> list[int]: ...

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[int, list[list[Sample]]]:
        """Returns (policy_version used, per prompt `n` samples)."""
        ...

    def weight_specs(self) -> dict[str, WeightSpec]: ...

    async def load_weights(self, tensors: dict[str, torch.Tensor], version: int, source: str | bytearray) -> None:
        """Swap in already validated tensors and set policy_version = version. `source` is what
        they were decoded from: the safetensors file's path on a shared volume, or the pushed
        safetensors bytes; an engine whose model lives in another process (vLLM's worker) sends
        that on rather than encoding the tensors again."""
        ...

    async def load_adapter(self, adapter: "Adapter", version: int) -> None:
        """LoRA mode (`--max-lora-rank`): serve the base model with `adapter` (already checked) from
        now on, as policy_version = version; the previous adapter is dropped."""
        ...

    async def score(self, sequences: list["ToScore"], top_k: int) -> "ScoredBatch":
        """The student's logprobs of given completions (POST /v1/logprobs, as the grader's), with
        the weights (or adapter) it serves."""
        ...

    async def close(self) -> None: ...
