"""LoRA adapters pushed to a sampler started with `--max-lora-rank`: read, checked, written out.

An adapter arrives through POST /v1/weights like full weights (a safetensors body or a file on a
shared volume), with PEFT tensor names (`base_model.model.<module>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r]) and its PEFT adapter_config.json in the safetensors header's metadata
(`ADAPTER_CONFIG_KEY`). Everything is checked against the served model before the swap: a bad
adapter is a 422 naming what is wrong, and the old adapter keeps serving.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from opd.errors import RequestError
from sampler.engine import WeightSpec
from sampler.schema import ADAPTER_CONFIG_KEY
from sampler.weights import all_finite

_NAME = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
UNSUPPORTED = ("use_dora", "lora_bias")
"""PEFT options vLLM does not serve; an adapter that sets them is refused."""


@dataclass(frozen=True)
class Adapter:
    tensors: dict[str, torch.Tensor]
    """As pushed, PEFT names."""
    config: dict[str, Any]
    """Its adapter_config.json."""
    scale: float
    """The update is scale * B @ A: alpha / r (alpha / sqrt(r) with use_rslora)."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """HF module name (`model.layers.0.self_attn.q_proj`) -> (A [r, in], B [out, r])."""


def read_adapter(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], specs: dict[str, WeightSpec], max_rank: int
) -> Adapter:
    """Check an adapter against the model's weights (`specs`, HF names) and the served rank."""
    if ADAPTER_CONFIG_KEY not in metadata:
        raise RequestError(f"this sampler serves LoRA adapters (--max-lora-rank {max_rank}): push a PEFT adapter "
                           f"with its adapter_config.json in the safetensors metadata key {ADAPTER_CONFIG_KEY}",
                           param="weights", status=422)  # fmt: skip
    config = _config(metadata[ADAPTER_CONFIG_KEY], max_rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _NAME.match(name)
        if match is None or f"{match[1]}.weight" not in specs:
            raise RequestError(f"{name} is not a LoRA weight of a module of this model", param=f"weights.{name}",
                               status=422)  # fmt: skip
        if not all_finite(tensor):
            raise RequestError(f"weight {name} has non-finite values", param=f"weights.{name}", status=422)
        pairs.setdefault(match[1], {})[match[2]] = tensor
    modules = {module: _pair(module, found, specs, config["r"]) for module, found in pairs.items()}
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    return Adapter(tensors, config, scale, modules)


def _config(text: str, max_rank: int) -> dict[str, Any]:
    try:
        config = json.loads(text)
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RequestError(f"the adapter config is not valid: {exc!r}", param="adapter_config", status=422) from exc
    if not 0 < rank <= max_rank or not math.isfinite(alpha):
        raise RequestError(f"adapter rank {rank} is not within 1..{max_rank} (--max-lora-rank)",
                           param="adapter_config.r", status=422)  # fmt: skip
    for key in UNSUPPORTED:
        if config.get(key):
            raise RequestError(f"adapter option {key} is not supported", param=f"adapter_config.{key}", status=422)
    return config


def _pair(module: str, found: dict[str, torch.Tensor], specs: dict[str, WeightSpec], rank: int):
    if set(found) != {"A", "B"}:
        raise RequestError(f"{module} needs both lora_A and lora_B", param=f"weights.{module}", status=422)
    out_features, in_features = specs[f"{module}.weight"].shape
    a, b = found["A"], found["B"]
    if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
        raise RequestError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit a rank-{rank} "
                           f"adapter of its {out_features} x {in_features} weight", param=f"weights.{module}",
                           status=422)  # fmt: skip
    return a, b


def write_peft_dir(adapter: Adapter, directory: Path) -> None:
    """The adapter as a PEFT directory (what vLLM's LoRA loader reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(adapter.config))
    save_file({name: t.contiguous() for name, t in adapter.tensors.items()}, directory / "adapter_model.safetensors")
