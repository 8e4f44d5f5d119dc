"""Generated samples as flat tensors: the /v1/generate reply with `"format": "safetensors"` (the
learner's).

A safetensors file (`safetensors.torch.load(reply.content)`) whose metadata holds
`policy_version` and `n` (samples per prompt), with the tensors

    prompt_lengths       int64   [P]       tokens of each prompt (a chat prompt as templated)
    prompt_ids           int32   [sum P]   the prompts' ids, one after another
    completion_lengths   int64   [P * n]   tokens of each sample, prompt 0's n samples first
    completion_ids       int32   [N]       every sample's ids, one after another (N in all)
    logprobs             float32 [N]       each generated token's logprob
    stopped              uint8   [P * n]   1: a stop token ended the sample ("stop"), 0: "length"
    top_ids              int32   [N, K]    with top_logprobs K: the k most likely ids, by rank
    top_logprobs         float32 [N, K]

The values are the JSON reply's. Why a second format: the JSON reply of a real step is large and
slow to read, on the learner's event loop (`bench/http_overhead.py`, 2 CPU cores):

| step | JSON: MB, write, read | safetensors: MB, write, read |
|---|---|---|
| 256 samples x 4k tokens | 27.6, 87 ms, 126 ms | 8.7, 44 ms, 100 ms |
| 32 x 4k with the student's top 16 (`top_k_head: both`) | 58.2, 251 ms, 669 ms | 17.9, 98 ms, 255-273 ms |

Most of what reading still costs is building the GenerateResponse's Python lists, with the
garbage collector paused meanwhile (`gc_paused`; 516 ms for the top-16 reply without the pause).
"""

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain

import numpy as np
import torch

from opd.errors import RequestError
from sampler import wire as safetensors_wire
from sampler.engine import Sample
from sampler.schema import Completion, GenerateResponse, PromptResult

MEDIA_TYPE = "application/vnd.opd.samples+safetensors"
INTEGER_DIMS = {
    "prompt_lengths": 1,
    "prompt_ids": 1,
    "completion_lengths": 1,
    "completion_ids": 1,
    "stopped": 1,
    "top_ids": 2,
}
"""The integer tensors of a reply, by their dimensions."""


def _flat(rows: Iterable[Iterable], count: int, dtype: type) -> torch.Tensor:
    """`count` values, row after row, as one tensor: numpy reads an iterator without building a
    list (3x faster than `torch.tensor` of the joined lists)."""
    return torch.from_numpy(np.fromiter(chain.from_iterable(rows), dtype=dtype, count=count))


def encode(version: int, prompts: list[list[int]], samples: list[list[Sample]], n: int, top_k: int) -> bytes:
    """The reply of `samples` (n per prompt, in prompt order; with `top_k`, top ids at every
    position) as safetensors."""
    flat = [s for per_prompt in samples for s in per_prompt]
    lengths = [len(s.completion_ids) for s in flat]
    tokens = sum(lengths)
    wire = {
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.int64),
        "prompt_ids": _flat(prompts, sum(len(p) for p in prompts), np.int32),
        "completion_lengths": torch.tensor(lengths, dtype=torch.int64),
        "completion_ids": _flat((s.completion_ids for s in flat), tokens, np.int32),
        "logprobs": _flat((s.logprobs for s in flat), tokens, np.float32),
        "stopped": torch.tensor([s.finish_reason == "stop" for s in flat], dtype=torch.uint8),
    }
    if top_k:
        per_position = (
            chain.from_iterable(s.top_ids or [] for s in flat),
            chain.from_iterable(s.top_logprobs or [] for s in flat),
        )
        wire["top_ids"] = _flat(per_position[0], tokens * top_k, np.int32).reshape(tokens, top_k)
        wire["top_logprobs"] = _flat(per_position[1], tokens * top_k, np.float32).reshape(tokens, top_k)
    body = safetensors_wire.encode(wire, {"policy_version": str(version), "n": str(n)})
    return b"".join(body.parts)


def decode(payload: bytes) -> GenerateResponse:
    """A safetensors reply as the GenerateResponse the JSON reply would give (built without a
    second validation: the checks here are the wire's); ValueError if it is not one."""
    try:
        wire, metadata = safetensors_wire.decode(payload, what="reply")
        version, n = int(metadata["policy_version"]), int(metadata["n"])
    except (RequestError, KeyError, ValueError) as exc:
        raise ValueError(f"not a samples reply in safetensors: {exc}") from exc
    missing = {"prompt_lengths", "prompt_ids", "completion_lengths", "completion_ids", "logprobs", "stopped"}
    missing -= wire.keys()
    if missing:
        raise ValueError(f"the reply has no {sorted(missing)}")
    for name, dims in INTEGER_DIMS.items():
        if name in wire and (wire[name].is_floating_point() or wire[name].dim() != dims):
            raise ValueError(f"{name} is not a {dims}-d integer tensor")
    prompt_lengths, lengths = wire["prompt_lengths"].tolist(), wire["completion_lengths"].tolist()
    if min(lengths + prompt_lengths, default=0) < 0:
        raise ValueError("a negative length")
    if len(lengths) != n * len(prompt_lengths) or len(wire["stopped"]) != len(lengths):
        raise ValueError(f"{len(lengths)} samples for {len(prompt_lengths)} prompts x n {n}")
    if len(wire["prompt_ids"]) != sum(prompt_lengths):
        raise ValueError(f"prompt_ids has {len(wire['prompt_ids'])} ids for prompts of {sum(prompt_lengths)}")
    tokens = sum(lengths)
    per_token = ("completion_ids", "logprobs", "top_ids", "top_logprobs")
    for name in (name for name in per_token if name in wire):
        if wire[name].shape[0] != tokens:
            raise ValueError(f"{name} has {wire[name].shape[0]} rows for {tokens} completion tokens")
    with gc_paused():
        columns = [wire[name].tolist() if name in wire else None for name in per_token]
        completions = []
        start = 0
        for length, stopped in zip(lengths, wire["stopped"].tolist(), strict=True):
            ids, logprobs, top_ids, top_logprobs = (None if c is None else c[start : start + length] for c in columns)
            completions.append(Completion.model_construct(
                completion_ids=ids, logprobs=logprobs, finish_reason="stop" if stopped else "length",
                top_ids=top_ids, top_logprobs=top_logprobs))  # fmt: skip
            start += length
        prompt_ids, results, start = wire["prompt_ids"].tolist(), [], 0
        for i, length in enumerate(prompt_lengths):
            results.append(PromptResult.model_construct(prompt_ids=prompt_ids[start : start + length],
                                                        completions=completions[i * n : (i + 1) * n]))  # fmt: skip
            start += length
    return GenerateResponse.model_construct(policy_version=version, results=results)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a while, as it was after: reading the student's
    top 16 makes a list per position (131k for 32 samples x 4k tokens), and each batch of new
    containers set off a collection that walked the ones made before (530 ms to read such a reply
    with it, 187 without). The lists hold numbers only, so there are no cycles to find."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
