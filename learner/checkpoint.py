"""Checkpoints: the student in Hugging Face format plus everything `--resume` needs.

    <run_dir>/checkpoints/step_000300/
        config.json, model.safetensors, tokenizer files    loadable as is by transformers and vLLM
        trainer_state.pt                                   optimizer, scheduler, RNG, data position, step

A LoRA student saves its adapter instead (adapter_config.json, adapter_model.safetensors: PEFT
format, loadable by peft and by vLLM as a LoRA adapter); `opd export CKPT --merge OUT` folds it
into its base as a plain Hugging Face model.

Each is written to a temporary directory and renamed into place, so a crash mid-save never leaves
a directory that looks complete; only the newest `keep_last` are kept.
"""

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from learner.lora import holds_adapter
from learner.policy import is_lora
from opd.errors import ConfigError
from opd.files import directory_written_aside

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass(frozen=True)
class TrainerState:
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    data: dict[str, int]
    rng: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():  # dropout on a GPU draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state: TrainerState,
    *,
    root: Path,
    keep_last: int | None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save to `root/step_{step:06d}` atomically, then prune to the newest `keep_last`.
    `weights` replaces the model's own state dict (the gathered parameters under FSDP)."""
    target = root / f"step_{state.step:06d}"
    with directory_written_aside(target) as aside:
        model.save_pretrained(aside, state_dict=weights)
        tokenizer.save_pretrained(aside)
        torch.save(vars(state), aside / STATE_FILE)
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary dirs are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_resume(root: Path, resume: str) -> Path | None:
    """`latest` -> the newest checkpoint under root (an error if none); `auto` -> the same, or None
    to start fresh (for supervisors that restart the learner); else a checkpoint directory."""
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            raise ConfigError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
        return path
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        raise ConfigError(f"--resume: no checkpoint under {root}; run without --resume to start fresh")
    return checkpoints[-1]


def load_checkpoint(model: PreTrainedModel, path: Path) -> TrainerState:
    """Load the checkpoint's weights (or a LoRA student's adapter) into `model` in place and return
    the trainer state."""
    adapter, lora = holds_adapter(path), is_lora(model)
    if adapter != lora:
        held = "a LoRA adapter" if adapter else "a full student"
        wanted = "LoRA (student.lora is set)" if lora else "full (student.lora is not set)"
        raise ConfigError(f"{path} holds {held}, but this run's student is {wanted}: resume with the student "
                          "config the checkpoint was trained with")  # fmt: skip
    if lora:
        from learner.lora import load_adapter

        load_adapter(model, path)
    else:
        saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict())
    # On the CPU first: a GPU run's checkpoint resumes on another machine too, and the optimizer's
    # load_state_dict moves each state tensor to its parameter's device anyway.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return TrainerState(**state)
