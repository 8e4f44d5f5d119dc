"""LoRA students (`student.lora`): train adapters on a frozen base, push only the adapter.

    lm = with_lora(load_causal_lm("Qwen/Qwen3-8B"), config.student.lora)   # a peft model
    tensors, metadata = adapter_push(lm)      # PEFT-named lora_A / lora_B tensors + adapter_config

A full push of an 8B student moves 16 GB (bf16) every step and AdamW keeps two float32 copies of
every weight; an adapter of rank 16 is ~0.5% of that. `peft` builds and saves the adapters (the
`lora` extra); it is imported only when a config asks for LoRA, so the default install stays as is.
The adapter travels as safetensors with its PEFT `adapter_config.json` in the header's metadata
(`sampler.schema.ADAPTER_CONFIG_KEY`), over the sampler's usual POST /v1/weights.
"""

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from learner.config import LoraSpec
from opd.errors import ConfigError
from sampler.schema import ADAPTER_CONFIG_KEY

ADAPTER_CONFIG_FILE = "adapter_config.json"
"""What peft's save_pretrained writes beside a LoRA adapter: a checkpoint holding it is a LoRA
student's (`learner/checkpoint.py`)."""


def holds_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG_FILE).is_file()


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("student.lora needs peft: pip install 'opd[lora]'") from exc
    return peft


def with_lora(lm: PreTrainedModel, spec: LoraSpec) -> Any:
    """`lm` with LoRA adapters on `spec.target_modules`; only the adapters require gradients."""
    peft = _peft()
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(lm, config)


def adapter_config(lm: Any) -> dict[str, Any]:
    """The adapter's PEFT adapter_config.json content (what peft and vLLM read)."""
    config = lm.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


def adapter_push(lm: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors in PEFT naming (`base_model.model.<module>.lora_A.weight`) and the
    safetensors metadata that carries its config."""
    tensors = _peft().get_peft_model_state_dict(lm)
    return {name: t.detach() for name, t in tensors.items()}, {ADAPTER_CONFIG_KEY: json.dumps(adapter_config(lm))}


def load_adapter(lm: Any, directory: Path) -> None:
    """Load a saved adapter's weights into `lm` in place (resume)."""
    from safetensors.torch import load_file

    _peft().set_peft_model_state_dict(lm, load_file(directory / "adapter_model.safetensors"))


def merge_checkpoint(checkpoint: Path, out: Path, base: str | None = None) -> Path:
    """A merged Hugging Face model directory from a LoRA checkpoint: base + adapter, folded in."""
    from transformers import AutoTokenizer

    from opd.modeling import load_causal_lm

    if not checkpoint.is_dir():
        raise ConfigError(f"no checkpoint directory {checkpoint}")
    if not holds_adapter(checkpoint):
        raise ConfigError(f"{checkpoint} holds no LoRA adapter ({ADAPTER_CONFIG_FILE}): only a LoRA student's "
                          "checkpoint needs merging; a full student's is a Hugging Face model as it is")  # fmt: skip
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"--merge {out} exists and is not an empty directory: name a new one (opd export "
                          "overwrites nothing)")  # fmt: skip
    config = json.loads((checkpoint / ADAPTER_CONFIG_FILE).read_text())
    base_path = base or config.get("base_model_name_or_path")
    if not base_path:
        raise ConfigError(f"{checkpoint} does not name its base model; pass --base")
    try:
        model = _peft().PeftModel.from_pretrained(load_causal_lm(base_path), checkpoint)
    except (RuntimeError, ValueError, KeyError) as exc:  # torch's size mismatch, peft's missing modules
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the adapter in {checkpoint} does not fit the base model {base_path}: {reason}") from exc
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out
