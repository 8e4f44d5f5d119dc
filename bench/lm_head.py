"""One LM-head chunk's forward and backward at Qwen2.5's vocabulary: opd's hand-written backward
(`opd.logprobs`) against autograd through the same head, measured in the same run.

    python -m bench.lm_head              # CPU: float32, hidden 128 (bench/learner_scale.py's body)
    python -m bench.lm_head --gpu        # GPU: bf16 autocast, hidden 896 (Qwen2.5-0.5B), peak memory
    python -m bench.lm_head --smoke      # tiny shapes, seconds (CI, through bench/device.sh --smoke)

Both sides compute the logprobs of `--ids` ids at each of `--positions` positions (the sampled
token and a top-16 head) from hidden states and a [V, H] head, then the gradients of hidden and
head. The reference is what opd ran before: log_softmax and gather under autograd, the chunk
recomputed in backward by activation checkpointing, logits upcast to float32 first.
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bench.common import median_seconds, write_results
from opd.logprobs import token_logprobs


def autograd_chunk(hidden_CH: torch.Tensor, weight_VH: torch.Tensor, ids_CK: torch.Tensor) -> torch.Tensor:
    raw_CV = F.linear(hidden_CH, weight_VH)
    return torch.log_softmax(raw_CV.to(torch.promote_types(raw_CV.dtype, torch.float32)), dim=-1).gather(-1, ids_CK)


def timed(step: Callable[[], None], repeats: int, device: str) -> dict:
    """Median milliseconds of `step` (queued GPU work included), and on a GPU its peak memory."""

    def synced() -> None:
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    synced()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = {"ms": 1000 * median_seconds(synced, repeats)}
    if device == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16 autocast, hidden 896")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--positions", type=int, default=512, help="one chunk (train.logprob_chunk_tokens)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=None, help="default: 896 with --gpu, else 128")
    parser.add_argument("--ids", type=int, default=17, help="ids scored per position")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.positions, args.vocab, args.hidden, args.repeats = 16, 1024, 32, 2
    device = "cuda" if args.gpu else "cpu"
    hidden_size = args.hidden or (896 if args.gpu else 128)
    gen = torch.Generator().manual_seed(0)
    hidden_CH = torch.randn(args.positions, hidden_size, generator=gen).to(device).requires_grad_()
    weight_VH = (torch.randn(args.vocab, hidden_size, generator=gen) * 0.02).to(device).requires_grad_()
    ids_CK = torch.randint(0, args.vocab, (args.positions, args.ids), generator=gen).to(device)

    def step(logprobs: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            hidden_CH.grad = weight_VH.grad = None
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.gpu):
                logprobs().sum().backward()

        return run

    ours = step(lambda: token_logprobs(hidden_CH, weight_VH, None, ids_CK, 1.0, args.positions))
    reference = step(lambda: checkpoint(autograd_chunk, hidden_CH, weight_VH, ids_CK, use_reentrant=False))
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.gpu else "cpu",
               "args": {k: str(v) for k, v in vars(args).items()}, "hidden": hidden_size,
               "autograd": timed(reference, args.repeats, device),
               "opd": timed(ours, args.repeats, device)}  # fmt: skip
    results["speedup"] = results["autograd"]["ms"] / results["opd"]["ms"]
    print(json.dumps(results, indent=2))
    name = "smoke-lm_head.json" if args.smoke else ("gpu-lm_head.json" if args.gpu else "lm_head.json")
    write_results(results, args.out, name)
    return results


if __name__ == "__main__":
    main()
