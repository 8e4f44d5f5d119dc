"""`OnPolicyDistillationTrainer`: the on-policy distillation loop.

Each step: sample completions from the sampler (the student's current weights), grade them with
the teacher, score them with the learner's own student (old logprobs, mask, advantages), take
`ppo_steps` clipped updates, push the new weights to the sampler, log. See ../shared/DESIGN.md.

    trainer = OnPolicyDistillationTrainer(load_config("examples/tiny.yml"))
    trainer.train()
"""

import asyncio
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from learner.checkpoint import TrainerState, load_checkpoint, restore_rng, rng_state, save_checkpoint
from learner.clients import GraderClient, RetryPolicy, SamplerClient
from learner.config import OpdConfig, dump_config
from learner.data import PromptItem, PromptStream, load_prompts
from learner.evaluate import evaluate
from learner.loss import clipped_policy_loss, reverse_kl_per_token, sampler_mismatch
from learner.metrics import JsonlLogger, MetricsLogger, timed, truncate_metrics
from learner.rollout import Rollouts, ScoredBatch, grade, sample, score
from learner.services import service_urls
from opd.auth import load_api_key
from opd.errors import SamplerError
from opd.modeling import completion_logprobs, load_causal_lm, load_tokenizer
from opd.tokenizer import check_same_tokenizer, tokenizer_fingerprint
from sampler.schema import GenerateRequest

logger = logging.getLogger(__name__)


class OnPolicyDistillationTrainer:
    def __init__(
        self,
        config: OpdConfig,
        train_dataset: list[PromptItem] | None = None,
        eval_dataset: list[PromptItem] | None = None,
        metrics: MetricsLogger | None = None,
        resume_from: Path | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        torch.manual_seed(config.train.seed)
        self.tokenizer = load_tokenizer(config.student.path)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.model = load_causal_lm(config.student.path, "float32", config.train.device).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        warmup = config.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.train_items = train_dataset if train_dataset is not None else self._load(config.data.train_path)
        self.eval_items = eval_dataset if eval_dataset is not None else self._load(config.data.eval_path)
        self.prompts = PromptStream(self.train_items, config.train.batch_size, config.train.seed, config.data.shuffle)
        self.policy_version = 0
        self.step_count = 0
        if resume_from is not None:
            self._resume(Path(resume_from))
        self.metrics = metrics or JsonlLogger(self.run_dir / "metrics.jsonl")

    def _load(self, path: str | None) -> list[PromptItem]:
        if path is None:
            return []
        data = self.config.data
        return load_prompts(path, self.tokenizer, data.chat_template, data.max_prompt_tokens)

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run `train.steps` steps (starting local servers if the config names none)."""
        dump_config(self.config, self.run_dir / "config.yml")
        with service_urls(self.config, self.run_dir / "logs") as (sampler_url, grader_url):
            return asyncio.run(self._train(sampler_url, grader_url))

    async def _train(self, sampler_url: str, grader_url: str) -> list[dict[str, float]]:
        services = self.config.services
        retry = RetryPolicy(deadline_s=services.retry_deadline_s)
        api_key = load_api_key(services.api_key_file)
        self.sampler = SamplerClient(sampler_url, services.request_timeout_s, retry, api_key)
        self.grader = GraderClient(grader_url, services.request_timeout_s, retry)
        history = []
        try:
            await self.check_services()
            await self.push_weights()
            history = await self._run_steps()
        finally:
            await self.sampler.aclose()
            await self.grader.aclose()
            self.metrics.close()
        return history

    async def _run_steps(self) -> list[dict[str, float]]:
        cfg = self.config
        history = []
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step_count,
            desc="opd",
            disable=not cfg.logging.progress,
            dynamic_ncols=True,
        )
        if cfg.eval.eval_steps and self.eval_items and self.step_count == 0:
            self.metrics.log(await self.evaluate(), step=0)
        while self.step_count < cfg.train.steps:
            metrics = await self.step()
            if (
                cfg.eval.eval_steps
                and self.eval_items
                and (self.step_count % cfg.eval.eval_steps == 0 or self.step_count == cfg.train.steps)
            ):
                metrics |= await self.evaluate()
            self._maybe_save()
            self.metrics.log(metrics, step=self.step_count)
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(
                kl=f"{metrics['kl/reverse_per_token']:.4f}",
                tok_s=f"{metrics['throughput/tokens_per_s']:.0f}",
                step_s=f"{metrics['time/step']:.2f}",
            )
        bar.close()
        return history

    async def step(self) -> dict[str, float]:
        """One on-policy distillation step; returns its metrics."""
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        prompts = [item.prompt_ids for item in self.prompts.next_batch()]
        with timed("generate", metrics):
            rollouts = await self.sample(prompts)
        with timed("grade", metrics):
            teacher = await grade(self.grader, rollouts)
        with timed("score", metrics):
            batch = self.score(rollouts, teacher)
        with timed("learn", metrics):
            metrics |= self.update(batch)
        metrics["policy/lag"] = float(self.step_count - rollouts.policy_version)
        self.step_count += 1
        with timed("push", metrics):
            await self.push_weights()
        metrics["time/step"] = time.perf_counter() - start
        return metrics | self._batch_metrics(rollouts, batch, metrics["time/step"])

    async def sample(self, prompts: list[list[int]]) -> Rollouts:
        s = self.config.sampling
        request = GenerateRequest(
            prompt_ids=prompts,
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            seed=self.config.train.seed * 100_003 + self.step_count,
        )
        rollouts = await sample(self.sampler, prompts, request, self.tokenizer.eos_token_id)
        if rollouts.policy_version != self.policy_version:
            # A restarted sampler serves its initial weights as version 0: push ours again and
            # redo the step's sampling, so no step trains on samples of other weights.
            logger.warning(
                "sampler served policy_version %d, expected %d; pushing weights again",
                rollouts.policy_version,
                self.policy_version,
            )
            await self.push_weights()
            rollouts = await sample(self.sampler, prompts, request, self.tokenizer.eos_token_id)
        if rollouts.policy_version != self.policy_version:
            raise SamplerError(
                f"sampler served policy_version {rollouts.policy_version}, "
                f"expected {self.policy_version}: samples are off-policy"
            )
        return rollouts

    def score(self, rollouts: Rollouts, teacher: list[list[float]]) -> ScoredBatch:
        t = self.config.train
        return score(self.model, rollouts, teacher, self.pad_id, t.kl_coef, t.discount, t.logprob_temperature, t.device)

    def update(self, batch: ScoredBatch) -> dict[str, float]:
        """`ppo_steps` clipped updates on one batch; metrics are those of the last update."""
        t = self.config.train
        for _ in range(t.ppo_steps):
            new_BT = completion_logprobs(self.model, batch.packed, t.logprob_temperature)
            policy = clipped_policy_loss(new_BT, batch.old_logprobs_BT, batch.advantages_BT, batch.mask_BT, t.clip_eps)
            self.optimizer.zero_grad(set_to_none=True)
            policy.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            self.optimizer.step()
        lr = float(self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        return {
            "ppo/loss": policy.loss.item(),
            "ppo/clip_frac": policy.clip_frac.item(),
            "ppo/approx_kl": policy.approx_kl.item(),
            "optim/grad_norm": grad_norm.item(),
            "optim/lr": lr,
        }

    async def push_weights(self) -> None:
        """Send the student's parameters, cast to the sampler's dtype, as version `step_count`."""
        dtype = getattr(torch, self.sampler_dtype)
        tensors = {name: p.detach().to(dtype) for name, p in self.model.named_parameters()}
        services = self.config.services
        if services.weight_transport == "path" and services.shared_dir is not None:
            shared = Path(services.shared_dir)
            self.policy_version = await self.sampler.push_weights_by_path(tensors, self.step_count, shared)
        else:
            self.policy_version = await self.sampler.push_weights(tensors, self.step_count)

    def _batch_metrics(self, rollouts: Rollouts, batch: ScoredBatch, step_time: float) -> dict[str, float]:
        mask = batch.mask_BT
        return {
            "kl/reverse_per_token": reverse_kl_per_token(batch.old_logprobs_BT, batch.teacher_logprobs_BT, mask).item(),
            "mismatch/sampler_vs_old": sampler_mismatch(batch.sampler_logprobs_BT, batch.old_logprobs_BT, mask).item(),
            "completion/mean_length": rollouts.num_tokens / len(rollouts.completion_ids),
            "throughput/tokens_per_s": rollouts.num_tokens / step_time,
        }

    # ---- start, eval, checkpoints -----------------------------------------------------------

    async def check_services(self) -> None:
        """Fail at start, naming both fingerprints, if student, sampler and grader tokenizers differ."""
        sampler_info, grader_info = await asyncio.gather(self.sampler.info(), self.grader.info())
        own = tokenizer_fingerprint(self.tokenizer)
        sampler_fp = (sampler_info.vocab_size, sampler_info.tokenizer_hash)
        grader_fp = (grader_info.vocab_size, grader_info.tokenizer_hash)
        check_same_tokenizer(f"sampler ({sampler_info.model})", sampler_fp, f"grader ({grader_info.model})", grader_fp)
        check_same_tokenizer(
            f"learner student ({self.config.student.path})", own, f"sampler ({sampler_info.model})", sampler_fp
        )
        self.sampler_dtype = sampler_info.dtype

    async def evaluate(self) -> dict[str, float]:
        """Reverse KL to the teacher on eval prompts (temperature-1 samples); reward where items have answers."""
        e, t = self.config.eval, self.config.train
        return await evaluate(
            self.sampler,
            self.grader,
            self.model,
            self.tokenizer,
            self.eval_items[: e.max_items],
            e,
            pad_id=self.pad_id,
            seed=t.seed,
            temperature=t.logprob_temperature,
            device=t.device,
        )

    def _maybe_save(self) -> None:
        every = self.config.checkpoint.save_steps
        if (every and self.step_count % every == 0) or self.step_count == self.config.train.steps:
            state = TrainerState(
                step=self.step_count, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                data=self.prompts.state_dict(), rng=rng_state(),
            )  # fmt: skip
            root = self.run_dir / "checkpoints"
            path = save_checkpoint(self.model, self.tokenizer, state, root, self.config.checkpoint.keep_last)
            logger.info("saved checkpoint %s", path)

    def _resume(self, path: Path) -> None:
        """Continue exactly where the checkpoint left off: weights, optimizer, scheduler, RNG,
        data position; metrics logged after the checkpoint's step are dropped (they will be redone)."""
        state = load_checkpoint(self.model, path)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.prompts.load_state_dict(state.data)
        restore_rng(state.rng)
        self.step_count = state.step
        truncate_metrics(self.run_dir / "metrics.jsonl", state.step)
        logger.info("resumed from %s at step %d", path, state.step)
