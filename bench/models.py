"""Random-init models of real shapes for the benchmarks: no hub, our locally built tokenizer.

    path = random_model(root, "student", QWEN25_SHAPES["0.5b"], seed=1)

The tokenizer has 456 tokens while these models have Qwen2.5's 151,936 vocabulary rows, so
most ids a random model samples are padded ids (past the tokenizer), which every part of opd
must handle anyway (real Qwen2.5 checkpoints pad 151,665 tokens to 151,936 rows).
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from opd.files import directory_written_aside
from opd.tiny import build_tokenizer

QWEN25_SHAPES: dict[str, dict] = {
    "0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    # head_dim named: it is part of the cache key (models built before it was named had 64, not 128)
    "1.5b": dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
}  # fmt: skip


def qwen2_config(shape: dict, **extra: object) -> Any:
    """A Qwen2Config of `shape`; head_dim hidden / heads unless the shape names it, as in Qwen2.5."""
    from transformers import Qwen2Config

    return Qwen2Config(**{"head_dim": shape["hidden_size"] // shape["num_attention_heads"], **shape, **extra})


def random_model(root: Path, name: str, shape: dict, seed: int, dtype: str = "float32") -> Path:
    """A Qwen2 model of `shape`, random init with `seed`, saved under root (cached by its recipe)."""
    from transformers import Qwen2ForCausalLM

    recipe = json.dumps({"shape": shape, "seed": seed, "dtype": dtype}, sort_keys=True)
    target = Path(root) / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    with directory_written_aside(target, keep_existing=True) as aside:
        tokenizer = build_tokenizer()
        config = qwen2_config(shape, max_position_embeddings=32768, rope_theta=1e6, dtype=dtype,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(aside)
        tokenizer.save_pretrained(aside)
    return target
