"""Eval rewards: how a completion is checked against an item's `answer` (`eval.reward`).

    exact       the whole completion, stripped, equals the answer (plain tasks; the default)
    last_line   the last non-empty line, stripped, equals the answer
    math        the final answer, as a reasoning model writes it (`\\boxed{...}`, else the last
                number or expression), equals the answer by value (42, 42.0, \\frac{84}{2}),
                checked by Hugging Face's math-verify (`pip install 'opd[math]'`)
    pkg.mod:fn  your own: fn(completion: str, answer: str) -> float, imported by this path

From the Python API, items of your own with a `get_reward(completion) -> float` method do the same.
"""

import importlib
import inspect
import re
import threading
from collections.abc import Callable

from opd.errors import ConfigError

Reward = Callable[[str, str], float]
"""(completion text, answer) -> reward."""

BUILT_IN = ("exact", "last_line", "math")
CUSTOM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def exact(completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())


def last_line(completion: str, answer: str) -> float:
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return float(bool(lines) and lines[-1] == answer.strip())


def math(completion: str, answer: str) -> float:
    """1.0 when math-verify finds the completion's final answer equal to `answer` by value."""
    from math_verify import parse, verify

    # math-verify bounds sympy's work with signal.alarm, which only the main thread may set; off
    # it (an eval called from a thread of your own) it runs unbounded rather than raising.
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(answer, parsing_timeout=seconds)
    found = parse(completion, parsing_timeout=seconds)
    return float(bool(gold) and bool(found) and verify(gold, found, timeout_seconds=seconds))


def load_reward(name: str) -> Reward:
    """The reward `name` names (see the module docstring); errors say what is wrong at start."""
    if name == "exact":
        return exact
    if name == "last_line":
        return last_line
    if name == "math":
        try:
            importlib.import_module("math_verify")
        except ImportError as exc:
            raise ConfigError("eval.reward math needs math-verify: pip install 'opd[math]'") from exc
        return math
    module_name, _, function_name = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"eval.reward {name}: cannot import {function_name} from {module_name} ({exc})") from exc
    if not callable(function):
        raise ConfigError(f"eval.reward {name} is not a function")
    try:
        inspect.signature(function).bind("completion", "answer")
    except TypeError as exc:
        raise ConfigError(f"eval.reward {name} cannot be called as fn(completion, answer): {exc}") from exc
    except ValueError:  # no signature to read (some builtins): the first eval finds out
        pass
    return function
