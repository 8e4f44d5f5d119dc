"""The sampler's check of a pushed full model (`sampler.weights.check_weights`) at real shapes,
against the per-value finiteness check it replaced, measured in the same run.

    python -m bench.push_check [--shapes 0.5b 1.5b] [--repeats 3]

Every full push is checked before it touches the served model (names, shapes, dtypes, no NaN or
infinity); the check runs on the sampler's CPU whatever the engine, so its cost is paid on every
step of the strictly on-policy loop. The tensors are random bf16 ones of Qwen2.5's parameter
shapes (the sampler's dtype on a GPU); the model is built on the meta device for its shapes only.
"""

import argparse
import time
from pathlib import Path

import torch

from bench.common import median_seconds, write_results
from bench.models import QWEN25_SHAPES
from sampler.engine import WeightSpec
from sampler.weights import check_weights


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


def measure(name: str, repeats: int) -> dict:
    shapes = parameter_shapes(QWEN25_SHAPES[name])
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}
    specs = {n: WeightSpec(shape=s, dtype=torch.bfloat16) for n, s in shapes.items()}
    check_weights(tensors, specs)  # warm-up, and proof the tensors pass
    ours = median_seconds(lambda: check_weights(tensors, specs), repeats)
    reference = median_seconds(lambda: per_value_check(tensors), repeats)
    row = {"shape": name, "parameters": sum(t.numel() for t in tensors.values()), "tensors": len(tensors),
           "check_weights_s": ours, "per_value_s": reference, "speedup": reference / ours}  # fmt: skip
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(QWEN25_SHAPES), default=["0.5b", "1.5b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "rows": [measure(name, args.repeats) for name in args.shapes]}  # fmt: skip
    write_results(results, args.out, "push_check.json")


if __name__ == "__main__":
    main()
