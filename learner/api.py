"""Building a trainer's inputs from Python: config from kwargs, datasets from rows or items.

OnPolicyDistillationTrainer(
    student="Qwen/Qwen2.5-0.5B-Instruct", teacher="Qwen/Qwen2.5-1.5B-Instruct",
    train_dataset=[{"prompt": "..."}, ...], eval_dataset="eval.jsonl",
    train={"steps": 200, "lr": 1e-5}, sampling={"temperature": 0.7},
)
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from learner.config import DataConfig, OpdConfig, format_errors, load_config
from learner.data import PromptItem, encode_row, load_prompts, warn_of_unread_keys
from learner.rewards import Reward, exact
from opd.errors import ConfigError


class EvalItem(Protocol):
    """What the trainer needs of a prompt: its token ids; eval items with an `answer` also score."""

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def answer(self) -> str | None: ...

    def get_reward(self, completion: str) -> float: ...


Dataset = str | Path | Sequence[dict[str, Any]] | Sequence[EvalItem] | None


def build_config(
    config: OpdConfig | str | Path | None, student: str | None, teacher: str | None, sections: dict[str, Any]
) -> OpdConfig:
    """A config from a file or object, with `student=`/`teacher=` paths and whole-section kwargs
    (`train={"lr": 1e-4}`) merged on top; errors name the key as in YAML."""
    if isinstance(config, str | Path):
        config = load_config(config)
    raw: dict[str, Any] = config.model_dump() if config is not None else {"data": {}}
    for name, spec in (("student", student), ("teacher", teacher)):
        if spec is not None:
            raw[name] = {**raw.get(name, {}), "path": spec}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    try:
        return OpdConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, "(keyword arguments)")) from exc


def load_dataset(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, data: DataConfig, reward: Reward = exact
) -> list[EvalItem]:
    """Items from a JSONL path, from JSONL-style dicts, or items already holding `prompt_ids` (which
    bring their own `get_reward`); rows read here are checked with `reward`."""
    if dataset is None:
        return []
    if isinstance(dataset, str | Path):
        return list(load_prompts(str(dataset), tokenizer, data, reward))
    items: list[EvalItem] = []
    rows = [(f"dataset[{index}]", row) for index, row in enumerate(dataset)]
    warn_of_unread_keys(rows, "dataset")
    for where, row in rows:
        if isinstance(row, dict):
            items.append(encode_row(row, where, tokenizer, data, reward))
        elif hasattr(row, "prompt_ids") and hasattr(row, "get_reward"):
            items.append(row)  # type: ignore[arg-type]  # duck-typed just above
        else:
            raise ConfigError(
                f"{where}: expected a dict with 'prompt'/'messages' or an item with prompt_ids and get_reward"
            )
    return items


__all__ = ["Dataset", "EvalItem", "PromptItem", "build_config", "load_dataset"]
