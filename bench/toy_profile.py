"""Where a toy step's time goes inside opd's three roles, against the same work done GKD's way.

    python -m bench.toy_profile [--device cuda] [--repeats 10] [--out FILE]

Each phase of a toy step (batch 128, `train.loss: topk`, k 16, one update) runs here in one
process, without HTTP, on the engines' own code: the torch sampler's batched decode, the torch
grader's scoring at top 16, the learner's micro-batches and update. Beside each, what TRL's GKD
does for the same step: HF `generate`, the teacher's forward, the student's forward with the
full-vocabulary reverse KL, backward and AdamW. A phase's time here against the same phase in the
loop (`bench.toy_distill`'s time/generate and time/generate_engine) separates the engine from HTTP
and the hand-offs between processes.

With 1M-parameter models a GPU step is launch- and sync-bound, not arithmetic-bound, so torch's
profiler also counts, for one run of each phase, the aten ops it dispatched, the kernels it
launched, and the times the host waited for the device (synchronisations and device-to-host
reads): the fixed costs that decide such a step.
"""

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.common import write_results
from bench.toy_distill import machine
from examples.toy.evaluate import MAX_NEW_TOKENS
from examples.toy.prepare import distill_problems, prepare
from examples.toy.task import eval_problems, to_items
from grader.engine import ToScore
from grader.engines.torch import score_sequences
from grader.tensors import ScoredBatch
from learner.config import TrainConfig
from learner.distributed import Processes
from learner.policy import Policy
from learner.rollout import Rollouts
from learner.update import adamw, micro_batches, ppo_update
from opd import torch_thread
from opd.modeling import load_causal_lm, pack_left_padded
from sampler.engine import SamplingParams
from sampler.engines.torch import TorchSamplerEngine

TOP_K = 16
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each phase (after 2 warm-up runs)")
    parser.add_argument("--models", type=Path, default=Path("runs/toy"), help="toy models cache (prepare --out)")
    parser.add_argument("--out", type=Path, help="default: bench/results/toy_profile.json")
    return parser.parse_args()


def timed_runs(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of `fn` (after two warm-up runs), the device drained each time."""
    seconds = []
    for i in range(repeats + 2):
        _drain(device)
        start = time.perf_counter()
        fn()
        _drain(device)
        if i >= 2:
            seconds.append(time.perf_counter() - start)
    return seconds


def _drain(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dispatch_counts(fn: Callable[[], object], device: torch.device) -> dict:
    """What one run of `fn` asked of torch: aten ops, scalar reads (`.item()`, `bool(tensor)`;
    `.tolist()` is a copy, counted among the waits), kernel launches, host waits for the device
    (one of them the profiler's own at the end), and the ops that took the most host time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        _drain(device)
    events = prof.events()
    names = Counter(event.name for event in events)
    on_device = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "aten_ops": sum(n for name, n in names.items() if name.startswith("aten::")),
        "host_reads": names["aten::_local_scalar_dense"],  # .item(), bool(tensor)
        "kernel_launches": sum(names[name] for name in LAUNCH_EVENTS),
        "host_waits": sum(names[name] for name in SYNC_EVENTS),
        "device_events": len(on_device),
        "device_busy_ms": round(sum(getattr(event, "device_time", 0.0) for event in on_device) / 1e3, 3),
        "top_host_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in top},
    }


def phases(args: argparse.Namespace, facts: dict) -> dict[str, Callable[[], object]]:
    """Each measured phase as a closure over its inputs, opd's and GKD's; the inputs are a batch the
    student really sampled and the teacher really scored, as in the loop. On a GPU the sampler
    decodes with CUDA graphs, and also eagerly as the before; `facts` gets what was seen of that."""
    device = torch.device(args.device)
    files = prepare(args.models)
    tokenizer = AutoTokenizer.from_pretrained(files.student)
    pad_id = int(tokenizer.pad_token_id)
    prompts = [item.prompt_ids for item in to_items(distill_problems(eval_problems(200))[: args.batch_size], tokenizer)]
    sampler = TorchSamplerEngine(str(files.student), device=args.device)  # on a GPU: CUDA graphs
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=MAX_NEW_TOKENS, seed=0)
    started = time.perf_counter()
    samples = [s[0] for s in sampler._generate_sync(prompts, params)]
    facts["first generate, capture included (s)"] = round(time.perf_counter() - started, 3)
    facts["cuda graphs"] = any(decoder.graphs is not None for decoder in sampler._static.values())
    generators = {"opd generate (torch sampler engine)": lambda: sampler._generate_sync(prompts, params)}
    if sampler.cuda_graphs:  # the same seed eagerly: the graphs' steps compute the same draws (to rounding)
        eager_sampler = TorchSamplerEngine(str(files.student), device=args.device, enforce_eager=True)
        generators["opd generate, eager (--enforce-eager)"] = lambda: eager_sampler._generate_sync(prompts, params)
        eager = [s[0].completion_ids for s in eager_sampler._generate_sync(prompts, params)]
        same = sum(e == s.completion_ids for e, s in zip(eager, samples, strict=True))
        facts["samples identical to the eager decode's"] = f"{same} of {len(samples)}"
    completions = [s.completion_ids for s in samples]
    teacher = load_causal_lm(str(files.teacher), "float32", args.device)
    to_score = [ToScore(p, c) for p, c in zip(prompts, completions, strict=True)]

    def grade() -> ScoredBatch:
        return score_sequences(teacher, to_score, TOP_K, pad_id=pad_id, max_batch_tokens=16384)

    graded = grade()
    rollouts = Rollouts(prompts, completions, [s.logprobs for s in samples], [0] * len(prompts))
    train = TrainConfig(loss="topk", top_k=TOP_K, lr=1e-5)
    processes = Processes(use_accelerate=False, device=args.device)
    policy = Policy(load_causal_lm(str(files.student), "float32", args.device).train())
    optimizer = adamw(list(policy.parameters()), train)

    def learn() -> None:
        micro = micro_batches(rollouts, graded, pad_id=pad_id, max_tokens=train.micro_batch_tokens, device=device)
        ppo_update(policy, optimizer, micro, train=train, processes=processes)

    gkd_student = load_causal_lm(str(files.student), "float32", args.device).train()
    gkd_optimizer = torch.optim.AdamW(gkd_student.parameters(), lr=train.lr, fused=True)  # TRL's default
    gkd_prompts = pack_left_padded(prompts, [[] for _ in prompts], pad_id, args.device)
    packed = pack_left_padded(prompts, completions, pad_id, args.device)
    width = max(len(c) for c in completions)
    lengths_B = packed.completion_lengths_B

    def gkd_generate() -> torch.Tensor:
        return gkd_student.generate(input_ids=gkd_prompts.input_ids_BL, attention_mask=gkd_prompts.attention_mask_BL,
                                    max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.0, top_k=0,
                                    top_p=1.0, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip

    def gkd_learn() -> None:
        # GKD (lmbda 1, beta 1): the reverse KL over the whole vocabulary at every completion position
        inputs = {"input_ids": packed.input_ids_BL, "attention_mask": packed.attention_mask_BL}
        with torch.no_grad():
            teacher_BTV = torch.log_softmax(teacher(**inputs).logits[:, -width - 1 : -1].float(), -1)
        student_BTV = torch.log_softmax(gkd_student(**inputs).logits[:, -width - 1 : -1].float(), -1)
        # left-padded rows end together: row b's completion is its last lengths_B[b] positions
        mask_BT = torch.arange(width, device=device)[None, :] >= width - lengths_B[:, None]
        kl_BT = (student_BTV.exp() * (student_BTV - teacher_BTV)).sum(-1)
        loss = (kl_BT * mask_BT).sum() / mask_BT.sum()
        gkd_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gkd_student.parameters(), train.max_grad_norm)
        gkd_optimizer.step()

    return {
        **generators,
        "GKD generate (HF generate)": gkd_generate,
        "opd grade (torch grader engine, top 16)": grade,
        "opd learn (micro-batches + update)": learn,
        "GKD learn (teacher + student forwards, backward, step)": gkd_learn,
    }


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch_thread.use_device(device)

    facts: dict = {}

    def measure() -> dict:
        results = {}
        for name, fn in phases(args, facts).items():
            seconds = timed_runs(fn, device, args.repeats)
            results[name] = {"median_ms": round(1e3 * statistics.median(seconds), 2),
                             "min_ms": round(1e3 * min(seconds), 2)} | dispatch_counts(fn, device)  # fmt: skip
            print(f"{name}: {results[name]['median_ms']} ms, {results[name]['aten_ops']} aten ops, "
                  f"{results[name]['kernel_launches']} kernels, {results[name]['host_reads']} host reads, "
                  f"{results[name]['host_waits']} host waits, {results[name]['device_events']} device events "
                  f"busy {results[name]['device_busy_ms']} ms", flush=True)  # fmt: skip
        return results

    # CPU: on the torch thread, as the servers run their engines (one OpenMP team: opd/torch_thread.py);
    # CUDA: on the main thread, where the profiler's tracer registers (from another thread Kineto
    # reports that its init callback ran on a thread other than its own)
    phase_results = torch_thread.call(measure) if device.type == "cpu" else measure()
    results = {"machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()},
               "phases": phase_results, "sampler": facts}  # fmt: skip
    print("sampler:", facts)
    write_results(results, args.out, "toy_profile.json")


if __name__ == "__main__":
    main()
