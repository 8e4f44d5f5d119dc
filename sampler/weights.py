"""Decoding and checking pushed weights before any of them touches the served model.

Everything here runs before the swap, so a bad push (truncated stream, wrong checksum, unknown
or missing name, wrong shape or dtype) is refused with a 4xx and the old weights keep serving.
"""

import hashlib
import os
from pathlib import Path

import torch

from opd import torch_thread
from opd.errors import RequestError
from sampler.engine import WeightSpec
from sampler.staging import ProcFile
from sampler.wire import Decoded, decode, decode_file


def decode_safetensors(payload: bytes | bytearray, sha256: str | None) -> Decoded:
    """Tensors (views into `payload`, `sampler/wire.py`) and metadata of a safetensors byte
    string, after checking the optional SHA-256."""
    if sha256 is not None and hashlib.sha256(payload).hexdigest() != sha256.lower():
        raise RequestError("body does not match the X-Content-SHA256 header", param="body")
    return decode(payload)


def hold_file(path: str) -> ProcFile:
    """The file at `path`, held open for the whole push under a /proc name of this process: the
    checks and the engine (vLLM's worker too) then read one file, even if `path` is removed or
    names another file meanwhile (a learner's /proc/<pid>/fd/<n> is reused by its next push)."""
    try:
        found = Path(path).is_file()
    except OSError as exc:  # a name the filesystem refuses outright, e.g. a component over 255 bytes
        raise RequestError(
            f"cannot look up that path on the sampler's filesystem: {exc.strerror}", param="path"
        ) from exc
    if not found:
        kind = "a directory" if Path(path).is_dir() else "a device, pipe or socket" if Path(path).exists() else None
        what = f"{kind}, not a regular file," if kind else "no such file"
        raise RequestError(f"{what} on the sampler's filesystem: {path}", param="path")
    try:
        return ProcFile(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        raise RequestError(f"cannot read {path}: {exc.strerror}", param="path") from exc


def read_safetensors_file(held: ProcFile, shown: str) -> Decoded:
    """Tensors (views into the file's memory map) and metadata of a held safetensors file; errors
    name it `shown` (the path the client posted)."""
    try:
        return decode_file(held.path, shown)
    except OSError as exc:
        raise RequestError(f"cannot read {shown}: {exc.strerror}", param="path") from exc


def check_weights(tensors: dict[str, torch.Tensor], specs: dict[str, WeightSpec]) -> None:
    """Require exactly the model's parameter names, each with the model's shape and dtype, and
    finite values."""
    unknown = sorted(set(tensors) - set(specs))
    if unknown:
        tied = [name for name in unknown if name.endswith("lm_head.weight")]
        hint = ""
        if tied:
            hint = (f"; this model has no {tied[0]} of its own (its output layer is tied to the input embedding): "
                    "push each weight once, as named_parameters() names them, not state_dict()")  # fmt: skip
        raise RequestError(f"unknown weight names: {unknown[:5]}{hint}", param=f"weights.{unknown[0]}", status=422)
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise RequestError(f"missing weights: {missing[:5]}", param=f"weights.{missing[0]}", status=422)
    for name, tensor in tensors.items():
        _check_shape(name, tensor, specs[name])
    with torch_thread.alone_if_small(tensors.values()):
        bad = non_finite(tensors)
    if bad:
        raise RequestError(f"weight {bad[0]} has non-finite values", param=f"weights.{bad[0]}", status=422)


def _check_shape(name: str, tensor: torch.Tensor, spec: WeightSpec) -> None:
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise RequestError(
            f"weight {name} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; "
            f"the model needs shape {spec.shape} and dtype {spec.dtype}",
            param=f"weights.{name}",
            status=422,
        )


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity, in order (the tensors on one device).

    NaN and infinities propagate into a tensor's min or max: one reduction pass per tensor and no
    temporary (`isfinite(t).all()` first writes a bool per value and took 25x longer, 0.78 vs 0.03 s
    for a Qwen2.5-0.5B-shaped bf16 push on 2 cores). Every tensor's extremes are then read at once,
    so a GPU waits for the device once per push instead of twice per tensor. float64 holds every
    float dtype's values exactly, so no finite extreme turns infinite on the way."""
    floats = {name: t for name, t in tensors.items() if t.is_floating_point() and t.numel() > 0}
    if not floats:
        return []
    extremes_N2 = torch.stack([torch.stack(torch.aminmax(t)).to(torch.float64) for t in floats.values()])
    finite = torch.isfinite(extremes_N2).all(-1).tolist()
    return [name for name, ok in zip(floats, finite, strict=True) if not ok]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of `tensor` is finite (see `non_finite`)."""
    return not non_finite({"": tensor})
