"""The torch sampler engine: plain transformers, CPU or GPU.

Used where vLLM is not installed and as the reference in parity tests. All prompts x n samples
decode together in one left-padded batch with a KV cache; one lock serialises generation and
weight swaps, so a swap waits for in-flight generation and no reply mixes two weight versions.
The model loads and runs on the process's torch thread (`opd/torch_thread.py`).
"""

import asyncio
import random

import torch
from transformers import DynamicCache

from grader.engine import ToScore
from grader.engines.torch import score_sequences
from grader.tensors import ScoredBatch
from opd import torch_thread
from opd.modeling import load_causal_lm, model_card, pack_left_padded
from opd.serving import InfoResponse
from opd.tokenizer import chat_prompt_ids, pad_token_id
from sampler.adapters import Adapter
from sampler.engine import Sample, SamplingParams, WeightSpec, sample_seed


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float,
    top_p: float,
    uniforms_B: torch.Tensor,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row [B], and the logprobs of the distribution actually sampled [B, V].

    Row b inverts its CDF at `uniforms_B[b]`, a draw from its own generator, so a sample does not
    depend on what else is in the batch, and the whole batch samples in one vectorised step (a
    multinomial call per row took half of the decode time at batch 128).

    temperature 0 is greedy and reports the raw (temperature 1) logprobs. `generators` are the
    rows' host generators, for the rare redraw below.
    """
    logits_BV = logits_BV.float()
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1), torch.log_softmax(logits_BV, -1)
    scaled_BV = logits_BV / temperature
    if top_p < 1.0:
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p. The first token always stays, also when
        # top_p is below float32's range (1e-147 rounds to 0 and would drop every token).
        drop_sorted_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        drop_sorted_BV[:, 0] = False
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        scaled_BV = scaled_BV.masked_fill(drop_BV, float("-inf"))
    logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
    probs_BV = logprobs_BV.exp()
    ids_B = inverse_cdf(probs_BV, uniforms_B)
    # A parallel cumsum (CUDA) may round so that a token of probability 0 gets picked; redraw those rows.
    for b in (probs_BV.gather(-1, ids_B[:, None]).squeeze(-1) == 0).nonzero().flatten().tolist():
        ids_B[b] = torch.multinomial(probs_BV[b].cpu(), 1, generator=generators[b])[0]
    return ids_B, logprobs_BV


def inverse_cdf(probs_BV: torch.Tensor, uniforms_B: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds u x (total mass): token v is
    drawn with probability p_v (u uniform on [0, 1)). The target stays strictly below the total,
    so the search always lands on a token; a token with p = 0 adds nothing to the CDF and so is
    never the first to exceed it."""
    cdf_BV = probs_BV.cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    target_B1 = torch.minimum(
        uniforms_B[:, None].to(cdf_BV) * total_B1, torch.nextafter(total_B1, total_B1.new_zeros(()))
    )
    # Clamped: NaN probabilities (weights that overflow) put the search past the end; such rows
    # get some token and a NaN logprob, which the app refuses to hand out.
    return torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(-1).clamp(max=probs_BV.shape[-1] - 1)


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
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        torch_thread.use_device(torch.device(device))  # every torch call of this server runs there
        self.model = torch_thread.call(load_causal_lm, model_path, dtype, device)
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.tokenizer, self.card = model_card(
            model_path, engine="torch", dtype=dtype, max_model_len=self.max_model_len,
            model_vocab_size=self.model.config.vocab_size, max_logprobs=max_logprobs, max_lora_rank=max_lora_rank,
        )  # fmt: skip
        self._base: dict[str, torch.Tensor] = {}  # LoRA mode: the original weights the adapters change
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = pad_token_id(self.tokenizer)
        self.policy_version = 0
        self._lock = asyncio.Lock()

    def info(self) -> InfoResponse:
        return self.card.model_copy(update={"policy_version": self.policy_version})

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
        mask_BL, positions_B = batch.attention_mask_BL, batch.position_ids_BL[:, -1]
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
        ends: list[int | None] = [None] * len(rows)  # the step at which each row emitted a stop token
        # Every uniform a row may need, drawn up front from the row's own generator.
        uniforms_BN = torch.stack([torch.rand(params.max_tokens, generator=g) for g in generators]).to(self.device)
        for t in range(params.max_tokens):
            next_B, logprobs_BV = sample_next(out.logits[:, -1], params.temperature, params.top_p, uniforms_BN[:, t],
                                              generators)  # fmt: skip
            top = logprobs_BV.topk(params.top_logprobs, dim=-1) if params.top_logprobs else None
            steps.append((next_B, logprobs_BV.gather(-1, next_B[:, None]).squeeze(-1),
                          *((top.indices, top.values) if top is not None else ())))  # fmt: skip
            for b, token in enumerate(next_B.tolist()):
                if ends[b] is None and token in self.eos_ids:
                    ends[b] = t
            if t == params.max_tokens - 1 or all(end is not None for end in ends):
                break  # (at the last step no row needs the next token's logits)
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones(len(rows), 1)], dim=-1)
            positions_B = positions_B + 1
            out = self.model(
                input_ids=next_B[:, None],
                attention_mask=mask_BL,
                position_ids=positions_B[:, None],
                past_key_values=cache,
                use_cache=True,
            )
        return self._samples(steps, ends)

    @staticmethod
    def _samples(steps: list[tuple[torch.Tensor, ...]], ends: list[int | None]) -> list[Sample]:
        """Each row up to its stop token, converted to lists once for the whole decode (a conversion
        per row and step took as long as decoding at batch 128 with top-k)."""
        columns = [torch.stack(parts, dim=1).tolist() for parts in zip(*steps, strict=True)]  # [B, T(, K)] each
        out = []
        for b, end in enumerate(ends):
            length = len(steps) if end is None else end + 1
            ids, logprobs, *top = (column[b][:length] for column in columns)
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
