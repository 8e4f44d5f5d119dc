"""The learner's processes: one, or N data-parallel ones under `accelerate launch` / torchrun.

With `use_accelerate`, Hugging Face accelerate wraps model and optimizer (DDP by default, FSDP
with `train.fsdp`); each process trains on its own share of every batch, and only the main
process talks to the sampler about weights, evaluates, checkpoints and logs, while the others wait
at a barrier. Without it, every method is the plain single-process equivalent.

    accelerate launch --num_processes 8 -m opd.cli run config.yml --train.use_accelerate true
    torchrun --nproc_per_node 2 -m opd.cli run config.yml --train.use_accelerate true   # CPU, gloo
"""

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from learner.policy import LM_PREFIX
from opd import torch_thread
from opd.errors import ConfigError


class Processes:
    def __init__(self, use_accelerate: bool, device: str, fsdp: bool = False) -> None:
        torch_thread.checked_device(device, "train.device")
        self.accelerator: Any = None
        if use_accelerate:
            from accelerate import Accelerator, FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin() if fsdp else None
            self.accelerator = Accelerator(cpu=device == "cpu", fsdp_plugin=plugin)
            if fsdp and self.accelerator.distributed_type.name != "FSDP":
                # accelerate drops the FSDP plugin off GPUs instead of failing; say so.
                runs = self.accelerator.distributed_type.name  # NO: one process, not distributed
                raise ConfigError(
                    "train.fsdp needs CUDA devices; accelerate found none and runs "
                    f"{'one plain process' if runs == 'NO' else runs}"
                )
        self._device = device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator else torch.device(self._device)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return self.accelerator.prepare(model, optimizer) if self.accelerator else (model, optimizer)

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model) if self.accelerator else model

    @property
    def is_fsdp(self) -> bool:
        return self.accelerator is not None and self.accelerator.distributed_type.name == "FSDP"

    def full_parameters(self, policy: Any) -> dict[str, torch.Tensor]:
        """Every parameter of the policy's Hugging Face model (`policy.lm`) under its HF name, once
        (tied weights once), gathered whole on the main process: under FSDP each process holds
        only shards, so unwrapping is not enough."""
        lm = self.unwrap(policy).lm
        if not self.is_fsdp:
            return {name: p.detach() for name, p in lm.named_parameters()}
        state = self.accelerator.get_state_dict(policy)  # full state dict on the main process
        tied = set(getattr(lm, "_tied_weights_keys", None) or {})
        named = {name.removeprefix(LM_PREFIX): t for name, t in state.items()}
        return {name: t for name, t in named.items() if name not in tied}

    @contextmanager
    def no_sync(self, model: Any, sync: bool) -> Iterator[None]:
        """Gradient accumulation: under DDP, skip the all-reduce of backwards until `sync` (the last
        micro-batch). FSDP reduce-scatters every micro-batch: skipping would keep full gradients."""
        if self.accelerator is None or sync or self.is_fsdp:
            yield
        else:
            with self.accelerator.no_sync(model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip_grad_norm(self, model: Any, max_norm: float) -> torch.Tensor:
        if self.accelerator:
            return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over all processes."""
        return self.accelerator.reduce(value.clone(), reduction="sum") if self.accelerator else value

    def max(self, value: torch.Tensor) -> torch.Tensor:
        """Element-wise max of `value` over all processes."""
        return self.accelerator.gather(value).max(dim=0).values if self.accelerator else value

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is True on any (a collective: all processes call it)."""
        if self.accelerator is None:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def wait(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def release(self, model: Any) -> Any:
        """`model` without its data-parallel wrapper, and the accelerator's own references to the
        wrapper dropped: call before `finish`, keeping the returned model in place of the wrapper.
        DDP's reducer holds the process group; while the wrapper lives, `finish` cannot free the
        group, and gloo's worker threads run on into interpreter exit (see `finish`)."""
        if self.accelerator is None:
            return model
        plain = self.accelerator.unwrap_model(model)
        self.accelerator.free_memory()
        return plain

    def finish(self) -> None:
        """End the process group once every process is done, after `release`. A gloo worker
        thread frees each finished collective's tensors, which takes the GIL; one still doing so
        when the interpreter exits is killed inside C++ code, and the process aborts now and then
        ("terminate called without an active exception", SIGABRT after a finished run). Freed
        here, the group joins its threads first. Only on success: a failed process would leave
        the others stuck in this barrier until the timeout."""
        if self.accelerator:
            self.accelerator.wait_for_everyone()
            gc.collect()  # a released wrapper caught in a reference cycle would still hold the group
            self.accelerator.end_training()
