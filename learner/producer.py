"""Keeps the samplers busy: generates and grades the next batches while the learner learns.

    producer = Producer(samplers, graders, plan=trainer_plan, lookahead=k, ...)
    batch = await producer.take(step, learner_version)   # waits if not ready

With lookahead k (train.max_staleness) the batches of the next k steps are generated and graded
while the learner learns the current one; with 0 a step is produced only when the learner takes
it, which is the strictly on-policy loop: sample, grade, learn, push, in series.

A step's prompts go out as several requests when that helps: one per prompt on vLLM samplers
(the engine batches concurrent requests, and each prompt's samples are graded the moment they
return, so grading hides behind generation), one per replica on torch samplers (a torch engine
decodes one request as one batch). Seeds follow a sample's place in the step, so the split never
changes what is drawn. Each sample carries the version of the weights that generated it; at
`take`, samples more than k versions older than the learner are dropped and generated again.
The producer knows nothing of optimizers: the learner gives it a plan per step and the version
it last pushed.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from grader.tensors import ScoredBatch
from learner.clients import GraderPool, SamplerPool
from learner.config import OpdConfig
from learner.data import PromptStream
from learner.rollout import Rollouts, grade, sample
from sampler.schema import GenerateRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """What the learner wants sampled for one step."""

    prompts: list[list[int]]
    request: GenerateRequest
    """n, temperature, top_p, max_tokens, top_logprobs and the step's seed (prompt_ids are set per part)."""
    data_state: dict[str, int]
    """The prompt stream's position after this step's prompts (what a checkpoint of this step saves)."""


STEP_SEED_STRIDE = 1_000_003
"""Sampling seeds of consecutive steps are this far apart: room for a million samples per step."""


def step_plan(stream: PromptStream, config: OpdConfig, rank: int, step: int) -> StepPlan:
    """Step `step`'s prompts (process `rank`'s share of the next global batch) and request. Seeds
    follow a prompt's place in the global batch (see sampler.engine.sample_seed), so N processes
    draw the same samples as one process holding the whole batch."""
    s, t = config.sampling, config.train
    prompts = [item.prompt_ids for item in stream.next_batch()[rank * t.batch_size :][: t.batch_size]]
    seed = (t.seed * 7_919 + step) * STEP_SEED_STRIDE + rank * t.batch_size * s.n
    request = GenerateRequest(prompt_ids=prompts, n=s.n, temperature=s.temperature, top_p=s.top_p,
                              max_tokens=s.max_tokens, seed=seed,
                              top_logprobs=t.top_k if t.loss == "topk" and t.top_k_head == "both" else 0)  # fmt: skip
    return StepPlan(prompts, request, stream.state_dict())


@dataclass(frozen=True)
class Part:
    """One request's samples, graded."""

    first_prompt: int
    prompts: list[list[int]]
    rollouts: Rollouts
    graded: ScoredBatch
    generate_s: tuple[float, float]
    grade_s: tuple[float, float]
    """(start, end) on the perf_counter clock."""


@dataclass(frozen=True)
class Batch:
    """A step's samples as the learner takes them."""

    step: int
    rollouts: Rollouts
    graded: ScoredBatch
    data_state: dict[str, int]
    times: dict[str, float]
    """time/generate and time/grade (each the span from its first request to its last reply; they
    overlap when grading hides behind generation), time/wait (the learner waiting), and
    time/generate_engine and time/grade_engine: how much of each span some server's engine held
    this learner's requests, waiting for it included (as the replies report it; 0 from servers
    that report nothing; in the pipelined loop another step's requests in that span count too)."""
    dropped_stale: int


class Producer:
    def __init__(
        self,
        samplers: SamplerPool,
        graders: GraderPool,
        *,
        plan: Callable[[int], StepPlan],
        lookahead: int,
        pushed_version: Callable[[], int],
        eos_id: int,
        top_k: int,
        split_per_prompt: bool,
        steps: int | None = None,
    ) -> None:
        """`steps`: the run's number of steps; no batch is made for a step past it."""
        self.samplers, self.graders = samplers, graders
        self.steps = steps
        self.plan, self.lookahead, self.pushed_version = plan, lookahead, pushed_version
        self.eos_id, self.top_k = eos_id, top_k
        self.requests_per_step = 0 if split_per_prompt else len(samplers.clients)
        self._plans: dict[int, StepPlan] = {}
        self._tasks: dict[int, asyncio.Task[list[Part]]] = {}

    async def take(self, step: int, learner_version: int) -> Batch:
        """Step `step`'s batch, every sample from weights at most `lookahead` versions older than
        `learner_version` (older ones are generated again). Schedules the next `lookahead` steps."""
        start = time.perf_counter()
        for done in [s for s in self._plans if s < step]:  # a step is taken for good once a later one is asked
            del self._plans[done]
        ahead = step + self.lookahead + 1
        self._schedule(range(step, ahead if self.steps is None else max(step + 1, min(ahead, self.steps))))
        try:
            parts = await self._tasks[step]
        finally:
            self._tasks.pop(step)  # failed or taken; a failed step is produced again when taken again
        waited = time.perf_counter() - start
        plan, oldest = self._plans[step], learner_version - self.lookahead
        stale = [i for i, part in enumerate(parts) if min(part.rollouts.versions) < oldest]
        fresh = list(parts)  # stale parts generated again, all at once (one part per prompt on vLLM)
        for i, renewed in zip(stale, await asyncio.gather(*(self._renew(plan, parts[i]) for i in stale)), strict=True):
            fresh[i] = renewed
        dropped = sum(len(parts[i].rollouts.versions) for i in stale)
        if dropped:
            logger.warning("step %d: %d samples older than version %d dropped and generated again", step, dropped,
                           oldest)  # fmt: skip
        # the plan stays until a later step is taken: a step taken again (every process retakes it
        # when any got a stale reply) is produced again from the same prompts and seeds
        return Batch(step, Rollouts.concat([p.rollouts for p in fresh]), ScoredBatch.concat([p.graded for p in fresh]),
                     plan.data_state, self._times(fresh, waited), dropped)  # fmt: skip

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def _schedule(self, steps: range) -> None:
        for step in steps:
            if step not in self._plans:
                self._plans[step] = self.plan(step)  # in step order: the plan consumes the prompt stream
            if step not in self._tasks:
                self._tasks[step] = asyncio.create_task(self._produce(self._plans[step]))

    async def _produce(self, plan: StepPlan) -> list[Part]:
        min_version = self.pushed_version()
        return list(await asyncio.gather(*(self._part(plan, first, prompts, min_version)
                                           for first, prompts in self._split(plan.prompts))))  # fmt: skip

    def _split(self, prompts: list[list[int]]) -> list[tuple[int, list[list[int]]]]:
        """(index of the first prompt, prompts) per request."""
        per_request = 1 if self.requests_per_step == 0 else -(-len(prompts) // self.requests_per_step)
        return [(i, prompts[i : i + per_request]) for i in range(0, len(prompts), per_request)]

    async def _part(self, plan: StepPlan, first: int, prompts: list[list[int]], min_version: int) -> Part:
        request = plan.request
        if first and request.seed is not None:  # sample j of prompt i keeps seed + i * n + j
            request = request.model_copy(update={"seed": request.seed + first * request.n})
        started = time.perf_counter()
        rollouts = await sample(self.samplers, prompts, request, eos_id=self.eos_id, min_version=min_version)
        generated = time.perf_counter()
        graded = await grade(self.graders, rollouts, top_k=self.top_k)
        return Part(first, prompts, rollouts, graded, (started, generated), (generated, time.perf_counter()))

    async def _renew(self, plan: StepPlan, part: Part) -> Part:
        return await self._part(plan, part.first_prompt, part.prompts, self.pushed_version())

    def _times(self, parts: list[Part], waited: float) -> dict[str, float]:
        generating, grading = _window([p.generate_s for p in parts]), _window([p.grade_s for p in parts])
        return {
            "time/generate": generating[1] - generating[0],
            "time/grade": grading[1] - grading[0],
            "time/wait": waited,
            # of those, the time the servers' engines worked (the rest: HTTP, requests and replies)
            "time/generate_engine": self.samplers.engine_busy("/v1/generate", generating),
            "time/grade_engine": self.graders.engine_busy("/v1/logprobs", grading),
        }


def _window(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """From the first start to the last end."""
    return min(start for start, _ in spans), max(end for _, end in spans)
