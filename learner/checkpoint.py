"""Student checkpoints in Hugging Face format, loadable as is by transformers and vLLM.

Written to a temporary directory and renamed into place, so a crash mid-save never leaves a
directory that looks complete.
"""

import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, root: Path, step: int) -> Path:
    """Save to `root/step_{step:06d}` atomically; returns the directory."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
