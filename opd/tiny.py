"""Tiny random-init Qwen2 models with a locally built tokenizer (no model hub).

Tests and the demo config use these: `tiny:student` and `tiny:teacher` in a config resolve to a
directory built here once and cached, which every engine then loads through the ordinary
Hugging Face path (`from_pretrained` on a local dir), so the real loading code is what runs.

head_dim is 64 everywhere because vLLM's CPU attention refuses smaller heads (16 is rejected),
and the same directories serve the vLLM engines. The student ties its embeddings like
Qwen2.5-0.5B; the teacher does not, so both weight layouts get exercised.

    python -m opd.tiny /tmp/tiny      # builds tokenizer + student + teacher under /tmp/tiny
"""

import os
import random
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opd.errors import ConfigError
from opd.files import directory_written_aside

# Bump when the recipe below changes so cached directories are rebuilt, not silently reused.
RECIPE_VERSION = "v3"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shapes: hidden = heads * 64. The teacher is larger. Both LM heads are scaled up after init so the
# next-token distributions are peaked like a trained model's: at init std 0.02 the logits have std
# ~0.3 and a model is near uniform (entropy ~6.2 nats of ln 512 = 6.24). The teacher (x12) then
# has entropy ~2-3 nats, the student (x4; tied, so its embeddings too) ~1: a student whose logits
# stay within +-3 can hardly concentrate its mass by anything but its embeddings and final norm,
# which a LoRA student leaves frozen (with the head unscaled, LoRA cut the tiny run's KL by 7%).
TINY_SPECS: dict[str, dict] = {
    "student": dict(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        initializer_range=0.02,
        seed=1,
        lm_head_scale=4.0,
    ),
    "teacher": dict(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        initializer_range=0.02,
        seed=2,
        lm_head_scale=12.0,
    ),
}

_WORDS = (
    "the",
    "a",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "add",
    "sum",
    "sort",
    "list",
    "answer",
    "question",
    "user",
    "assistant",
    "system",
    "model",
    "teacher",
    "student",
    "learn",
    "token",
    "number",
    "is",
    "of",
    "and",
    "to",
    "in",
    "what",
    "you",
    "please",
    "compute",
    "result",
    "value",
    "count",
    "words",
    "letters",
    "digit",
    "plus",
    "minus",
    "times",
    "equal",
    "yes",
    "no",
)


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic training text for the BPE: words, numbers and simple arithmetic."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"{words} {a} + {b} = {a + b}. [{', '.join(str(rng.randint(0, 9)) for _ in range(4))}]")
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen-style chat tokens, trained on generated text."""
    core = Tokenizer(models.BPE())
    # AutoTokenizer loads these dirs as Qwen2Tokenizer, which imposes Qwen's split pattern (one
    # digit per token); train with the same pattern so the merges are those used at load time.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 1024
    return tokenizer


def build_model(name: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """Random-init Qwen2 model `name` from TINY_SPECS with a fixed seed."""
    spec = dict(TINY_SPECS[name])
    seed = spec.pop("seed")
    lm_head_scale = spec.pop("lm_head_scale", 1.0)
    shape = dict(vocab_size=VOCAB_SIZE, head_dim=64, max_position_embeddings=1024, **spec)
    special = dict(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Qwen2Config(dtype="float32", **shape, **special)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def default_root() -> Path:
    return Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / "tiny"


def ensure_tiny_model(name: str, root: Path | None = None) -> Path:
    """Directory of tiny model `name` (with tokenizer), built on first use.

    Built under a temporary name and renamed, so a concurrent or interrupted build never leaves
    a half-written directory that a later run would load.
    """
    if name not in TINY_SPECS:
        raise ConfigError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_SPECS)}")
    root = Path(root) if root is not None else default_root()
    target = root / f"{name}-{RECIPE_VERSION}"
    if (target / "config.json").exists():
        return target
    # (its own seed, the caller's random state untouched: a run that builds the model on first use
    # must draw what a run that finds it cached draws, e.g. a LoRA adapter's initial weights)
    with directory_written_aside(target, keep_existing=True) as aside, torch.random.fork_rng():
        tokenizer = build_tokenizer()
        build_model(name, tokenizer).save_pretrained(aside)
        tokenizer.save_pretrained(aside)
    return target


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    for model_name in TINY_SPECS:
        print(ensure_tiny_model(model_name, out))
