"""The torch sampler engine: plain transformers, CPU or GPU.

Used where vLLM is not installed and as the reference in parity tests. All prompts x n samples
decode together in one left-padded batch with a KV cache; one lock serialises generation and
weight swaps, so a swap waits for in-flight generation and no reply mixes two weight versions.
The model loads and runs on the process's torch thread (`opd/torch_thread.py`). On a GPU each
decode step replays a CUDA graph (`static_decode.py`) unless the engine is made eager; weight
pushes and adapters copy into the same parameters, so a captured step reads the new weights.
"""

import asyncio
import logging
import random
from collections import OrderedDict

import torch
from transformers import DynamicCache

from grader.engine import ToScore
from grader.engines.torch import score_sequences
from grader.tensors import ScoredBatch
from opd import torch_thread
from opd.modeling import PackedBatch, load_served_model, pack_left_padded
from opd.serving import InfoResponse
from opd.tokenizer import chat_prompt_ids
from sampler.adapters import Adapter
from sampler.engine import Sample, SamplingParams, WeightSpec, sample_seed
from sampler.engines.sampling import sample_next
from sampler.engines.static_decode import DecodeShape, StaticDecoder, fits, mark_stops, within_window

log = logging.getLogger(__name__)

KEPT_CAPTURES = 4
"""Decode shapes whose buffers and graphs the sampler keeps (the least recently used goes first):
a training batch and an eval batch alternate without capturing again."""

SCORE_BATCH_TOKENS = 16384
"""Padded tokens per forward when the sampler scores given completions (the grader's default)."""


class TorchSamplerEngine:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_model_len: int | None = None,
        max_logprobs: int = 20,
        max_lora_rank: int | None = None,
        enforce_eager: bool | None = None,
    ) -> None:
        """`enforce_eager`: decode without CUDA graphs (default: graphs on a GPU, eager elsewhere)."""
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        served = load_served_model(model_path, dtype=dtype, device=device, max_model_len=max_model_len,
                                   max_logprobs=max_logprobs, max_lora_rank=max_lora_rank)  # fmt: skip
        self.model, self.tokenizer, self.card, self.pad_id = served.model, served.tokenizer, served.card, served.pad_id
        self.max_model_len = self.card.max_model_len
        self._base: dict[str, torch.Tensor] = {}  # LoRA mode: the original weights the adapters change
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.policy_version = 0
        self._lock = asyncio.Lock()
        self.cuda_graphs = self._graphs_wanted(enforce_eager)
        self._static: OrderedDict[DecodeShape, StaticDecoder] = OrderedDict()  # by recent use

    def _graphs_wanted(self, enforce_eager: bool | None) -> bool:
        on_gpu = torch.device(self.device).type == "cuda"
        if enforce_eager is False and not on_gpu:
            raise ValueError(
                f"CUDA graphs need a cuda device, not {self.device!r} (enforce_eager=False, --no-enforce-eager)"
            )
        if enforce_eager or not on_gpu:
            return False
        if (unfit := fits(self.model)) is not None:
            if enforce_eager is False:  # asked for by name: say so at start rather than run eagerly
                raise ValueError(
                    f"CUDA graphs cannot decode {self.model_path}: {unfit} (enforce_eager=False, --no-enforce-eager)"
                )
            log.warning("torch sampler: decoding eagerly, without CUDA graphs: %s", unfit)
            return False
        log.info("torch sampler: each decode step replays a CUDA graph (captured when a batch shape is first seen)")
        return True

    def info(self) -> InfoResponse:
        return self.card.model_copy(update={"policy_version": self.policy_version})

    def alive(self) -> bool:
        return True  # (the model lives in this process: it goes when the server goes)

    def chat_to_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[int, list[list[Sample]]]:
        async with self._lock:
            samples = await torch_thread.run(self._generate_sync, prompts, params)
            return self.policy_version, samples

    @torch.inference_mode()
    def _generate_sync(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        # Host generators on every device: a seed gives the same draws on CPU and GPU, and a GPU
        # spends no kernel per row on them (batch 128: 128 launches before the first forward).
        generators = [
            torch.Generator().manual_seed(sample_seed(seed, i, j, params.n))
            for i in range(len(prompts))
            for j in range(params.n)
        ]
        samples = self._decode(rows, params, generators)
        return [samples[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _decode(self, rows: list[list[int]], params: SamplingParams, generators: list[torch.Generator]) -> list[Sample]:
        batch = pack_left_padded(rows, [[] for _ in rows], self.pad_id, self.device)
        # Every uniform a row may need, drawn up front from the row's own generator.
        uniforms_BT = torch.stack([torch.rand(params.max_tokens, generator=g) for g in generators]).to(self.device)
        decoder = self._static_decoder(batch.input_ids_BL.shape[1], len(rows), params) if self.cuda_graphs else None
        if decoder is not None:
            columns, ends = decoder.decode(batch, uniforms_BT, self.eos_ids, generators)
        else:
            columns, ends = self._eager_decode(batch, params, uniforms_BT, generators)
        return self._samples(columns, ends)

    def _static_decoder(self, prompt_length: int, rows: int, params: SamplingParams) -> StaticDecoder | None:
        """The captured decoder of this request's shape (captured now if it is not kept), or None:
        this request decodes eagerly (beyond the model's attention window, or out of GPU memory for
        the buffers), or every one does from now on (capturing failed)."""
        shape = DecodeShape.of(rows, prompt_length, params.max_tokens, params.temperature, params.top_p,
                               params.top_logprobs)  # fmt: skip
        if shape in self._static:
            self._static.move_to_end(shape)
            return self._static[shape]
        if not within_window(self.model, shape):
            return None
        while len(self._static) >= KEPT_CAPTURES:
            self._static.popitem(last=False)  # (its buffers and graph pool go before new ones are made)
        try:
            self._static[shape] = StaticDecoder(self.model, shape, capture=True)
        except torch.OutOfMemoryError:
            self._static.clear()
            log.warning("torch sampler: no GPU memory for a captured decode of %d rows x %d slots; this request "
                        "decodes eagerly", shape.rows, shape.slots)  # fmt: skip
            return None
        except Exception:  # a model whose forward syncs with the host, say
            log.warning("torch sampler: capturing the decode step failed; decoding eagerly from now on",
                        exc_info=True)  # fmt: skip
            self._static.clear()
            self.cuda_graphs = False
            return None
        return self._static[shape]

    def _eager_decode(
        self, batch: PackedBatch, params: SamplingParams, uniforms_BT: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[list[list[list]], list[int | None]]:
        """Per output, its [B][steps(, K)] lists, and the step at which each row drew a stop token."""
        mask_BL, positions_B = batch.attention_mask_BL, batch.position_ids_BL[:, -1]
        rows = len(mask_BL)
        cache = DynamicCache()
        out = self.model(
            input_ids=batch.input_ids_BL,
            attention_mask=mask_BL,
            position_ids=batch.position_ids_BL,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        steps: list[tuple[torch.Tensor, ...]] = []  # per decode step: ids, their logprobs, [top ids, top logprobs]
        ends: list[int | None] = [None] * rows  # the step at which each row emitted a stop token
        for t in range(params.max_tokens):
            next_B, logprobs_BV = sample_next(out.logits[:, -1], params.temperature, params.top_p, uniforms_BT[:, t],
                                              generators)  # fmt: skip
            top = logprobs_BV.topk(params.top_logprobs, dim=-1) if params.top_logprobs else None
            steps.append((next_B, logprobs_BV.gather(-1, next_B[:, None]).squeeze(-1),
                          *((top.indices, top.values) if top is not None else ())))  # fmt: skip
            if mark_stops(ends, next_B.tolist(), t, self.eos_ids) or t == params.max_tokens - 1:
                break  # (at the last step no row needs the next token's logits)
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones(rows, 1)], dim=-1)
            positions_B = positions_B + 1
            out = self.model(
                input_ids=next_B[:, None],
                attention_mask=mask_BL,
                position_ids=positions_B[:, None],
                past_key_values=cache,
                use_cache=True,
            )
        # converted to lists once for the whole decode (a conversion per row and step took as long
        # as decoding at batch 128 with top-k)
        return [torch.stack(parts, dim=1).tolist() for parts in zip(*steps, strict=True)], ends

    @staticmethod
    def _samples(columns: list[list[list]], ends: list[int | None]) -> list[Sample]:
        """Each row up to its stop token, from the decode's [B][steps(, K)] lists."""
        out = []
        for b, end in enumerate(ends):
            ids, logprobs, *top = (column[b] if end is None else column[b][: end + 1] for column in columns)
            out.append(Sample(ids, logprobs, "length" if end is None else "stop", *top))
        return out

    def weight_specs(self) -> dict[str, WeightSpec]:
        return {name: WeightSpec(tuple(p.shape), p.dtype) for name, p in self.model.named_parameters()}

    async def load_weights(self, tensors: dict[str, torch.Tensor], version: int, source: str | bytearray) -> None:
        async with self._lock:
            await torch_thread.run(self._copy_in, tensors)
            self.policy_version = version

    @torch.no_grad()
    def _copy_in(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` into the model; on a GPU, finished when this returns (the source may be
        the learner's buffer, which it writes again once the push is answered)."""
        params = dict(self.model.named_parameters())
        with torch_thread.alone_if_small(tensors.values()):
            for name, tensor in tensors.items():
                params[name].copy_(tensor)  # host to device in one copy, no device temporary
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    async def load_adapter(self, adapter: Adapter, version: int) -> None:
        async with self._lock:
            await torch_thread.run(self._merge, adapter)
            self.policy_version = version

    @torch.no_grad()
    def _merge(self, adapter: Adapter) -> None:
        """Serve base + scale * B @ A: the previous adapter is undone from kept copies of the
        original weights, the new one folded in (computed in float32, stored in the model's dtype)."""
        params = dict(self.model.named_parameters())
        for name, original in self._base.items():
            params[name].copy_(original)
        for module, (a, b) in adapter.modules.items():
            weight = params[f"{module}.weight"]
            original = self._base.setdefault(f"{module}.weight", weight.detach().clone())
            delta = adapter.scale * (b.to(self.device, torch.float32) @ a.to(self.device, torch.float32))
            weight.copy_((original.float() + delta).to(weight.dtype))

    async def score(self, sequences: list[ToScore], top_k: int) -> ScoredBatch:
        async with self._lock:
            return await torch_thread.run(score_sequences, self.model, sequences, top_k, pad_id=self.pad_id,
                                           max_batch_tokens=SCORE_BATCH_TOKENS)  # fmt: skip

    async def close(self) -> None:
        return None
