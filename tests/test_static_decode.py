"""The torch sampler's decode on fixed buffers (the steps a GPU captures as CUDA graphs), run
uncaptured on the CPU against the eager decode it replaces: the same tokens, logprobs and stops."""

import pytest
import torch

from opd.modeling import pack_left_padded
from sampler.adapters import Adapter
from sampler.engine import SamplingParams
from sampler.engines.sampling import sampling_logprobs
from sampler.engines.static_decode import SLOT_BLOCK, DecodeShape, StaticDecoder, fits, within_window
from sampler.engines.torch import TorchSamplerEngine

PROMPTS = [[5, 6, 7, 8, 9], [8, 9], [10, 11, 12]]  # unequal: rows are left-padded


@pytest.fixture(scope="module")
def engine(student_dir) -> TorchSamplerEngine:
    return TorchSamplerEngine(str(student_dir))


def both_decodes(engine, params: SamplingParams, prompts=PROMPTS, decoder=None, capture=False):
    rows = [p for p in prompts for _ in range(params.n)]
    batch = pack_left_padded(rows, [[] for _ in rows], engine.pad_id, engine.device)
    uniforms_BT = torch.rand(len(rows), params.max_tokens, generator=torch.Generator().manual_seed(params.seed))
    uniforms_BT = uniforms_BT.to(engine.device)
    generators = [torch.Generator().manual_seed(i) for i in range(len(rows))]
    with torch.inference_mode():
        eager = engine._eager_decode(batch, params, uniforms_BT, generators)
        if decoder is None:
            shape = DecodeShape.of(len(rows), batch.input_ids_BL.shape[1], params.max_tokens, params.temperature,
                                   params.top_p, params.top_logprobs)  # fmt: skip
            decoder = StaticDecoder(engine.model, shape, capture=capture)
        static = decoder.decode(batch, uniforms_BT, engine.eos_ids, generators)
    return eager, static, decoder


def assert_same(eager, static):
    (eager_columns, eager_ends), (static_columns, static_ends) = eager, static
    assert static_ends == eager_ends
    ids, logprobs, *top = static_columns
    assert ids == eager_columns[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(eager_columns[1]), rtol=0, atol=2e-5)
    if top:
        assert top[0] == eager_columns[2]
        torch.testing.assert_close(torch.tensor(top[1]), torch.tensor(eager_columns[3]), rtol=0, atol=2e-5)


SETTINGS = [
    SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=12, seed=1),
    SamplingParams(n=1, temperature=0.7, top_p=0.9, max_tokens=6, seed=2, top_logprobs=4),
    SamplingParams(n=2, temperature=0.0, top_p=1.0, max_tokens=5, seed=3, top_logprobs=2),
]


@pytest.mark.parametrize("params", SETTINGS)
def test_static_steps_draw_what_the_eager_decode_draws(engine, params):
    eager, static, _ = both_decodes(engine, params)
    assert_same(eager, static)
    assert len(static[0][0][0]) > 1  # more than the prefill's token: the steps ran


@pytest.fixture(scope="module")
def bf16_engine(student_dir) -> TorchSamplerEngine:
    return TorchSamplerEngine(str(student_dir), dtype="bfloat16")


@pytest.mark.parametrize("params", SETTINGS)
def test_bf16_static_steps_draw_what_the_eager_decode_draws(bf16_engine, params):
    # bf16 attention over the padded slot buffer rounds differently from the eager cache's
    (eager_columns, eager_ends), (static_columns, static_ends), _ = both_decodes(bf16_engine, params)
    assert static_ends == eager_ends
    assert static_columns[0] == eager_columns[0]
    torch.testing.assert_close(torch.tensor(static_columns[1]), torch.tensor(eager_columns[1]), rtol=0, atol=0.02)


def test_rows_stop_at_their_own_stop_token_and_the_decode_ends_when_all_have(engine, monkeypatch):
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=40, seed=5)
    eager, _, _ = both_decodes(engine, params)
    # the tokens drawn at step 1 become stop tokens: rows end at different steps, some run on
    stop = {row[1] for row in eager[0][0][:3]}
    monkeypatch.setattr(engine, "eos_ids", stop)
    eager, static, _ = both_decodes(engine, params)
    assert_same(eager, static)
    ends = static[1]
    assert any(end is not None for end in ends)
    assert len(static[0][0][0]) == (params.max_tokens if None in ends else max(ends) + 1)


def test_one_decoder_serves_calls_after_each_other(engine):
    """A second call through the same buffers (as a captured decoder is reused) starts clean:
    the previous call's cache slots, mask and step counter do not leak into it."""
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=8, seed=7)
    _, _, decoder = both_decodes(engine, params)
    other = [[13, 14, 15, 16, 17, 18, 19, 20], [21, 22], [23]]  # 8 prompt slots, not 5: the same shape
    assert DecodeShape.of(3, 8, 8, 1.0, 1.0, 0) == decoder.shape
    eager, static, _ = both_decodes(engine, params, prompts=other, decoder=decoder)
    assert_same(eager, static)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_a_zero_probability_draw_is_redrawn_and_fed_to_the_next_step(engine, monkeypatch, temperature, top_p):
    """Injected fault: the device flags row 1's draw at step 0 as a token of probability 0 (what a
    rounding parallel cumsum can cause). The host redraws it from the row's distribution at the
    request's settings; the outputs and the next step's input carry the redrawn token and its logprob."""
    params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=3, seed=11)
    shape = DecodeShape.of(3, 5, 3, temperature, top_p, 0)
    decoder = StaticDecoder(engine.model, shape, capture=False)
    real_step, fed = decoder._draw_step, []

    def flagged_step():
        real_step()
        if int(decoder.step) == 1:
            decoder.status_2B[1, 1] = 1

    real_forward = decoder._forward_step

    def recording_forward():
        fed.append(decoder.input_ids_B1[:, 0].tolist())
        real_forward()

    monkeypatch.setattr(decoder, "_draw_step", flagged_step)
    monkeypatch.setattr(decoder, "_forward_step", recording_forward)
    redrawn = []  # (token, the row's logprobs at the time)
    real_redraw = decoder._redraw

    def recording_redraw(t, b, generator):
        logprobs_V = sampling_logprobs(decoder.logits_BV[b : b + 1].double(), temperature, top_p)[0].float()
        redrawn.append((real_redraw(t, b, generator), logprobs_V))
        return redrawn[-1][0]

    monkeypatch.setattr(decoder, "_redraw", recording_redraw)
    _, (columns, _), _ = both_decodes(engine, params, decoder=decoder)
    assert len(redrawn) == 1
    token, logprobs_V = redrawn[0]
    assert columns[0][1][0] == token == fed[0][1]
    assert columns[1][1][0] == pytest.approx(logprobs_V[token].item(), abs=1e-5)
    assert torch.isfinite(logprobs_V[token])  # (top_p 0.9: a token outside the nucleus would be -inf)


def test_slots_come_in_blocks_that_hold_prompt_and_completion():
    shape = DecodeShape.of(rows=8, prompt_length=70, max_tokens=10, temperature=1.0, top_p=1.0, top_logprobs=0)
    assert shape.slots == 2 * SLOT_BLOCK
    assert DecodeShape.of(8, 54, 10, 1.0, 1.0, 0).slots == SLOT_BLOCK


def test_a_model_with_one_attention_window_decodes_here_only_within_it(engine):
    config = engine.model.config
    shape = DecodeShape.of(3, 5, 8, 1.0, 1.0, 0)  # 64 slots
    saved = config.sliding_window
    try:
        for window, fits_in in [(None, True), (4096, True), (64, True), (32, False)]:
            config.sliding_window = window  # as Mistral's configs set it
            assert within_window(engine.model, shape) is fits_in, window
    finally:
        config.sliding_window = saved


def test_slots_an_earlier_request_left_non_finite_do_not_reach_a_later_one(engine):
    """Weights that overflowed leave NaN keys behind; after sane weights, the next request through
    the same buffers draws what the eager decode draws."""
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=8, seed=13)
    _, _, decoder = both_decodes(engine, params)
    with torch.inference_mode():
        for keys, values in zip(decoder.cache.keys, decoder.cache.values, strict=True):
            keys.fill_(float("nan"))
            values.fill_(float("nan"))
    eager, static, _ = both_decodes(engine, params, decoder=decoder)
    assert_same(eager, static)


def test_only_full_attention_models_with_sdpa_or_eager_kernels_fit(engine):
    assert fits(engine.model) is None
    config = engine.model.config
    saved = config.layer_types
    try:
        config.layer_types = ["full_attention", "sliding_attention"]
        assert "sliding" in fits(engine.model)
    finally:
        config.layer_types = saved


def test_pushed_weights_land_in_the_same_parameters(engine):
    """A captured step reads parameters at the addresses it was recorded with: a push must copy
    into them, never replace them."""
    before = {name: p.data_ptr() for name, p in engine.model.named_parameters()}
    fresh = {name: torch.randn_like(p) for name, p in engine.model.named_parameters()}
    saved = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    try:
        engine._copy_in(fresh)
        for name, p in engine.model.named_parameters():
            assert p.data_ptr() == before[name]
            torch.testing.assert_close(p.detach(), fresh[name])
    finally:
        engine._copy_in(saved)


def test_a_merged_adapter_lands_in_the_same_parameters(engine):
    module = "model.layers.0.self_attn.q_proj"
    weight = dict(engine.model.named_parameters())[f"{module}.weight"]
    before, saved = weight.data_ptr(), weight.detach().clone()
    a, b = torch.randn(4, weight.shape[1]), torch.randn(weight.shape[0], 4)
    try:
        engine._merge(Adapter(tensors={}, config={}, scale=0.5, modules={module: (a, b)}))
        assert weight.data_ptr() == before
        torch.testing.assert_close(weight.detach(), saved + 0.5 * b @ a)
    finally:
        engine._merge(Adapter(tensors={}, config={}, scale=0.0, modules={}))  # undoes it from the kept copy
        engine._base.clear()
    torch.testing.assert_close(weight.detach(), saved)


def test_graphs_are_refused_off_the_gpu(student_dir):
    with pytest.raises(ValueError, match="CUDA graphs need a cuda device"):
        TorchSamplerEngine(str(student_dir), enforce_eager=False)
    assert TorchSamplerEngine(str(student_dir)).cuda_graphs is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/device.sh profile runs this)")
def test_captured_steps_draw_what_the_eager_decode_draws_and_read_pushed_weights(student_dir):
    engine = TorchSamplerEngine(str(student_dir), device="cuda")
    assert engine.cuda_graphs
    for params in SETTINGS:
        eager, static, decoder = both_decodes(engine, params, capture=True)
        assert decoder.graphs is not None
        assert_same(eager, static)
    # the engine's own path: captured once, replayed for a second call, and after a push the
    # replayed steps compute with the pushed weights
    params = SETTINGS[0]
    first = engine._generate_sync(PROMPTS, params)
    (decoder,) = engine._static.values()
    assert decoder.graphs is not None
    pushed = {name: p.detach() * 1.5 for name, p in engine.model.named_parameters()}
    engine._copy_in(pushed)
    after = engine._generate_sync(PROMPTS, params)
    assert list(engine._static.values()) == [decoder]  # the same capture, replayed
    eager_engine = TorchSamplerEngine(str(student_dir), device="cuda", enforce_eager=True)
    eager_engine._copy_in(pushed)
    assert [[s.completion_ids for s in row] for row in after] == [
        [s.completion_ids for s in row] for row in eager_engine._generate_sync(PROMPTS, params)
    ]
    assert [[s.completion_ids for s in row] for row in after] != [[s.completion_ids for s in row] for row in first]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/device.sh profile runs this)")
def test_captured_bf16_steps_replay_the_uncaptured_steps_exactly(student_dir):
    # the graphs launch the very kernels of the uncaptured steps on the same buffers; bf16 against
    # the eager decode is covered on the CPU (test_bf16_static_steps_draw_what_the_eager_decode_draws)
    engine = TorchSamplerEngine(str(student_dir), dtype="bfloat16", device="cuda")
    for params in SETTINGS:
        _, uncaptured, _ = both_decodes(engine, params)
        _, captured, decoder = both_decodes(engine, params, capture=True)
        assert decoder.graphs is not None
        assert captured == uncaptured
