"""What a toy step's requests cost beyond their engines: HTTP, parsing, hand-offs inside each server.

    python -m bench.http_overhead [--device cuda] [--requests 30] [--idle-s 0.15] [--out FILE]

Starts a torch sampler (the toy student) and a torch grader (the toy teacher), sends each the toy
step's request through the learner's own clients (128 prompts, 10 tokens; their completions graded
at top 16 as safetensors), and times each request from the client against the engine's own time,
which every reply reports (its Server-Timing header). The difference is what the loop pays per
request for running its roles in three processes. Each request is sent back to back with the one
before and again after `--idle-s` of idling, as in the loop, where a server waits while the others
work. A change to the services' request path shows here as a ratio to the same measurement before
it, without the toy loop's seconds of compute around it.

Then, without servers, what decoding a grade request's JSON costs at real sizes (a step of 128
samples of 4k tokens, and 16 samples with 16 candidate ids per token, Qwen-sized ids): pydantic's
one pass (`opd.serving.parse_json`, what the services do) against Python's json module followed by
validation (what a FastAPI body parameter does). And what a generate reply costs the sampler to
write and the learner to read, as JSON and as safetensors (`sampler/samples.py`, the learner's
format), at 256 samples of 4k tokens and at 32 samples with the student's top 16 at every token.
The toy's generate request is timed both ways too.
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from transformers import AutoTokenizer

from bench.common import call_seconds, write_results
from bench.toy_distill import machine
from examples.toy.evaluate import MAX_NEW_TOKENS
from examples.toy.prepare import distill_problems, prepare
from examples.toy.task import eval_problems, to_items
from grader.schema import LogprobsRequest, Sequence
from learner.clients import GraderPool, RetryPolicy, SamplerPool
from opd.launch import LocalServer, local_servers
from opd.serving import json_reply
from sampler import samples as samples_wire
from sampler.engine import Sample
from sampler.schema import Completion, GenerateRequest, GenerateResponse, PromptResult

TOP_K = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=30, help="timed requests of each kind (after 3 warm-up)")
    parser.add_argument("--idle-s", type=float, default=0.15, help="idle time before each request of the idle runs")
    parser.add_argument("--models", type=Path, default=Path("runs/toy"), help="toy models cache (prepare --out)")
    parser.add_argument("--out", type=Path, help="default: bench/results/http_overhead.json")
    parser.add_argument("--real-tokens", type=int, default=4096,
                        help="completion tokens per sample, real-size bodies and replies")  # fmt: skip
    return parser.parse_args()


async def timed(
    send: Callable[[], Awaitable[object]], spans: deque[tuple[float, float]], requests: int, idle_s: float
) -> dict[str, float]:
    """Median ms of a request from the client, of its engine time, and of the difference."""
    walls, engines = [], []
    for i in range(requests + 3):
        await asyncio.sleep(idle_s)
        reported = len(spans)
        start = time.perf_counter()
        await send()
        wall = time.perf_counter() - start
        if len(spans) == reported:  # (one more per reply that reports it; the client keeps 16k)
            raise RuntimeError("the reply reported no engine time (Server-Timing)")
        engine_start, engine_end = spans[-1]
        if i >= 3:
            walls.append(wall)
            engines.append(engine_end - engine_start)
    overheads = [w - e for w, e in zip(walls, engines, strict=True)]
    return {"wall_ms": _ms(statistics.median(walls)), "engine_ms": _ms(statistics.median(engines)),
            "overhead_ms": _ms(statistics.median(overheads)), "overhead_min_ms": _ms(min(overheads))}  # fmt: skip


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


async def measure(args: argparse.Namespace, sampler_url: str, grader_url: str) -> dict:
    files = prepare(args.models)
    tokenizer = AutoTokenizer.from_pretrained(files.student)
    prompts = [item.prompt_ids for item in to_items(distill_problems(eval_problems(200))[: args.batch_size], tokenizer)]
    retry = RetryPolicy(deadline_s=5)
    samplers, graders = SamplerPool([sampler_url], 60, retry), GraderPool([grader_url], 60, retry)
    request = GenerateRequest(prompt_ids=prompts, n=1, temperature=1.0, max_tokens=MAX_NEW_TOKENS, seed=0)
    try:
        reply = await samplers.generate(request)
        sequences = [Sequence(prompt_ids=r.prompt_ids, completion_ids=r.completions[0].completion_ids)
                     for r in reply.results]  # fmt: skip
        as_tensors = request.model_copy(update={"format": "safetensors"})  # what the learner asks for
        sends = {
            "generate": (lambda: samplers.generate(as_tensors), samplers.clients[0].engine_spans["/v1/generate"]),
            "generate as json": (lambda: samplers.generate(request), samplers.clients[0].engine_spans["/v1/generate"]),
            "grade": (lambda: graders.logprobs_tensors(sequences, top_k=TOP_K),
                      graders.clients[0].engine_spans["/v1/logprobs"]),
        }  # fmt: skip
        results: dict[str, dict] = {}
        for name, (send, spans) in sends.items():
            for label, idle in (("back_to_back", 0.0), ("after_idle", args.idle_s)):
                results[f"{name} {label}"] = row = await timed(send, spans, args.requests, idle)
                print(f"{name} {label}: {row}", flush=True)
        return results
    finally:
        await samplers.aclose()
        await graders.aclose()


DECODERS: dict[str, Callable[[bytes], LogprobsRequest]] = {
    "json module + validate": lambda body: LogprobsRequest.model_validate(json.loads(body)),
    "pydantic one pass": LogprobsRequest.model_validate_json,
}


def grade_body(rng: random.Random, samples: int, tokens: int, candidates: int) -> bytes:
    """A grade request's JSON: `samples` sequences of a 256-token prompt and `tokens` completion
    tokens, with `candidates` ids per completion token when above 0."""

    def ids(count: int) -> list[int]:
        return [rng.randrange(152_000) for _ in range(count)]

    sequences = []
    for _ in range(samples):
        sequence: dict = {"prompt_ids": ids(256), "completion_ids": ids(tokens)}
        if candidates:
            sequence["candidate_ids"] = [ids(candidates) for _ in range(tokens)]
        sequences.append(sequence)
    return json.dumps({"sequences": sequences, "top_k": 16, "format": "safetensors"}).encode()


def parse_costs(tokens: int, repeats: int = 5) -> dict[str, dict]:
    """Fastest ms of decoding a grade request's body each way, at sizes of real steps."""
    rng = random.Random(0)
    results = {}
    for samples, candidates in ((128, 0), (16, 16)):
        body = grade_body(rng, samples, tokens, candidates)
        row: dict[str, float] = {"body_mb": round(len(body) / 1e6, 2)}
        for way, decode in DECODERS.items():
            row[f"{way} ms"] = _ms(min(call_seconds(partial(decode, body), repeats)))
        results[f"{samples} x {tokens} tokens, {candidates} candidates"] = row
        print(f"parse {samples} x {tokens} tokens, {candidates} candidates: {row}", flush=True)
    return results


def generated(rng: random.Random, samples: int, tokens: int, top_k: int) -> tuple[list[list[int]], list[list[Sample]]]:
    """A generate reply's prompts and samples (one per prompt): 256-token prompts, `tokens` completion
    tokens with `top_k` top ids each, Qwen-sized ids."""
    prompts = [[rng.randrange(152_000) for _ in range(256)] for _ in range(samples)]
    samples_ = []
    for _ in range(samples):
        tops = [[rng.randrange(152_000) for _ in range(top_k)] for _ in range(tokens)] if top_k else None
        top_logprobs = [[-5 * rng.random() for _ in range(top_k)] for _ in range(tokens)] if top_k else None
        samples_.append([Sample([rng.randrange(152_000) for _ in range(tokens)],
                                [-5 * rng.random() for _ in range(tokens)], "length", tops, top_logprobs)])  # fmt: skip
    return prompts, samples_


def reply_costs(tokens: int, repeats: int = 3) -> dict[str, dict]:
    """Fastest ms of writing a generate reply in the sampler and reading it in the learner, as JSON
    and as safetensors, at sizes of real steps (the learner asks for safetensors)."""
    rng = random.Random(1)
    results = {}
    for samples, top_k in ((256, 0), (32, 16)):
        prompts, samples_ = generated(rng, samples, tokens, top_k)
        as_json = GenerateResponse(policy_version=1, results=[
            PromptResult(prompt_ids=p, completions=[Completion.model_construct(**vars(s)) for s in per_prompt])
            for p, per_prompt in zip(prompts, samples_, strict=True)])  # fmt: skip
        encoders = {"json": partial(lambda reply: json_reply(reply).body, as_json),
                    "safetensors": partial(samples_wire.encode, 1, prompts, samples_, 1, top_k)}  # fmt: skip
        decoders = {"json": GenerateResponse.model_validate_json, "safetensors": samples_wire.decode}
        row: dict[str, float] = {}
        for way, encode in encoders.items():
            body = encode()
            row[f"{way} mb"] = round(len(body) / 1e6, 1)
            row[f"{way} write ms"] = _ms(min(call_seconds(encode, repeats)))
            row[f"{way} read ms"] = _ms(min(call_seconds(partial(decoders[way], body), repeats)))
        results[f"{samples} x {tokens} tokens, top {top_k}"] = row
        print(f"reply {samples} x {tokens} tokens, top {top_k}: {row}", flush=True)
    return results


def main() -> None:
    args = parse_args()
    files = prepare(args.models)
    common = ["--dtype", "float32", "--device", args.device, "--engine", "torch"]
    with tempfile.TemporaryDirectory() as logs:
        servers = [LocalServer("sampler", ["--model", str(files.student), *common], Path(logs)),
                   LocalServer("grader", ["--model", str(files.teacher), *common], Path(logs))]  # fmt: skip
        with local_servers(servers) as (sampler_url, grader_url):
            requests = asyncio.run(measure(args, sampler_url, grader_url))
    results = {"machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()},
               "requests": requests, "parse": parse_costs(args.real_tokens),
               "reply": reply_costs(args.real_tokens)}  # fmt: skip
    write_results(results, args.out, "http_overhead.json")


if __name__ == "__main__":
    main()
