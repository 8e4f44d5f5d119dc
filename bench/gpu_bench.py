"""Throughput of opd's vLLM services against raw vLLM, weight-push time, and one learner step.

    python bench/gpu_bench.py --preset qwen2.5 --out bench/results/gpu.json    # on a GPU
    python bench/gpu_bench.py --preset tiny --out /tmp/bench.json              # CPU smoke run

Models are random-init from config (no hub): `qwen2.5` builds the shapes of Qwen2.5-0.5B (student)
and Qwen2.5-1.5B (teacher), `tiny` the test models. Everything is measured in one run, and every
opd number is reported next to its reference measured just before on the same machine:
  1. generation tokens/s: raw in-process vLLM vs. our sampler over HTTP (same prompts, params);
  2. prompt-logprob tokens/s: raw vLLM vs. our grader over HTTP;
  3. weight push of the student: safetensors over HTTP, and a path on a shared volume;
  4. one full learner step, split into generate / grade / score / learn / push.
"""

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import torch
from safetensors.torch import save, save_file

from opd.launch import LocalServer, local_servers
from opd.tiny import build_tokenizer, ensure_tiny_model

QWEN25 = {
    "student": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "teacher": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def build_qwen25(name: str, root: Path, dtype: str) -> Path:
    """Random-init model with Qwen2.5's real shapes and our locally built tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    target = root / f"qwen2.5-{name}-random"
    if (target / "config.json").exists():
        return target
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1e6,
        dtype=dtype,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN25[name],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


async def raw_vllm(model: Path, args: argparse.Namespace, batch: list[list[int]], sequences: list[list[int]]) -> dict:
    """Reference numbers from vLLM's own in-process engine, without opd in between."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from opd.vllm_engine import VllmOptions, build_async_llm

    on_gpu = torch.cuda.is_available()
    options = VllmOptions(
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_util_raw if on_gpu else None,
        max_model_len=args.max_model_len,
        enforce_eager=not on_gpu,
        extra={"logprobs_mode": "processed_logprobs"},
    )
    engine = build_async_llm(str(model), options)

    async def timed_batch(rows: list[list[int]], params: SamplingParams) -> tuple[float, list]:
        async def one(ids: list[int]):
            final = None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=uuid.uuid4().hex):
                final = out
            return final

        start = time.perf_counter()
        outs = await asyncio.gather(*(one(r) for r in rows))
        return time.perf_counter() - start, outs

    gen = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, logprobs=0, detokenize=False, seed=1)
    score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    await timed_batch(batch[:4], gen)  # warm-up
    await timed_batch(sequences[:4], score)
    gen_s, outs = await timed_batch(batch, gen)
    score_s, _ = await timed_batch(sequences, score)
    engine.shutdown()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"generate_tokens_per_s": generated / gen_s, "score_tokens_per_s": sum(map(len, sequences)) / score_s}


def opd_services(sampler_url: str, grader_url: str, args: argparse.Namespace, batch, sequences) -> dict:
    body = {"prompt_ids": batch, "n": 1, "temperature": 1.0, "max_tokens": args.max_tokens, "seed": 1}
    httpx.post(f"{sampler_url}/v1/generate", json=body | {"prompt_ids": batch[:4]}, timeout=600)  # warm-up
    start = time.perf_counter()
    reply = httpx.post(f"{sampler_url}/v1/generate", json=body, timeout=600).json()
    gen_s = time.perf_counter() - start
    generated = sum(len(c["completion_ids"]) for r in reply["results"] for c in r["completions"])
    seqs = [{"prompt_ids": s[: len(s) // 2], "completion_ids": s[len(s) // 2 :]} for s in sequences]
    httpx.post(f"{grader_url}/v1/logprobs", json={"sequences": seqs[:4]}, timeout=600)  # warm-up
    start = time.perf_counter()
    httpx.post(f"{grader_url}/v1/logprobs", json={"sequences": seqs}, timeout=600).raise_for_status()
    score_s = time.perf_counter() - start
    return {
        "generate_tokens_per_s": generated / gen_s,
        "score_tokens_per_s": sum(map(len, sequences)) / score_s,
        "generate_mean_completion": generated / len(batch),
    }


def weight_push(sampler_url: str, student: Path, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=getattr(torch, dtype))
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    start = time.perf_counter()
    payload = save(tensors)
    response = httpx.post(f"{sampler_url}/v1/weights", content=payload, params={"version": 1}, timeout=600)
    stream_s = time.perf_counter() - start
    response.raise_for_status()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_file(tensors, f"{tmp}/w.safetensors")
        response = httpx.post(
            f"{sampler_url}/v1/weights", json={"path": f"{tmp}/w.safetensors", "version": 2}, timeout=600
        )
        path_s = time.perf_counter() - start
        response.raise_for_status()
    return {"bytes": len(payload), "stream_s": stream_s, "path_s": path_s}


def learner_step(sampler_url: str, grader_url: str, student: Path, teacher: Path, args: argparse.Namespace) -> dict:
    from learner.config import OpdConfig
    from learner.data import PromptItem
    from learner.metrics import NullLogger
    from learner.trainer import OnPolicyDistillationTrainer

    config = OpdConfig.model_validate(
        {
            "student": {"path": str(student), "dtype": args.dtype},
            "teacher": {"path": str(teacher), "dtype": args.dtype},
            "data": {"train_path": "unused.jsonl"},
            "run_dir": tempfile.mkdtemp(prefix="opd-bench-"),
            "sampling": {"n": args.n, "temperature": 1.0, "max_tokens": args.max_tokens},
            "train": {
                "steps": 2,
                "batch_size": args.step_prompts,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            },
            "services": {"sampler_url": sampler_url, "grader_url": grader_url},
            "logging": {"progress": False},
        }
    )
    items = [PromptItem(p) for p in prompts(64, args.prompt_len, 400, seed=3)]
    trainer = OnPolicyDistillationTrainer(config, train_dataset=items, eval_dataset=[], metrics=NullLogger())
    history = trainer.train()
    return {k: v for k, v in history[-1].items() if k.startswith(("time/", "throughput/"))}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["qwen2.5", "tiny"], default="qwen2.5")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench-models")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--step-prompts", type=int, default=16)
    parser.add_argument("--gpu-util-raw", type=float, default=0.5)
    parser.add_argument("--gpu-util-sampler", type=float, default=0.25)
    parser.add_argument("--gpu-util-grader", type=float, default=0.35)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    if args.preset == "tiny":
        student, teacher = ensure_tiny_model("student"), ensure_tiny_model("teacher")
    else:
        student, teacher = (build_qwen25(n, args.models, args.dtype) for n in ("student", "teacher"))
    batch = prompts(args.prompts, args.prompt_len, 400)
    sequences = prompts(args.prompts, args.prompt_len + args.max_tokens, 400, seed=1)
    results: dict = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    results["raw_vllm_student"] = asyncio.run(raw_vllm(student, args, batch, sequences))
    results["raw_vllm_teacher"] = asyncio.run(raw_vllm(teacher, args, batch[:8], sequences))

    def server(role: str, model: Path, util: float) -> LocalServer:
        flags = [
            "--model",
            str(model),
            "--engine",
            "vllm",
            "--dtype",
            args.dtype,
            "--max-model-len",
            str(args.max_model_len),
        ]
        if torch.cuda.is_available():
            flags += ["--gpu-memory-utilization", str(util)]
        return LocalServer(role, flags, Path(tempfile.mkdtemp(prefix="opd-bench-logs-")))

    with local_servers(
        [server("sampler", student, args.gpu_util_sampler), server("grader", teacher, args.gpu_util_grader)]
    ) as (s, g):
        results["opd"] = opd_services(s, g, args, batch, sequences)
        results["weight_push"] = weight_push(s, student, args.dtype)
        results["learner_step"] = learner_step(s, g, student, teacher, args)
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


def report(r: dict) -> None:
    rows = [
        ("generate tok/s (student)", r["raw_vllm_student"]["generate_tokens_per_s"], r["opd"]["generate_tokens_per_s"]),
        ("score tok/s (teacher)", r["raw_vllm_teacher"]["score_tokens_per_s"], r["opd"]["score_tokens_per_s"]),
    ]
    print(f"\n{'metric':<28}{'raw vLLM':>12}{'opd HTTP':>12}{'opd/raw':>9}")
    for name, raw, ours in rows:
        print(f"{name:<28}{raw:>12.0f}{ours:>12.0f}{ours / raw:>9.2f}")
    push = r["weight_push"]
    print(
        f"weight push {push['bytes'] / 1e6:.0f} MB: stream {push['stream_s']:.2f} s, shared path {push['path_s']:.2f} s"
    )
    print("learner step: " + ", ".join(f"{k}={v:.2f}" for k, v in r["learner_step"].items()))


if __name__ == "__main__":
    main()
