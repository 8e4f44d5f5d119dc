"""Tokenizer fingerprints: token ids cross the wire, so student and teacher must agree on them.

A fingerprint is the vocab size plus a SHA-256 over every (token, id) pair and the special-token
map. Two tokenizers with the same fingerprint map every id to the same string.
"""

import hashlib
import json

from transformers import PreTrainedTokenizerBase

from opd.errors import TokenizerMismatchError


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


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for the assistant turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return [int(i) for i in ids]  # type: ignore[union-attr,arg-type]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (padding is masked out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)
