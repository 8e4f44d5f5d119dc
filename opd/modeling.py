"""Loading causal LMs and scoring completions with them (torch path).

Shared by the torch engines of both services and by the learner, so the grader's teacher
logprobs and the learner's student logprobs come from the same packing and gather code.

Shape suffixes: B = sequences, L = padded full length, T = completion tokens, K = top-k,
N = completion tokens of all rows flattened, H = hidden size. Batches are left-padded (so a
sampler's rows all end where decoding continues); only the N positions that predict completion
tokens go through the LM head, a chunk at a time (`opd.logprobs`), so [B, T, V] logits never exist.
"""

from dataclasses import dataclass
from itertools import chain

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from opd import torch_thread
from opd.logprobs import token_logprobs, top_k_logprobs
from opd.paths import resolve_model_path
from opd.serving import InfoResponse
from opd.tokenizer import pad_token_id, tokenizer_fingerprint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a HF model id, a local dir, or `tiny:NAME`."""
    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def model_card(
    model_path: str, *, engine: str, dtype: str, model_vocab_size: int, max_model_len: int, max_logprobs: int,
    max_lora_rank: int | None = None,
) -> tuple[PreTrainedTokenizerBase, InfoResponse]:  # fmt: skip
    """The served model's tokenizer and what GET /v1/info says about it, fixed when its engine
    starts (policy_version 0): one place for all four engines."""
    tokenizer = load_tokenizer(model_path)
    vocab_size, digest = tokenizer_fingerprint(tokenizer)
    card = InfoResponse(model=model_path, engine=engine, dtype=dtype, vocab_size=vocab_size, tokenizer_hash=digest,
                        model_vocab_size=model_vocab_size, max_model_len=max_model_len,
                        max_logprobs=max_logprobs, max_lora_rank=max_lora_rank)  # fmt: skip
    return tokenizer, card


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """A causal LM from a HF model id, a local dir, or `tiny:NAME`, in eval mode on `device`."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=DTYPES[dtype])
    return model.to(device).eval()  # type: ignore[arg-type]


@dataclass(frozen=True)
class ServedModel:
    """What a torch engine serves: the model, loaded on the process's torch thread, its tokenizer
    and padding id, and its GET /v1/info card."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    card: InfoResponse
    pad_id: int


def load_served_model(
    model_path: str, *, dtype: str, device: str, max_model_len: int | None, max_logprobs: int,
    max_lora_rank: int | None = None,
) -> ServedModel:  # fmt: skip
    """Both torch engines' start: the process set up for `device`, the model loaded on the torch
    thread (every later torch call of the server runs there: `opd/torch_thread.py`), its card."""
    torch_thread.use_device(torch.device(device))
    model = torch_thread.call(load_causal_lm, model_path, dtype, device)
    tokenizer, card = model_card(
        model_path, engine="torch", dtype=dtype, max_model_len=max_model_len or model.config.max_position_embeddings,
        model_vocab_size=model.config.vocab_size, max_logprobs=max_logprobs, max_lora_rank=max_lora_rank,
    )  # fmt: skip
    return ServedModel(model, tokenizer, card, pad_token_id(tokenizer))


@dataclass(frozen=True)
class PackedBatch:
    """prompt + completion rows, left-padded to a common length L."""

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    completion_lengths_B: torch.Tensor


def pack_left_padded(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: str = "cpu"
) -> PackedBatch:
    """Left-pad `prompt + completion` rows; position ids skip the padding.

    Built on the host from one flat tensor of every row's ids: a tensor and two slice copies per
    row cost 16 aten ops a row (2,000 for the toy's 128 rows, ~1.5 ms here and more on a GPU
    machine's host, in each of the sampler, the grader and the learner every step)."""
    rows = list(zip(prompts, completions, strict=True))
    lengths_B = torch.tensor([len(p) + len(c) for p, c in rows], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(chain(p, c) for p, c in rows)), dtype=torch.long)
    length = int(lengths_B.max())
    attention_mask = torch.arange(length)[None, :] >= length - lengths_B[:, None]
    input_ids = torch.full((len(lengths_B), length), pad_id, dtype=torch.long)
    input_ids[attention_mask] = flat  # row-major: row b's ids fill its last len(b) columns in order
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    completion_lengths_B = torch.tensor([len(c) for c in completions], dtype=torch.long)
    return PackedBatch(
        input_ids.to(device),
        attention_mask.to(device),
        position_ids.to(device),
        completion_lengths_B.to(device),
    )


def length_sorted_chunks(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Row indices grouped so that rows x longest row <= max_batch_tokens (a longer row alone),
    rows of similar length together (little padding); shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = [[]]
    for i in order:
        if chunks[-1] and (len(chunks[-1]) + 1) * lengths[i] > max_batch_tokens:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def completion_positions(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) in the [B, L] batch of the position predicting each completion token, [N] each,
    in right-padded order (row 0's tokens, then row 1's, ...): row b's completion token i sits at
    column L - C_b + i and is predicted one position earlier."""
    length = batch.input_ids_BL.shape[1]
    lengths_B = batch.completion_lengths_B
    rows_N = torch.repeat_interleave(torch.arange(len(lengths_B), device=lengths_B.device), lengths_B)
    starts_B = torch.cumsum(lengths_B, 0) - lengths_B
    index_N = torch.arange(int(lengths_B.sum()), device=lengths_B.device) - starts_B[rows_N]
    return rows_N, length - lengths_B[rows_N] + index_N - 1


def completion_targets(batch: PackedBatch) -> torch.Tensor:
    """The completion token ids in right-padded order, [N]."""
    rows_N, columns_N = completion_positions(batch)
    return batch.input_ids_BL[rows_N, columns_N + 1]


def completion_hidden_states(model: PreTrainedModel, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states (after the last norm) of the positions predicting completion tokens, [N, H].

    Runs the model's body only: the LM head is left to `opd.logprobs`, which projects a chunk of
    positions at a time, so the [B, T, V] logits never exist.
    """
    out = model.get_decoder()(
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
        use_cache=False,
    )
    rows_N, columns_N = completion_positions(batch)
    return out.last_hidden_state[rows_N, columns_N]


def lm_head(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output projection."""
    head = model.get_output_embeddings()
    return head.weight, head.bias


def right_padded(values_N: torch.Tensor, lengths_B: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Per-position values in right-padded order [N, ...] as a right-padded [B, T, ...] tensor, zeros after
    each row's end (T = `width`, by default the longest row)."""
    width = width if width is not None else int(lengths_B.max()) if len(lengths_B) else 0
    out = values_N.new_zeros((len(lengths_B), width, *values_N.shape[1:]))
    mask_BT = torch.arange(width, device=lengths_B.device)[None, :] < lengths_B[:, None]
    out[mask_BT] = values_N
    return out


def padded_rows(rows: list[list], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Ragged per-sample lists of numbers as one right-padded [B, width] tensor, zeros past each row.

    Built from one flat tensor: a tensor per row and its copy cost ~10 us, more than the
    conversion itself."""
    lengths_B = torch.tensor([len(row) for row in rows], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(rows)), dtype=dtype)
    return right_padded(flat, lengths_B, width)


def completion_logprobs(
    model: PreTrainedModel,
    batch: PackedBatch,
    temperature: float = 1.0,
    chunk_size: int = 512,
    extra_ids_BTK: torch.Tensor | None = None,
    aux_temperature: float | None = None,
) -> torch.Tensor:
    """Logprob of every completion token under `model` at `temperature`, right-padded [B, T]; with
    `extra_ids_BTK` (right-padded like the result) or `aux_temperature`, [B, T, C]: the completion
    token's logprob, then those of the extra ids at the same position (same softmax), then the
    completion token's at `aux_temperature` (no gradient; see `opd.logprobs.token_logprobs`).

    Differentiable when called with grad enabled (the learner's update); at least float32 whatever
    the model's dtype. Memory beyond the model's body: about 2 x chunk_size x V floats.
    """
    hidden_NH = completion_hidden_states(model, batch)
    weight_VH, bias_V = lm_head(model)
    ids_NK = completion_targets(batch)[:, None]
    if extra_ids_BTK is not None:
        lengths_B = batch.completion_lengths_B
        valid_BT = torch.arange(extra_ids_BTK.shape[1], device=lengths_B.device)[None, :] < lengths_B[:, None]
        ids_NK = torch.cat([ids_NK, extra_ids_BTK[valid_BT]], dim=1)
    logprobs_NK = token_logprobs(hidden_NH, weight_VH, bias_V, ids_NK, temperature, chunk_size, aux_temperature)
    out = right_padded(logprobs_NK, batch.completion_lengths_B)
    return out if extra_ids_BTK is not None or aux_temperature is not None else out[..., 0]


@dataclass(frozen=True)
class CompletionScores:
    """What a grader returns for a batch, flattened over completion tokens (N, in right-padded order)."""

    token_logprobs_N: torch.Tensor
    candidate_logprobs_NC: torch.Tensor | None = None
    top_ids_NK: torch.Tensor | None = None
    top_logprobs_NK: torch.Tensor | None = None


@torch.no_grad()
def completion_scores(
    model: PreTrainedModel, batch: PackedBatch, *, top_k: int = 0, candidate_ids_NC: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> CompletionScores:  # fmt: skip
    """Logprobs (temperature 1) of every completion token, of `candidate_ids_NC` at each completion
    position, and the top-k there; one body forward, the LM head a chunk at a time."""
    hidden_NH = completion_hidden_states(model, batch)
    weight_VH, bias_V = lm_head(model)
    ids_NC = completion_targets(batch)[:, None]
    if candidate_ids_NC is not None:
        ids_NC = torch.cat([ids_NC, candidate_ids_NC], dim=1)
    if top_k == 0:
        logprobs_NC = token_logprobs(hidden_NH, weight_VH, bias_V, ids_NC, 1.0, chunk_size)
        return CompletionScores(logprobs_NC[:, 0], logprobs_NC[:, 1:] if candidate_ids_NC is not None else None)
    top_ids_NK, top_logprobs_NK, gathered_NC = top_k_logprobs(hidden_NH, weight_VH, bias_V, top_k, chunk_size, ids_NC)
    assert gathered_NC is not None
    candidates_NC = gathered_NC[:, 1:] if candidate_ids_NC is not None else None
    return CompletionScores(gathered_NC[:, 0], candidates_NC, top_ids_NK, top_logprobs_NK)
