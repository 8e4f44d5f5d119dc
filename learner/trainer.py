"""`OnPolicyDistillationTrainer`: the on-policy distillation loop.

Each step: sample completions from the sampler (the student's current weights), grade them with
the teacher, take `ppo_steps` clipped updates over micro-batches (the first one also scores the
samples: old logprobs, mask, advantages; `learner/update.py`), push the new weights to the
sampler, log.

    trainer = OnPolicyDistillationTrainer("examples/tiny/config.yml", train={"steps": 10})
    trainer.train()

Under `use_accelerate` every process runs this loop on its own slice of each batch; the main
process alone pushes weights, evaluates, checkpoints and logs (see `learner/distributed.py`).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from learner.api import Dataset, EvalItem, build_config, load_dataset
from learner.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from learner.clients import GraderPool, RetryPolicy, SamplerPool
from learner.config import OpdConfig, dump_config
from learner.data import PromptStream
from learner.distributed import Processes
from learner.evaluate import evaluate
from learner.metrics import FanOut, JsonlLogger, MetricsLogger, NullLogger, TensorBoardLogger, timed, truncate_metrics
from learner.policy import is_lora, push_bytes, student_policy, tensors_to_push
from learner.producer import Producer, step_plan
from learner.rewards import load_reward
from learner.services import check_service_settings, check_services, cpu_shares, service_urls
from learner.step_metrics import batch_metrics, mean_over_processes
from learner.update import MicroBatch, Scored, adamw, micro_batches, ppo_update
from opd import torch_thread
from opd.auth import load_api_key
from opd.errors import ConfigError, SamplerError, StaleSamplerError
from opd.host_memory import keep_freed_host_memory
from opd.modeling import load_tokenizer
from opd.tokenizer import pad_token_id, tokenizer_fingerprint

logger = logging.getLogger(__name__)

T = TypeVar("T")


RUN_DIR_FOLDERS = ("checkpoints", "logs", "tb")
RUN_DIR_FILES = ("metrics.jsonl", "config.yml")


def check_run_dir(run_dir: Path) -> None:
    """What a run writes into run_dir can go there: a file where it keeps a folder (or the
    reverse) would otherwise end the run at its first checkpoint, after the training."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory: name a directory for the run")
    for name in RUN_DIR_FOLDERS:
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise ConfigError(f"{run_dir / name} is a file, where the run keeps its {name} folder: move it away")
    for name in RUN_DIR_FILES:
        if (run_dir / name).is_dir():
            raise ConfigError(f"{run_dir / name} is a directory, where the run writes its {name}: move it away")


class OnPolicyDistillationTrainer:
    def __init__(
        self,
        config: OpdConfig | str | Path | None = None,
        *,
        student: str | None = None,
        teacher: str | None = None,
        train_dataset: Dataset = None,
        eval_dataset: Dataset = None,
        use_accelerate: bool | None = None,
        metrics: MetricsLogger | None = None,
        resume_from: Path | None = None,
        **sections: dict[str, Any],
    ) -> None:
        if use_accelerate is not None and isinstance(sections.get("train", {}), dict):  # (else build_config names it)
            sections["train"] = {**sections.get("train", {}), "use_accelerate": use_accelerate}
        self.config = cfg = build_config(config, student, teacher, sections)
        self.run_dir = Path(cfg.run_dir)
        check_run_dir(self.run_dir)
        if resume_from is not None and cfg.train.use_accelerate and cfg.train.fsdp:
            # each process's optimizer holds the moments of its own shards; a checkpoint has the main one's
            raise ConfigError("resuming under train.fsdp is not supported yet: a checkpoint keeps the optimizer state "
                              "of the main process's shards only. Its weights are whole: start a new run from them "
                              "(student.path: the checkpoint directory)")  # fmt: skip
        self.processes = Processes(cfg.train.use_accelerate, cfg.train.device, cfg.train.fsdp)
        check_service_settings(cfg.services)
        if resume_from is None:
            self._start_fresh()
        else:
            self._check_resume_source(Path(resume_from))
        keep_freed_host_memory(self.processes.device)  # on a CPU: no page faults for every step's tensors
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.student.path)
        self.pad_id = pad_token_id(self.tokenizer)
        self.policy = student_policy(cfg.student, cfg.train, str(self.processes.device)).train()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]  # a LoRA student: the adapters
        self.optimizer = adamw(trainable, cfg.train)
        warmup = cfg.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.train_items = load_dataset(train_dataset if train_dataset is not None else cfg.data.train_path,
                                        self.tokenizer, cfg.data)  # fmt: skip
        if not self.train_items:
            raise ConfigError("no training prompts: set data.train_path or pass train_dataset")
        self.eval_items = load_dataset(eval_dataset if eval_dataset is not None else cfg.data.eval_path,
                                       self.tokenizer, cfg.data, load_reward(cfg.eval.reward))  # fmt: skip
        # One global order of prompts; each process takes its own slice of every global batch.
        global_batch = cfg.train.batch_size * self.processes.world_size
        self.prompts = PromptStream(self.train_items, global_batch, cfg.train.seed, cfg.data.shuffle)
        self._data_state = self.prompts.state_dict()  # the prompt position of the last learned step
        self.policy_version = 0
        self.step_count = 0
        if resume_from is not None:
            self._resume(Path(resume_from))
        self.policy, self.optimizer = self.processes.prepare(self.policy, self.optimizer)
        self.metrics = metrics or self._metric_sinks()

    def _metric_sinks(self) -> MetricsLogger:
        if not self.processes.is_main:
            return NullLogger()
        jsonl = JsonlLogger(self.run_dir / "metrics.jsonl")
        if not self.config.logging.tensorboard:
            return jsonl
        # resumed: the earlier run's events after the checkpoint go; a fresh start: all an earlier start wrote
        return FanOut(jsonl, TensorBoardLogger(self.run_dir / "tb", purge_after=self.step_count or -1))

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run `train.steps` steps (starting local servers if the config names none). Under
        `use_accelerate`, a run that finishes also ends the process group, and `policy` is then
        the plain model (its DDP wrapper dropped): one `train()` per launch."""
        history: list[dict[str, float]] = []
        if self.step_count >= self.config.train.steps:  # a finished run resumed: no servers to start
            logger.warning("nothing to train: the run is at step %d and train.steps is %d (raise it to go on)",
                           self.step_count, self.config.train.steps)  # fmt: skip
        else:
            if self.processes.is_main:
                dump_config(self.config, self.run_dir / "config.yml")
            shares = cpu_shares(self.config, torch.get_num_threads())
            if shares is not None:
                logger.info("the pipelined loop shares the CPU: %d torch threads for the learner, %d for each local "
                            "server", shares.learner, shares.server)  # fmt: skip
            learner_threads, server_threads = shares or (None, None)
            with (service_urls(self.config, self.run_dir / "logs", self.processes.world_size,
                               server_threads) as (samplers, graders),
                  torch_thread.torch_threads(learner_threads)):  # fmt: skip
                history = asyncio.run(self._train(samplers, graders))
        self.policy = self.processes.release(self.policy)
        self.processes.finish()
        return history

    async def _train(self, sampler_urls: list[str], grader_urls: list[str]) -> list[dict[str, float]]:
        services, t = self.config.services, self.config.train
        retry = RetryPolicy(deadline_s=services.retry_deadline_s)
        self.sampler = SamplerPool(sampler_urls, services.request_timeout_s, retry, load_api_key(services.api_key_file))
        self.grader = GraderPool(grader_urls, services.request_timeout_s, retry)
        if t.max_staleness:  # the update runs on the torch thread (see step), on this process's device
            torch_thread.use_device(self.processes.device)
        try:
            engine = await self.check_services()
            plan = partial(step_plan, self.prompts, self.config, self.processes.rank)
            self.producer = Producer(self.sampler, self.grader, plan=plan, lookahead=t.max_staleness,
                                     pushed_version=lambda: self.policy_version, eos_id=self.tokenizer.eos_token_id,
                                     top_k=t.top_k if t.loss == "topk" else 0,
                                     split_per_prompt=engine == "vllm", steps=t.steps)  # fmt: skip
            await self.push_weights()
            return await self._run_steps()
        finally:
            if hasattr(self, "producer"):
                self.producer.close()
                del self.producer  # its version callback refers back to the trainer: no cycle outlives the run
            await self.sampler.aclose()
            await self.grader.aclose()
            self.metrics.close()

    async def _run_steps(self) -> list[dict[str, float]]:
        cfg = self.config
        history = []
        bar = tqdm(total=cfg.train.steps, initial=self.step_count, desc="opd", dynamic_ncols=True,
                   disable=not (cfg.logging.progress and self.processes.is_main))  # fmt: skip
        if self.step_count == 0 and self._eval_due():
            self.metrics.log(await self.evaluate(), step=0)
        while self.step_count < cfg.train.steps:
            metrics = await self.step()
            if self._eval_due():
                try:
                    metrics |= await self.evaluate()
                except Exception:
                    if self.processes.world_size == 1:  # (several: the others may be in a collective)
                        self._maybe_save()  # the step's training is kept, and a resume goes on from it
                    raise
            self._maybe_save()
            self.metrics.log(metrics, step=self.step_count)
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(kl=f"{metrics['kl/reverse_per_token']:.4f}", step_s=f"{metrics['time/step']:.2f}",
                            tok_s=f"{metrics['throughput/tokens_per_s']:.0f}")  # fmt: skip
        bar.close()
        return history

    async def step(self) -> dict[str, float]:
        """One on-policy distillation step; returns its metrics (averaged over processes)."""
        t = self.config.train
        start = time.perf_counter()
        batch = await self._on_policy(lambda: self.producer.take(self.step_count, self.policy_version))
        metrics = dict(batch.times)
        behaviour = self.config.sampling.temperature if t.max_staleness else None  # None: no importance weights
        with timed("learn", metrics):
            micro = micro_batches(batch.rollouts, batch.graded, pad_id=self.pad_id, max_tokens=t.micro_batch_tokens,
                                  device=self.processes.device, behaviour_temperature=behaviour)  # fmt: skip
            if t.max_staleness:  # off the event loop, which meanwhile drives the producer; on the torch thread
                scored, update_metrics = await torch_thread.run(self.update, micro)
            else:
                scored, update_metrics = self.update(micro)
        self._data_state = batch.data_state
        version = self.policy_version
        self.step_count += 1
        with timed("push", metrics):
            await self.push_weights()
        metrics |= self.push_stats
        metrics["time/step"] = time.perf_counter() - start
        return mean_over_processes(metrics | update_metrics, self.processes) | batch_metrics(
            batch, micro, scored, processes=self.processes, learner_version=version, step_seconds=metrics["time/step"]
        )

    async def _on_policy(self, produce: Callable[[], Awaitable[T]]) -> T:
        """Run `produce` (a step's batch, an eval) on every process; if any process got an answer
        from older weights than the learner's (a restarted sampler serves its initial weights),
        every process pushes the weights again and runs it again, so nothing is trained or
        evaluated on samples of other weights. Collective: every process calls it."""
        for attempt in range(2):
            try:
                result, stale = await produce(), False
            except StaleSamplerError as exc:
                logger.warning("%s; pushing weights again", exc)
                result, stale = None, True
            if not self.processes.any(stale):
                return result  # type: ignore[return-value]  # None only where stale
            if attempt == 0:
                await self.push_weights()
        raise SamplerError(f"the sampler still does not serve policy_version {self.policy_version} after a push")

    def update(self, batches: list[MicroBatch]) -> tuple[list[Scored], dict[str, float]]:
        """`ppo_steps` clipped updates on one step's micro-batches; metrics are those of the last."""
        scored, metrics = ppo_update(self.policy, self.optimizer, batches, train=self.config.train,
                                     processes=self.processes)  # fmt: skip
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        return scored, metrics

    async def push_weights(self) -> None:
        """Main process: send the student (or its LoRA adapter) as version `step_count` to every
        sampler replica; its `push/bytes` and `push/seconds` go into the metrics of the step that pushed."""
        start = time.perf_counter()
        self.sampler.latest_push = self.step_count  # every process's pool: replies of newer versions are refused
        tensors, metadata = tensors_to_push(self.processes, self.policy, self.sampler_dtype)  # collective under FSDP
        pushed = push_bytes(tensors, metadata, self.sampler_dtype)
        if self.processes.is_main:
            services = self.config.services
            shared_dir = None if services.shared_dir is None else Path(services.shared_dir)
            await self.sampler.push_weights_by(services.push_transport(int(pushed), self.sampler_engine), tensors,
                                               self.step_count, metadata, shared_dir)  # fmt: skip
        self.processes.wait()
        self.policy_version = self.step_count
        self.push_stats = {"push/bytes": pushed, "push/seconds": time.perf_counter() - start}

    # ---- start, eval, checkpoints -----------------------------------------------------------

    async def check_services(self) -> str:
        """Fail at start if student, samplers and graders cannot work together (see
        `learner.services.check_services`; every replica, each with the other service's first);
        returns the samplers' engine."""
        samplers, graders = await asyncio.gather(self.sampler.infos(), self.grader.infos())
        pairs = [(s, 0) for s in range(len(samplers))] + [(0, g) for g in range(1, len(graders))]
        check = partial(check_services, student=self.config.student.path,
                        own_fingerprint=tokenizer_fingerprint(self.tokenizer),
                        own_vocab=self.processes.unwrap(self.policy).lm.config.vocab_size, train=self.config.train,
                        longest=self._longest_sequence(), lora=self.config.student.lora)  # fmt: skip
        for s, g in pairs:
            try:
                check(samplers[s], graders[g])
            except ConfigError as exc:
                if len(pairs) == 1:
                    raise
                urls = f"sampler {self.sampler.clients[s].base_url}, grader {self.grader.clients[g].base_url}"
                raise ConfigError(f"{urls}: {exc}") from exc
        self.sampler_dtype, self.sampler_engine = samplers[0].dtype, samplers[0].engine
        return samplers[0].engine

    def _longest_sequence(self) -> tuple[int, int]:
        """(longest prompt, most tokens sampled after it) of this run: its training prompts and the
        eval prompts an eval uses (the first eval.max_items; none when eval.eval_steps is 0)."""
        train = (max(len(item.prompt_ids) for item in self.train_items), self.config.sampling.max_tokens)
        evaluated = self.eval_items[: self.config.eval.max_items] if self.config.eval.eval_steps else []
        if not evaluated:
            return train
        evals = (max(len(item.prompt_ids) for item in evaluated), self.config.eval.max_tokens)
        return max(train, evals, key=sum)

    def _eval_due(self) -> bool:
        every, steps = self.config.eval.eval_steps, self.config.train.steps
        return bool(every and self.eval_items) and (self.step_count % every == 0 or self.step_count == steps)

    async def evaluate(self) -> dict[str, float]:
        """Main process: reverse KL to the teacher on eval prompts; reward where items have answers.
        The others wait; all take part in a push if the sampler answered with other weights."""
        return await self._on_policy(self._evaluate_on_main)

    async def _evaluate_on_main(self) -> dict[str, float]:
        if self.processes.is_main:
            e, t = self.config.eval, self.config.train
            return await evaluate(
                sampler=self.sampler,
                grader=self.grader,
                policy=self.processes.unwrap(self.policy),
                tokenizer=self.tokenizer,
                items=self.eval_items[: e.max_items],
                config=e,
                pad_id=self.pad_id,
                seed=t.seed,
                temperature=t.logprob_temperature,
                micro_batch_tokens=t.micro_batch_tokens,
                device=self.processes.device,
                version=self.policy_version,
            )
        return {}

    def _maybe_save(self) -> None:
        every = self.config.checkpoint.save_steps
        if (every and self.step_count % every == 0) or self.step_count == self.config.train.steps:
            lm = self.processes.unwrap(self.policy).lm
            weights = None if is_lora(lm) else self.processes.full_parameters(self.policy)  # collective under FSDP
            if self.processes.is_main:
                state = TrainerState(step=self.step_count, optimizer=self.optimizer.state_dict(),
                                     scheduler=self.scheduler.state_dict(), data=self._data_state,
                                     rng=rng_state())  # fmt: skip
                path = save_checkpoint(lm, self.tokenizer, state,
                                       root=self.run_dir / "checkpoints", keep_last=self.config.checkpoint.keep_last,
                                       weights=weights)  # fmt: skip
                logger.info("saved checkpoint %s", path)
            self.processes.wait()

    def _start_fresh(self) -> None:
        """A run dir holds one run. Refuse one holding an earlier run's checkpoints (a fresh run
        would mix with them, and a later `--resume` pick theirs); drop the metrics of an earlier
        start that died before its first checkpoint, which this start redoes."""
        earlier = list_checkpoints(self.run_dir / "checkpoints")
        if earlier:
            raise ConfigError(f"run_dir {self.run_dir} holds an earlier run (checkpoint {earlier[-1].name}): continue "
                              "it with --resume (resume_from=...), or give this run another run_dir")  # fmt: skip
        if self.processes.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", -1)

    def _check_resume_source(self, path: Path) -> None:
        """A run dir holds one run: resuming into one that holds checkpoints must resume one of
        them, not another run's (its metrics and checkpoints would mix with theirs). Into an
        empty run dir, any checkpoint may be continued."""
        own = list_checkpoints(self.run_dir / "checkpoints")
        if own and path.resolve().parent != (self.run_dir / "checkpoints").resolve():
            raise ConfigError(f"--resume {path} is not one of run_dir {self.run_dir}'s checkpoints, and it holds this "
                              f"run's ({own[-1].name}): resume one of those, or continue {path} in an empty "
                              "run_dir")  # fmt: skip

    def _resume(self, path: Path) -> None:
        """Continue exactly where the checkpoint left off: weights, optimizer, scheduler, RNG,
        data position; metrics logged after the checkpoint's step are dropped (they will be redone)."""
        state = load_checkpoint(self.policy.lm, path)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.prompts.load_state_dict(state.data)
        self._data_state = state.data
        restore_rng(state.rng)
        self.step_count = state.step
        if self.processes.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", state.step)
        logger.info("resumed from %s at step %d", path, state.step)


__all__ = ["EvalItem", "OnPolicyDistillationTrainer"]
