"""Prompts from JSONL, tokenized once by the learner with the student's tokenizer.

Each line is an object with `prompt` (text) or `messages` (chat messages), and optionally
`answer`. Token ids, not text, go to the sampler, so nothing is re-tokenized downstream.
"""

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from transformers import PreTrainedTokenizerBase

from learner.config import DataConfig
from learner.rewards import Reward, exact
from opd import jsonl
from opd.errors import ConfigError
from opd.serving import ChatMessage, Text
from opd.tokenizer import chat_prompt_ids, text_ids

logger = logging.getLogger(__name__)


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


_TEXT = TypeAdapter(Text)
"""A prompt is text as the servers take it: a str, no lone surrogate ("\ud800" in JSON)."""

ROW_KEYS = ("prompt", "messages", "answer")
"""What a row may say; other keys (an id, a source) are left alone, and named once in a warning."""


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ConfigError(f"{where}: each line needs exactly one of 'prompt' or 'messages'")
    if "prompt" in row:
        try:
            _TEXT.validate_python(row["prompt"], strict=True)
        except ValidationError as exc:
            raise ConfigError(f"{where}: 'prompt' must be text (valid Unicode): {exc.errors()[0]['msg']}") from None
    if "messages" in row:
        _check_messages(row["messages"], where)
    if "answer" in row and not isinstance(row["answer"], str | int | float):
        raise ConfigError(f"{where}: 'answer' must be a string or number")
    return row


def _check_messages(messages: object, where: str) -> None:
    """A chat as the servers take one (`opd.serving.ChatMessage`): a list of {role, content}."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        try:
            ChatMessage.model_validate(message)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{where}: messages[{i}]: {problems}") from None


def warn_of_unread_keys(rows: list[tuple[str, object]], source: str, read: tuple[str, ...] = ROW_KEYS) -> None:
    """Name, once per file or dataset, the keys its rows carry that opd does not read: a typo such
    as `answr` would otherwise silently leave an item without its reward."""
    unread: dict[str, str] = {}
    for where, row in rows:
        for key in row if isinstance(row, dict) else ():
            if key not in read:
                unread.setdefault(key, where)
    if unread:
        named = ", ".join(f"{key!r} (first at {where})" for key, where in unread.items())
        logger.warning("%s: rows carry keys opd does not read: %s; it reads %s", source, named, ", ".join(read))


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
    rows = []
    for number, line in enumerate(jsonl.lines(jsonl.read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    items = [encode_row(row, where, tokenizer, data, reward) for where, row in rows]
    warn_of_unread_keys(rows, path)
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
