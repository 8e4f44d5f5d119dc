"""The torch sampler's decode on fixed buffers, so that on a GPU each step is one CUDA graph replay.

A small student's decode step is host-bound: at the toy's 128 rows, ~600 torch ops a step cost
the host 4-6 us each, while the GPU works for a fraction of that (`bench/toy_profile.py`: 2.9 ms
of GPU work in a 25 ms generate). A captured step launches as one graph instead. Capture needs
every tensor a step touches at a fixed address, so here:

- the KV cache is preallocated per layer (`SlotCache`), and each step writes its token at a slot
  the step itself advances on the device;
- the attention mask is an additive [B, 1, 1, C] bias over the C slots (a prompt's padding and
  the slots not yet written hold the dtype's minimum), opened one slot per step, also on the
  device;
- each step's draw goes to row t of preallocated [T, B] buffers, t a device counter.

Prompts' lengths vary, so the prefill stays eager; it writes the same cache. The same steps run
uncaptured on any device (`capture=False`), which is how the CPU tests check them against the
eager decode. Only models whose every layer attends in full with an sdpa or eager kernel qualify
(`fits`): a 4D mask is handed to every layer as is, which would be wrong for sliding-window
layers; a model with one window for all layers (Mistral's `sliding_window`) decodes here only
requests that fit inside it (`within_window`).
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from opd.modeling import PackedBatch
from sampler.engines.sampling import draw, redraw, sampling_logprobs

SLOT_BLOCK = 64
"""Cache slots come in blocks of this many, so that prompts of nearby lengths share one capture."""


class SlotCache:
    """Every layer's keys and values in fixed [B, kv heads, C, head dim] buffers. A forward writes
    its tokens at the slots `write_at` holds and attends over the first `visible` slots (its mask
    hides the rest). It stands in for transformers' Cache: attention layers call only `update`."""

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_at, key_states)
        values.index_copy_(2, self.write_at, value_states)
        return keys[:, :, : self.visible], values[:, :, : self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Models of transformers before 5.19 derive a cache_position from this, which only their
        # mask building and the cache's own update read: given a 4D mask and position ids, nothing here does.
        return 0


def mark_stops(ends: list[int | None], ids: list[int], step: int, eos_ids: set[int]) -> bool:
    """Record `step` in `ends` for each row that drew a stop token there and had not stopped yet;
    whether every row has now stopped (both decodes' bookkeeping)."""
    for b, token in enumerate(ids):
        if ends[b] is None and token in eos_ids:
            ends[b] = step
    return all(end is not None for end in ends)


@dataclass(frozen=True)
class DecodeShape:
    """What a capture is specific to: B rows, C cache slots, T steps and the sampling settings."""

    rows: int
    slots: int
    steps: int
    temperature: float
    top_p: float
    top_logprobs: int

    @staticmethod
    def of(rows: int, prompt_length: int, max_tokens: int, temperature: float, top_p: float, top_logprobs: int):
        slots = -(-(prompt_length + max_tokens) // SLOT_BLOCK) * SLOT_BLOCK
        return DecodeShape(rows, slots, max_tokens, temperature, top_p, top_logprobs)


def fits(model: PreTrainedModel) -> str | None:
    """Why `model` can never decode on fixed buffers, or None when it can (for shapes within its
    attention window: `within_window`)."""
    config = model.config
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r} takes no 4D mask"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "it has layers that do not attend in full (sliding windows)"
    return None


def within_window(model: PreTrainedModel, shape: DecodeShape) -> bool:
    """Whether every token of `shape` sees every earlier one under the model's attention window
    (Mistral-style models set `sliding_window`; Qwen's configs set it to None when they do not
    use it): the static decode attends in full, which then computes the same."""
    window = getattr(model.config, "sliding_window", None)
    return window is None or shape.slots <= window


class StaticDecoder:
    """One DecodeShape's buffers and, on a GPU, its two captured steps: draw a token from the
    current logits, then run the model on it. Rebuilt when the shape changes."""

    def __init__(self, model: PreTrainedModel, shape: DecodeShape, *, capture: bool):
        self.model, self.shape = model, shape
        config = model.config
        weight = next(model.parameters())
        device, dtype = weight.device, weight.dtype
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        B, C, T, K = shape.rows, shape.slots, shape.steps, shape.top_logprobs
        vocab = model.get_output_embeddings().weight.shape[0]
        self.cache = SlotCache(config.num_hidden_layers, (B, kv_heads, C, head_dim), dtype, device)
        self.hidden = torch.finfo(dtype).min  # the bias of a slot a query may not see
        self.bias_B11C = torch.full((B, 1, 1, C), self.hidden, dtype=dtype, device=device)
        self.input_ids_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.logits_BV = torch.zeros(B, vocab, dtype=torch.float32, device=device)
        self.uniforms_BT = torch.zeros(B, T, dtype=torch.float32, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        # per step: the drawn ids and their logprobs, and the top K ids and logprobs
        self.outputs = [torch.zeros(T, B, dtype=torch.long, device=device),
                        torch.zeros(T, B, dtype=torch.float32, device=device)]  # fmt: skip
        if K:
            self.outputs += [torch.zeros(T, B, K, dtype=torch.long, device=device),
                             torch.zeros(T, B, K, dtype=torch.float32, device=device)]  # fmt: skip
        self.status_2B = torch.zeros(2, B, dtype=torch.long, device=device)  # ids, and 1 where p(id) = 0
        self.graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        if capture:
            self._capture()

    def _draw_step(self) -> None:
        shape = self.shape
        uniforms_B = self.uniforms_BT.index_select(1, self.step).squeeze(1)
        ids_B, logprobs_BV = draw(self.logits_BV, shape.temperature, shape.top_p, uniforms_B)
        chosen_B = logprobs_BV.gather(-1, ids_B[:, None]).squeeze(-1)
        drawn = [ids_B, chosen_B]
        if shape.top_logprobs:
            top = logprobs_BV.topk(shape.top_logprobs, dim=-1)
            drawn += [top.indices, top.values]
        for buffer, value in zip(self.outputs, drawn, strict=True):
            buffer.index_copy_(0, self.step, value[None])
        self.status_2B[0].copy_(ids_B)
        self.status_2B[1].copy_(chosen_B.exp() == 0)
        self.input_ids_B1.copy_(ids_B[:, None])
        self.step.add_(1)

    def _forward_step(self) -> None:
        self.bias_B11C.index_fill_(3, self.cache.write_at, 0.0)  # each row now sees the new token's slot
        out = self.model(input_ids=self.input_ids_B1, attention_mask=self.bias_B11C, position_ids=self.positions_B1,
                         past_key_values=self.cache, use_cache=True)  # fmt: skip
        self.logits_BV.copy_(out.logits[:, -1])
        self.cache.write_at.add_(1)
        self.positions_B1.add_(1)

    def _capture(self) -> None:
        # Warm up once on a side stream (libraries pick and load their kernels there), then record
        # each step; the two graphs share one memory pool since they never run at once. A capture
        # that fails can leave its stream current (torch ends the capture before restoring it), so
        # the caller's stream is put back here, whatever happens.
        caller = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                self._draw_step()
                self._forward_step()
            caller.wait_stream(side)
            draw_graph, forward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(draw_graph, capture_error_mode="thread_local"):
                self._draw_step()
            with torch.cuda.graph(forward_graph, pool=draw_graph.pool(), capture_error_mode="thread_local"):
                self._forward_step()
        finally:
            torch.cuda.set_stream(caller)
        self.graphs = (draw_graph, forward_graph)

    def _prefill(self, batch: PackedBatch, uniforms_BT: torch.Tensor) -> None:
        """Run the prompts (slots 0..L-1) and set every buffer for step 0."""
        B, L = batch.input_ids_BL.shape
        device = self.bias_B11C.device
        real_BL = batch.attention_mask_BL.bool()
        # slot j is visible from slot i when j <= i and j holds a prompt token; each slot sees
        # itself, so a padding row's softmax stays defined
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        seen_B1LL = (causal_LL & real_BL[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
        bias_B1LL = torch.zeros(B, 1, L, L, dtype=self.bias_B11C.dtype, device=device)
        bias_B1LL = bias_B1LL.masked_fill_(~seen_B1LL[:, None], self.hidden)
        for keys, values in zip(self.cache.keys, self.cache.values, strict=True):
            # an earlier request's keys past the prompt stay hidden by the bias, but a non-finite one
            # (weights that overflowed) would still turn the bias sum into NaN: start clean
            keys[:, :, L:].zero_()
            values[:, :, L:].zero_()
        decode_at, self.cache.write_at = self.cache.write_at, torch.arange(L, device=device)
        self.cache.visible = L
        try:
            out = self.model(input_ids=batch.input_ids_BL, attention_mask=bias_B1LL,
                             position_ids=batch.position_ids_BL, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)  # fmt: skip
        finally:
            self.cache.write_at, self.cache.visible = decode_at, self.shape.slots
        self.logits_BV.copy_(out.logits[:, -1])
        decode_at.fill_(L)
        self.positions_B1.copy_(batch.position_ids_BL[:, -1:] + 1)
        self.bias_B11C.fill_(self.hidden)
        self.bias_B11C[:, 0, 0, :L].masked_fill_(real_BL, 0.0)
        self.uniforms_BT.copy_(uniforms_BT)
        self.step.zero_()

    def decode(
        self, batch: PackedBatch, uniforms_BT: torch.Tensor, eos_ids: set[int], generators: list[torch.Generator]
    ) -> tuple[list[list[list]], list[int | None]]:
        """Decode up to T tokens per row: per output, its [B][steps(, K)] lists, and the step at
        which each row drew a stop token (None: it ran to T). One host sync per step."""
        self._prefill(batch, uniforms_BT)
        draw_step, forward_step = (graph.replay for graph in self.graphs) if self.graphs else (
            self._draw_step, self._forward_step)  # fmt: skip
        ends: list[int | None] = [None] * self.shape.rows
        for t in range(self.shape.steps):
            draw_step()
            ids, zero_probability = self.status_2B.tolist()
            for b in (b for b, flag in enumerate(zero_probability) if flag):
                ids[b] = self._redraw(t, b, generators[b])
            if mark_stops(ends, ids, t, eos_ids) or t == self.shape.steps - 1:
                break  # (at the last step no row needs the next token's logits)
            forward_step()
        return [buffer[: t + 1].transpose(0, 1).tolist() for buffer in self.outputs], ends

    def _redraw(self, t: int, b: int, generator: torch.Generator) -> int:
        logprobs_V = sampling_logprobs(self.logits_BV[b : b + 1], self.shape.temperature, self.shape.top_p)[0]
        token = redraw(logprobs_V, generator)
        self.outputs[0][t, b] = token
        self.outputs[1][t, b] = logprobs_V[token]
        self.input_ids_B1[b, 0] = token
        return token
