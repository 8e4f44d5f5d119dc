"""The student as the learner trains it: an `nn.Module` whose forward gives completion logprobs.

    policy = Policy(load_causal_lm("tiny:student"), precision="fp32", chunk_size=512)
    logprobs_BT = policy(*packed_batch_tensors, temperature=1.0)

The forward runs the model's body, then the LM head a chunk of positions at a time
(`opd.logprobs`), so no [B, T, V] logits exist; it is the module that DDP / FSDP wrap, so gradient
sync and FSDP's unsharding of the LM head happen inside it as they must. Weights and optimizer
state stay float32 (master weights); `precision: bf16` runs the forward under bf16 autocast.
The Hugging Face model is `policy.lm`: pushes and checkpoints use its names and format.
"""

from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from learner.config import ModelSpec, TrainConfig
from opd.errors import ConfigError
from opd.modeling import PackedBatch, completion_logprobs, load_causal_lm, pack_left_padded

if TYPE_CHECKING:  # learner.distributed imports this module
    from learner.distributed import Processes

LM_PREFIX = "lm."
"""What `Policy` puts before the Hugging Face parameter names in its own state dict."""

HEAD_CHECK_ATOL = 1e-4
"""The chunked head must reproduce the model's own logprobs this closely (float32) at start."""


class Policy(torch.nn.Module):
    def __init__(
        self, lm: PreTrainedModel, precision: str = "fp32", chunk_size: int = 512, gradient_checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.lm = lm
        self.precision = precision
        self.chunk_size = chunk_size
        # FSDP's auto-wrap policy looks here for the layers to shard one by one.
        self._no_split_modules = getattr(lm, "_no_split_modules", None)
        lm.config.use_cache = False
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        check_plain_head(lm)

    def forward(
        self,
        input_ids_BL: torch.Tensor,
        attention_mask_BL: torch.Tensor,
        position_ids_BL: torch.Tensor,
        completion_lengths_B: torch.Tensor,
        temperature: float = 1.0,
        extra_ids_BTK: torch.Tensor | None = None,
        aux_temperature: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Right-padded logprobs: of each completion token at `temperature` [B, T]; of the K
        `extra_ids_BTK` at each position [B, T, K] (or None); of each completion token at
        `aux_temperature`, without gradient [B, T] (or None)."""
        batch = PackedBatch(input_ids_BL, attention_mask_BL, position_ids_BL, completion_lengths_B)
        device_type = input_ids_BL.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = completion_logprobs(self.lm, batch, temperature, self.chunk_size, extra_ids_BTK, aux_temperature)
        if out.dim() == 2:
            return out, None, None
        extra = None if extra_ids_BTK is None else out[..., 1 : 1 + extra_ids_BTK.shape[-1]]
        return out[..., 0], extra, None if aux_temperature is None else out[..., -1]


def policy_inputs(batch: PackedBatch) -> tuple[torch.Tensor, ...]:
    """A packed batch as Policy.forward's positional tensors (DDP passes plain tensors best)."""
    return batch.input_ids_BL, batch.attention_mask_BL, batch.position_ids_BL, batch.completion_lengths_B


def student_policy(spec: ModelSpec, train: TrainConfig, device: str) -> Policy:
    """The student as configured: float32 weights, or for a LoRA student a frozen base (bf16 under
    `train.precision: bf16`) with float32 adapters."""
    dtype = "bfloat16" if spec.lora is not None and train.precision == "bf16" else "float32"
    lm = load_causal_lm(spec.path, dtype, device)
    if spec.lora is not None:
        from learner.lora import with_lora

        lm = with_lora(lm, spec.lora)
    return Policy(lm, train.precision, train.logprob_chunk_tokens, train.gradient_checkpointing)


def is_lora(lm: Any) -> bool:
    return hasattr(lm, "peft_config")


def tensors_to_push(
    processes: "Processes", policy: Any, dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """What the sampler gets: the student's parameters (HF names, tied once) cast to the sampler's
    dtype, or a LoRA student's adapter (float32, PEFT names) and the metadata carrying its config.
    A collective under FSDP: every process calls it."""
    lm = processes.unwrap(policy).lm
    if is_lora(lm):
        from learner.lora import adapter_push

        return adapter_push(lm)
    full = processes.full_parameters(policy)
    if not processes.is_main:  # only the main process sends: no cast copy elsewhere
        return full, None
    return {name: t.to(getattr(torch, dtype)) for name, t in full.items()}, None


def push_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, dtype: str) -> float:
    """Bytes of tensor data a push moves (the same on every process, cast or not)."""
    if metadata is not None:  # an adapter travels as it is
        return float(sum(t.numel() * t.element_size() for t in tensors.values()))
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return float(sum(t.numel() for t in tensors.values()) * size)


@torch.no_grad()
def check_plain_head(lm: PreTrainedModel) -> None:
    """Fail at start if the model's logits are not its body followed by its output projection.

    The chunked head computes `hidden @ W.T + b` itself; a model that scales or soft-caps its
    logits (Gemma 2, Cohere, Granite) would silently train on other numbers than it samples with.
    """
    ids = [[1, 2, 3, 4]]
    device = lm.get_output_embeddings().weight.device
    batch = pack_left_padded([ids[0][:2]], [ids[0][2:]], 0, str(device))
    training = lm.training
    lm.eval()  # no dropout in either forward
    chunked = completion_logprobs(lm, batch)
    logits = lm(input_ids=torch.tensor(ids, device=device)).logits[0, 1:3].float()
    lm.train(training)
    own = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[3], [4]], device=device))[:, 0]
    if (chunked[0].float() - own).abs().max() > HEAD_CHECK_ATOL * max(1.0, float(own.abs().max())):
        raise ConfigError(
            f"{type(lm).__name__}'s logits are not a plain projection of its last hidden states "
            "(scaled or soft-capped logits?); opd's chunked LM head supports plain linear heads only"
        )
