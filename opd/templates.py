"""`opd init`: scaffold a project folder (config.yml, train.jsonl, eval.jsonl) from a template.

    opd init my-run --template distill-reasoning
    opd run my-run/config.yml

Templates are starting points: the prompts they write are a few generated examples that show
the format; replace them with your own.
"""

import json
import random
from pathlib import Path

from opd.errors import ConfigError

QWEN_PAIR = """student:
  path: Qwen/Qwen2.5-0.5B-Instruct
  dtype: bfloat16
teacher:
  path: Qwen/Qwen2.5-1.5B-Instruct
  dtype: bfloat16
"""

CONFIGS = {
    "distill-reasoning": QWEN_PAIR
    + """data:
  train_path: train.jsonl
  eval_path: eval.jsonl   # items with "answer" get eval/reward (exact match of the completion)
sampling:
  n: 4
  temperature: 0.7
  max_tokens: 512
train:
  steps: 300
  batch_size: 4
  lr: 1.0e-5
  ppo_steps: 1
  device: cuda:0
eval:
  eval_steps: 50
  max_items: 64
  max_tokens: 512
checkpoint:
  save_steps: 50
""",
    "distill-chat": QWEN_PAIR
    + """data:
  train_path: train.jsonl
  eval_path: eval.jsonl
sampling:
  n: 2
  temperature: 0.8
  max_tokens: 256
train:
  steps: 200
  batch_size: 8
  lr: 1.0e-5
  device: cuda:0
eval:
  eval_steps: 50
  max_tokens: 256
checkpoint:
  save_steps: 50
""",
    "tiny": """# Runs on CPU in about a minute with locally built tiny models.
student:
  path: tiny:student
teacher:
  path: tiny:teacher
data:
  train_path: train.jsonl
  eval_path: eval.jsonl
sampling:
  n: 4
  temperature: 1.0
  max_tokens: 24
train:
  steps: 30
  lr: 1.0e-3
  ppo_steps: 2
eval:
  eval_steps: 10
  max_tokens: 24
""",
}


def _reasoning_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        question = (
            f"A shop has {a} boxes with {c} apples each and sells {b} apples. How many apples are left? "
            "Think step by step, then give only the number on the last line."
        )
        rows.append({"prompt": question, "answer": str(a * c - b)})
    return rows


def _chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    topics = ["tides", "compilers", "photosynthesis", "sourdough", "glaciers", "TCP", "bees", "chess openings"]
    asks = ["Explain {} to a curious twelve-year-old.", "Write three bullet points about {}.",
            "What is a common misconception about {}?"]  # fmt: skip
    return [{"messages": [{"role": "user", "content": rng.choice(asks).format(rng.choice(topics))}]} for _ in range(n)]


def _tiny_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"what is {a} + {b}?", "answer": str(a + b)}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]  # fmt: skip


ROWS = {"distill-reasoning": _reasoning_rows, "distill-chat": _chat_rows, "tiny": _tiny_rows}


def init_project(folder: Path, template: str) -> list[Path]:
    """Write config.yml, train.jsonl and eval.jsonl into `folder`; never overwrite a file."""
    if template not in CONFIGS:
        raise ConfigError(f"unknown template {template!r}; choose one of {sorted(CONFIGS)}")
    files = {
        "config.yml": CONFIGS[template],
        "train.jsonl": _jsonl(ROWS[template](64, seed=1)),
        "eval.jsonl": _jsonl(ROWS[template](16, seed=2)),
    }
    existing = [name for name in files if (folder / name).exists()]
    if existing:
        raise ConfigError(f"{folder} already has {', '.join(existing)}; choose an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return [folder / name for name in files]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)
