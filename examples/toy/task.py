"""The toy task: sort eight digits, in a one-turn chat, with a reward that checks the answer.

    user: sort 73029461      assistant: 01234679<|im_end|>

Every digit is its own token (the tiny tokenizer splits numbers like Qwen2), so a completion is
eight digit tokens and the end token. A 1M-parameter teacher learns this on two CPU cores in about
a minute; a smaller student after a brief SFT gets the format and some lists right but most wrong,
which leaves a gap for distillation to close. The eval lists are held out of every training set.

Two-digit addition was tried first and dropped: these small models learn it only after a long
plateau whose end moved by hundreds of steps from one seed to the next (a teacher at 8% or 100%
after the same minute), too erratic for a benchmark or a test.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from opd.tokenizer import chat_prompt_ids

NUM_DIGITS = 8
"""Digits per list: 8 answer tokens + the end token per completion."""
EVAL_SEED = 20_261_123
"""Seeds the held-out eval lists, so every run evaluates on the same problems."""


@dataclass(frozen=True)
class Problem:
    digits: str

    @property
    def prompt(self) -> str:
        return f"sort {self.digits}"

    @property
    def answer(self) -> str:
        return "".join(sorted(self.digits))


def reward(completion: str, answer: str) -> float:
    """1.0 when the completion is exactly the sorted digits (surrounding whitespace ignored), else 0.0."""
    return float(completion.strip() == answer)


@dataclass(frozen=True)
class SortItem:
    """A prompt the trainer can use, and an eval item: `get_reward` checks the sorted list."""

    prompt_ids: list[int]
    answer: str | None

    def get_reward(self, completion: str) -> float:
        if self.answer is None:
            raise ValueError("get_reward needs an item with an answer")
        return reward(completion, self.answer)


def random_problems(count: int, seed: int, exclude: frozenset[Problem] = frozenset()) -> list[Problem]:
    """`count` distinct random lists drawn with `seed`, none of them in `exclude`."""
    rng, seen, problems = random.Random(seed), set(exclude), list[Problem]()
    while len(problems) < count:
        problem = Problem("".join(rng.choice("0123456789") for _ in range(NUM_DIGITS)))
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def eval_problems(count: int) -> list[Problem]:
    return random_problems(count, EVAL_SEED)


def train_problems(count: int, seed: int, held_out: list[Problem]) -> list[Problem]:
    """Training lists for SFT or distillation: seeded, never one of the eval lists."""
    return random_problems(count, seed, frozenset(held_out))


def to_items(problems: list[Problem], tokenizer: PreTrainedTokenizerBase) -> list[SortItem]:
    """Chat-templated prompt ids with answers, the form both trainers and the evaluator take."""
    return [SortItem(chat_prompt_ids(tokenizer, [{"role": "user", "content": p.prompt}]), p.answer)
            for p in problems]  # fmt: skip


def write_jsonl(problems: list[Problem], path: Path) -> None:
    """`{"prompt", "answer"}` lines for `opd run` (the default PromptItem reward is the same exact match)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
