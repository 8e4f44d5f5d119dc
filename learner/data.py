"""Prompts from JSONL, tokenized once by the learner with the student's tokenizer.

Each line is an object with `prompt` (text) or `messages` (chat messages), and optionally
`answer`. Token ids, not text, go to the sampler, so nothing is re-tokenized downstream.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from learner.config import DataConfig
from learner.rewards import Reward, exact
from opd.errors import ConfigError
from opd.tokenizer import chat_prompt_ids, text_ids


@dataclass(frozen=True)
class PromptItem:
    prompt_ids: list[int]
    answer: str | None = None
    reward: Reward = exact
    """How `get_reward` checks a completion against the answer (`eval.reward`, learner/rewards.py)."""

    def get_reward(self, completion: str) -> float:
        """The item's reward of `completion` (the default: an exact match of the stripped text)."""
        if self.answer is None:
            raise ValueError("get_reward needs an item with an answer")
        return float(self.reward(completion, self.answer))


def encode_prompt(
    row: dict, tokenizer: PreTrainedTokenizerBase, chat_template: bool, template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """Token ids of one JSONL row's prompt (chat-templated when asked or when it has messages;
    `template_kwargs` go to the chat template, e.g. Qwen3's enable_thinking)."""
    if "messages" in row:
        messages = row["messages"]
    elif chat_template:
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        return text_ids(tokenizer, row["prompt"])
    return chat_prompt_ids(tokenizer, messages, **(template_kwargs or {}))


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ConfigError(f"{where}: each line needs exactly one of 'prompt' or 'messages'")
    if "answer" in row and not isinstance(row["answer"], str | int | float):
        raise ConfigError(f"{where}: 'answer' must be a string or number")
    return row


def encode_row(
    row: object, where: str, tokenizer: PreTrainedTokenizerBase, data: DataConfig, reward: Reward = exact
) -> PromptItem:
    """One JSONL-style row as a PromptItem; errors name `where` (file:line or dataset[i])."""
    checked = _check_row(row, where)
    ids = encode_prompt(checked, tokenizer, data.chat_template, data.chat_template_kwargs)
    if len(ids) > data.max_prompt_tokens:
        raise ConfigError(f"{where}: prompt has {len(ids)} tokens > data.max_prompt_tokens={data.max_prompt_tokens}")
    answer = checked.get("answer")
    return PromptItem(ids, None if answer is None else str(answer), reward)


def load_prompts(
    path: str, tokenizer: PreTrainedTokenizerBase, data: DataConfig, reward: Reward = exact
) -> list[PromptItem]:
    """Read and tokenize every line; errors name the file and line."""
    if not Path(path).is_file():
        raise ConfigError(f"data file {path} does not exist")
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        items.append(encode_row(row, f"{path}:{number}", tokenizer, data, reward))
    if not items:
        raise ConfigError(f"data file {path} has no prompts")
    return items


class PromptStream:
    """Endless batches over the items: a fresh seeded shuffle each epoch, position kept for resume."""

    def __init__(self, items: list, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list:
        batch: list = []
        while len(batch) < self.batch_size:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order()
            batch.append(self.items[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order()
