"""`opd init`: scaffold a project folder (config.yml, train.jsonl, eval.jsonl) from a template.

    opd init my-run --template distill-reasoning
    opd run my-run/config.yml

distill-reasoning and distill-chat run on one GPU; distill-reasoning-qwen3 is the Qwen3-8B/32B
recipe for an 8-GPU node and also writes the compose override that lays its services out; tiny
runs on CPU.

Templates are starting points: the prompts they write are a few generated examples that show
the format; replace them with your own.
"""

import json
import random
from importlib import resources
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
    "distill-reasoning": """# Qwen2.5-0.5B-Instruct learns to reason from Qwen2.5-1.5B-Instruct on one GPU: `opd run`
# starts a sampler and a grader (vLLM) next to the learner, all on GPU 0.
#
# GPU memory (estimates from the model shapes, not yet measured): one 80 GB GPU.
#   sampler  25% (20 GB): the 0.5B student in bf16 (1 GB) + KV cache
#   grader   25% (20 GB): the 1.5B teacher in bf16 (3 GB) + KV cache + float32 logits of prompt
#            scoring (151,936 vocab x 8,192 prefill tokens x 4 bytes = 5 GB per chunk)
#   learner  the rest (~40 GB): float32 weights, gradients and AdamW moments (8 GB) + activations of
#            a 4,096-token micro-batch under bf16 autocast (~6 GB) + the chunked LM head (~1 GB)
# On a 40 GB GPU halve micro_batch_tokens; the two servers' shares then still fit.
"""
    + QWEN_PAIR
    + """data:
  train_path: train.jsonl
  eval_path: eval.jsonl   # items with "answer" get eval/reward
sampling:
  n: 4
  temperature: 0.7
  max_tokens: 1024
train:
  steps: 300
  batch_size: 4
  lr: 1.0e-5
  ppo_steps: 1
  precision: bf16
  micro_batch_tokens: 4096
  device: cuda:0
eval:
  eval_steps: 50
  max_items: 64
  max_tokens: 1024
  reward: math            # the final answer (\\boxed{...}, else the last number) by value
services:
  device: cuda:0
  gpu_memory_utilization: 0.25   # each server's share of GPU 0; they start one after the other
checkpoint:
  save_steps: 50
""",
    "distill-reasoning-qwen3": """# Qwen3-8B learns, as LoRA adapters, to reason from Qwen3-32B on one 8-GPU node (80 GB
# H100s or larger). The services run in containers: docker-compose.qwen3.yml, next to this file,
# gives the teacher GPUs 0-1, five student samplers GPUs 2-6 and the learner GPU 7:
#
#   CONFIG_DIR=$PWD/FOLDER docker compose -f deploy/docker-compose.yml -f FOLDER/docker-compose.qwen3.yml up --build
#
# GPU memory (estimates from the model shapes, not yet measured; the compose file has the detail):
#   grader   Qwen3-32B in bf16, 33 GB of weights per GPU at tensor parallel 2, the rest KV cache
#   samplers Qwen3-8B in bf16 (16 GB) + the adapter + ~50 GB of KV cache: ~40 completions of 8k tokens
#   learner  the frozen bf16 base (16 GB) + rank-64 adapters with AdamW (2.8 GB) + activations of a
#            32k-token micro-batch with gradient checkpointing (~8 GB): ~30 GB
student:
  path: Qwen/Qwen3-8B
  dtype: bfloat16         # as the samplers serve it
  lora:
    r: 64                 # the samplers start with --max-lora-rank 64
    alpha: 128
teacher:
  path: Qwen/Qwen3-32B    # served by the grader; the learner reads only its tokenizer
  dtype: bfloat16
data:
  train_path: train.jsonl
  eval_path: eval.jsonl
  max_prompt_tokens: 1024
  chat_template_kwargs: {enable_thinking: true}   # Qwen3 reasons in <think>...</think> first
sampling:
  n: 4
  temperature: 0.6        # Qwen3's recommended sampling in thinking mode
  top_p: 0.95
  max_tokens: 8192        # thinking traces run to thousands of tokens
train:
  steps: 200
  batch_size: 32
  lr: 1.0e-4              # adapters take a larger step than full fine-tuning
  ppo_steps: 1
  max_staleness: 1        # generate and grade the next batch while the learner learns
  precision: bf16
  gradient_checkpointing: true
  micro_batch_tokens: 32768
  device: cuda:0
eval:
  eval_steps: 25
  max_items: 128
  max_tokens: 8192
  reward: math            # the final answer (\\boxed{...}, else the last number) by value
checkpoint:
  save_steps: 25
services:                 # the containers of docker-compose.qwen3.yml, by their compose names
  sampler_urls: [http://sampler:8001, http://sampler2:8001, http://sampler3:8001, http://sampler4:8001,
                 http://sampler5:8001]
  grader_url: http://grader:8002
  weight_transport: path  # adapters go through the shared volume
  shared_dir: /shared/weights
  request_timeout_s: 1800 # 8k-token completions of a 32-prompt batch take minutes
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


LAST_LINE = "Think step by step, then give only the number on the last line."
BOXED = "Reason step by step, then put the final answer in \\boxed{}."


def _reasoning_rows(n: int, seed: int, instruction: str = LAST_LINE) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        b = min(b, a * c - 1)  # a shop sells at most what it has: the answer is a positive count
        question = f"A shop has {a} boxes with {c} apples each and sells {b} apples. How many apples are left? "
        rows.append({"prompt": question + instruction, "answer": str(a * c - b)})
    return rows


def _boxed_rows(n: int, seed: int) -> list[dict]:
    return _reasoning_rows(n, seed, BOXED)


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


ROWS = {"distill-reasoning": _reasoning_rows, "distill-reasoning-qwen3": _boxed_rows, "distill-chat": _chat_rows,
        "tiny": _tiny_rows}  # fmt: skip
COMPOSE = {"distill-reasoning-qwen3": "docker-compose.qwen3.yml"}
"""Templates whose services run in containers: the compose override (opd/compose/, the same file
as deploy/'s) written next to the config."""


def init_project(folder: Path, template: str) -> list[Path]:
    """Write config.yml, train.jsonl and eval.jsonl (and a container template's compose override)
    into `folder`; never overwrite a file."""
    if template not in CONFIGS:
        raise ConfigError(f"unknown template {template!r}; choose one of {sorted(CONFIGS)}")
    files = {
        "config.yml": CONFIGS[template],
        "train.jsonl": _jsonl(ROWS[template](64, seed=1)),
        "eval.jsonl": _jsonl(ROWS[template](16, seed=2)),
    }
    if template in COMPOSE:
        files[COMPOSE[template]] = (resources.files("opd") / "compose" / COMPOSE[template]).read_text()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file: name a folder for the project")
    existing = [name for name in files if (folder / name).exists()]
    if existing:
        raise ConfigError(f"{folder} already has {', '.join(existing)}; choose an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return [folder / name for name in files]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)
