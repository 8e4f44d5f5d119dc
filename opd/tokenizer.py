"""Tokenizer fingerprints: token ids cross the wire, so student and teacher must agree on them.

A fingerprint is the vocab size plus a SHA-256 over every (token, id) pair and the special-token
map. Two tokenizers with the same fingerprint map every id to the same string.
"""

import hashlib
import json
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from opd.errors import TokenizerMismatchError

if TYPE_CHECKING:  # opd.serving imports this module
    from opd.serving import InfoResponse


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    """(vocab size, hex SHA-256 of the vocab and special tokens)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {key: str(value) for key, value in tokenizer.special_tokens_map.items()}
    payload = json.dumps({"vocab": vocab, "special": special}, sort_keys=True).encode()
    return len(tokenizer), hashlib.sha256(payload).hexdigest()


def check_same_tokenizer(
    name_a: str, fingerprint_a: tuple[int, str], name_b: str, fingerprint_b: tuple[int, str]
) -> None:
    """Raise TokenizerMismatchError naming both sides and both fingerprints if they differ."""
    if tuple(fingerprint_a) != tuple(fingerprint_b):
        raise TokenizerMismatchError(
            f"{name_a} and {name_b} use different tokenizers: {name_a} has vocab size "
            f"{fingerprint_a[0]} (hash {fingerprint_a[1][:16]}), {name_b} has vocab size "
            f"{fingerprint_b[0]} (hash {fingerprint_b[1][:16]}). On-policy distillation sends "
            "token ids between them, so pick a teacher from the student's model family."
        )


def check_vocabularies(learner_vocab: int, sampler: "InfoResponse", grader: "InfoResponse") -> None:
    """Real checkpoints have more logits than tokenizer tokens (padded vocabularies: Qwen2.5-0.5B
    151,936 rows for 151,665 tokens, Qwen2.5-7B 152,064). Nothing masks the padded ids, on any
    engine, so the student can sample one; the teacher must then have a row for it, and the
    learner the same rows as the sampler, or a run would fail mid-way or score other tokens."""
    if learner_vocab != sampler.model_vocab_size:
        raise TokenizerMismatchError(
            f"the learner's student has {learner_vocab} vocabulary rows, the sampler's model ({sampler.model}) "
            f"{sampler.model_vocab_size}: they must be the same model"
        )
    if sampler.model_vocab_size > grader.model_vocab_size:
        raise TokenizerMismatchError(
            f"the student ({sampler.model}) has {sampler.model_vocab_size} vocabulary rows, more than the "
            f"teacher ({grader.model}) with {grader.model_vocab_size}: the student could sample ids "
            "the teacher cannot score; pick a teacher whose padded vocabulary is at least the student's"
        )


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **template_kwargs: Any
) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for the assistant turn;
    `template_kwargs` are the template's own switches (Qwen3: enable_thinking)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **template_kwargs)
    return [int(i) for i in ids]  # type: ignore[union-attr,arg-type]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (padding is masked out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of plain text, no special tokens added (a prompt as is, or a completion)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Each id as text on its own (a token may hold part of a multi-byte character); an id past the
    tokenizer (a padded vocabulary row) as `<|id:N|>`."""
    known = len(tokenizer)
    return [str(tokenizer.decode([i])) if i < known else f"<|id:{i}|>" for i in ids]
