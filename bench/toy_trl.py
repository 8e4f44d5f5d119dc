"""The peer in the toy benchmark: TRL's GKDTrainer, fully on-policy with reverse KL.

lmbda=1 makes every batch the student's own samples; beta=1 makes the generalised JSD the reverse
KL(student || teacher). Everything else is set to match opd's run: one sample per prompt at
temperature 1, at most MAX_NEW_TOKENS new tokens, AdamW at a constant learning rate, gradient norm
1.0, the same prompts in the same order, the same device (`--device`: student and teacher both). A
callback times each step and, at opd's eval steps, scores the student with the same evaluator the
final table uses, writing opd's metric names to `<out>/trl/metrics.jsonl` so `opd plot` and the
benchmark's plot read both runs alike.
"""

import argparse
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer

from examples.toy.evaluate import MAX_NEW_TOKENS, greedy_rewards, reverse_kl_per_token
from examples.toy.prepare import ToyFiles
from examples.toy.task import Problem, SortItem
from learner.evaluate import EVAL_SEED_OFFSET
from learner.metrics import JsonlLogger


class MeasuredGKDTrainer(GKDTrainer):
    """GKDTrainer that records, per step, its generation time, completion tokens and per-token KL."""

    record: dict[str, float]

    def generate_on_policy_outputs(self, model, inputs, generation_config):  # type: ignore[override]
        start = time.perf_counter()
        outputs = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
        self.record["time/generate"] = time.perf_counter() - start
        self.record["tokens"] = float((outputs[2] != -100).sum())
        return outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        # Trainer counts num_items_in_batch on the dataset's labels, before generation replaced
        # them (10 answer tokens per row, not the ~9 sampled); without it GKD takes the mean over
        # the sampled tokens, the normaliser opd uses too.
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)
        value = loss[0] if return_outputs else loss
        self.record["kl/reverse_per_token"] = float(value.detach())
        return loss


class StepMetrics(TrainerCallback):
    """Times steps and evaluates every `eval_steps` (and before the first, after the last)."""

    def __init__(self, trainer_ref: list, teacher: Any, tokenizer: Any, eval_items: list[SortItem],
                 eval_steps: int, seed: int, logger: JsonlLogger) -> None:  # fmt: skip
        self.trainer_ref, self.teacher, self.tokenizer = trainer_ref, teacher, tokenizer
        self.eval_items, self.eval_steps, self.seed, self.logger = eval_items, eval_steps, seed, logger
        self.start = 0.0

    def evaluate(self, model: Any) -> dict[str, float]:
        rewards = greedy_rewards(model, self.tokenizer, self.eval_items)
        kl = reverse_kl_per_token(model, self.teacher, self.tokenizer, self.eval_items, self.seed + EVAL_SEED_OFFSET)
        return {"eval/reward": sum(rewards) / len(rewards), "eval/reverse_kl_per_token": kl}

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.logger.log(self.evaluate(model), step=0)

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.trainer_ref[0].record = {}
        finish_gpu_work(args.device)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        finish_gpu_work(args.device)  # the clipping and AdamW step may still be queued on a GPU
        step_s = time.perf_counter() - self.start
        record = dict(self.trainer_ref[0].record)
        tokens = record.pop("tokens")
        metrics = {**record, "time/learn": step_s - record["time/generate"], "time/step": step_s,
                   "throughput/tokens_per_s": tokens / step_s,
                   "completion/mean_length": tokens / args.train_batch_size}  # fmt: skip
        if (self.eval_steps and state.global_step % self.eval_steps == 0) or state.global_step == state.max_steps:
            metrics |= self.evaluate(model)
        self.logger.log(metrics, step=state.global_step)


def finish_gpu_work(device: torch.device) -> None:
    """Wait for `device`'s queued kernels, so each step's clock holds its own GPU work (opd's learner
    reads its loss and grad norm as numbers, which waits the same way)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chat_rows(problems: list[Problem]) -> Dataset:
    """GKD's collator takes chat messages; the prompt is everything before the last (assistant) turn."""
    rows = [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}] for p in problems]
    return Dataset.from_list([{"messages": messages} for messages in rows])


def gkd_config(
    out: str, *, batch_size: int, steps: int, lr: float, max_new_tokens: int, seed: int, device: str, bf16: bool = False
) -> GKDConfig:
    """Fully on-policy GKD with the exact reverse KL (lmbda 1, beta 1) and opd's optimizer settings
    (constant lr, no weight decay, grad norm 1.0), the batches in dataset order."""
    return GKDConfig(
        output_dir=out, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
        per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        # SFTConfig's defaults would train in bf16 autocast with gradient checkpointing, which
        # also turns off the KV cache in generation; opd runs float32 with a cache (bf16: autocast
        # only where the caller asks, as gkd_scale does on a GPU).
        bf16=bf16, gradient_checkpointing=False,
        train_sampling_strategy="sequential", seed=seed, use_cpu=device == "cpu", report_to="none",
        save_strategy="no", logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip


def run_trl(
    files: ToyFiles, train_problems: list[Problem], eval_items: list[SortItem], args: argparse.Namespace
) -> dict:
    """Distil with GKDTrainer; returns wall time and the directory of the final student."""
    start = time.perf_counter()
    out = args.out / "trl"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(files.student)
    teacher = AutoModelForCausalLM.from_pretrained(files.teacher).eval()
    logger, ref = JsonlLogger(out / "metrics.jsonl"), [None]
    config = gkd_config(str(out), batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                        max_new_tokens=MAX_NEW_TOKENS, seed=args.seed, device=args.device)  # fmt: skip
    trainer = MeasuredGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(files.student), teacher_model=teacher,
        args=config, train_dataset=chat_rows(train_problems), processing_class=tokenizer,
        callbacks=[StepMetrics(ref, teacher, tokenizer, eval_items, args.eval_steps, args.seed, logger)],
    )  # fmt: skip
    ref[0] = trainer
    if trainer.accelerator.native_amp or trainer.generation_config.use_cache is not True:
        raise RuntimeError("the TRL run must use float32 and a KV cache, as opd does")
    try:
        trainer.train()
    finally:
        logger.close()
    final = out / "final"
    trainer.save_model(str(final))
    return {"wall_s": time.perf_counter() - start, "run_dir": str(out), "final_dir": str(final)}
