"""A full weight push on the host at real shapes, each part against what it replaced, measured in
the same run: the sampler's check (`sampler.weights.check_weights` against a per-value
finiteness check), and the wire format at both ends (`sampler/wire.py` against the safetensors
library's `save` on the learner and `load` on the sampler), in seconds and in peak memory.

    python -m bench.push_check [--shapes 0.5b 1.5b] [--repeats 3]

Every full push is serialised, sent, decoded and checked before it touches the served model;
all of it runs on the host's CPU whatever the engine, so its cost is paid on every step of the
strictly on-policy loop. The tensors are random bf16 ones of Qwen2.5's parameter shapes (the
sampler's dtype on a GPU); the model is built on the meta device for its shapes only. Peak memory
is the growth of the process's resident set during one call (Linux: VmHWM after resetting it).
"""

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load, save

from bench.common import median_seconds, write_results
from bench.models import QWEN25_SHAPES
from sampler.engine import WeightSpec
from sampler.weights import check_weights
from sampler.wire import decode, encode


def parameter_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**{"head_dim": 64, **shape}))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def per_value_check(tensors: dict[str, torch.Tensor]) -> None:
    """The reference: what check_weights did before, `isfinite(t).all()` per tensor."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} has non-finite values")


def random_push(name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in parameter_shapes(QWEN25_SHAPES[name]).items()
    }


def measure_check(name: str, tensors: dict[str, torch.Tensor], repeats: int) -> dict:
    specs = {n: WeightSpec(shape=tuple(t.shape), dtype=t.dtype) for n, t in tensors.items()}
    check_weights(tensors, specs)  # warm-up, and proof the tensors pass
    ours = median_seconds(lambda: check_weights(tensors, specs), repeats)
    reference = median_seconds(lambda: per_value_check(tensors), repeats)
    row = {"shape": name, "parameters": sum(t.numel() for t in tensors.values()), "tensors": len(tensors),
           "check_weights_s": ours, "per_value_s": reference, "speedup": reference / ours}  # fmt: skip
    print(row, flush=True)
    return row


def _status_bytes(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_growth(fn: Callable[[], object]) -> int:
    """Bytes the resident set grew by at its peak during `fn()` (its result held until measured)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM") - before
    del result
    return peak


def sent_by_us(tensors: dict[str, torch.Tensor]) -> int:
    """What the learner's HTTP client is handed, piece by piece: the bytes of every chunk."""
    return sum(len(chunk) for chunk in encode(tensors).chunks())


def measure_wire(name: str, tensors: dict[str, torch.Tensor], repeats: int) -> dict:
    received = save(tensors)  # the library's reader takes bytes; sampler/app.py now receives into a bytearray
    payload = bytearray(received)
    assert sent_by_us(tensors) == len(payload)
    sides = {
        "send": (lambda: save(tensors), lambda: sent_by_us(tensors)),
        "receive": (lambda: load(received), lambda: decode(payload)),
    }
    row: dict = {"shape": name, "bytes": len(payload)}
    for side, (library, ours) in sides.items():
        ours(), library()  # warm-up
        row[f"{side}_library_s"] = median_seconds(library, repeats)
        row[f"{side}_ours_s"] = median_seconds(ours, repeats)
        row[f"{side}_library_peak_bytes"] = peak_growth(library)
        row[f"{side}_ours_peak_bytes"] = peak_growth(ours)
        row[f"{side}_speedup"] = row[f"{side}_library_s"] / row[f"{side}_ours_s"]
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(QWEN25_SHAPES), default=["0.5b", "1.5b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows, wire = [], []
    for name in args.shapes:
        tensors = random_push(name)
        rows.append(measure_check(name, tensors, args.repeats))
        wire.append(measure_wire(name, tensors, args.repeats))
        del tensors
    results = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "rows": rows, "wire": wire}  # fmt: skip
    write_results(results, args.out, "push_check.json")


if __name__ == "__main__":
    main()
