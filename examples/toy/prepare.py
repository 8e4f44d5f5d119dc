"""Build the toy task's teacher and student by supervised learning on CPU, and its prompt files.

    python -m examples.toy.prepare [--out runs/toy]     # ~40 s on 2 cores the first time

The teacher (Qwen2-style, 1.1M parameters) trains for 200 steps, after which it sorts 99% of the
held-out lists; the student (0.36M, the `tiny:student` shape) gets 50 steps, so it knows the format
but gets most lists wrong. Both share the locally built tiny tokenizer. Everything is seeded, and
the outputs are cached under `--out`: a model is rebuilt when its recipe (shapes, steps, seeds) or
the data it is built from (list counts, seeds, tokenizer recipe) changes.

Writes `<out>/teacher/`, `<out>/student/` (Hugging Face dirs, each with `sft.json`: eval reward and
SFT time) and `<out>/train.jsonl`, `<out>/eval.jsonl` for `opd run examples/toy/config.yml`.
"""

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from examples.toy.evaluate import greedy_rewards
from examples.toy.task import EVAL_SEED, Problem, eval_problems, to_items, train_problems, write_jsonl
from opd.files import directory_written_aside
from opd.tiny import RECIPE_VERSION as TINY_RECIPE
from opd.tiny import build_tokenizer

NUM_EVAL = 200
"""Held-out lists; 200 makes one problem worth 0.5 points of reward."""
NUM_SFT = 20_000
"""Lists the SFT runs sample their batches from."""
NUM_TRAIN_PROMPTS = 8_192
"""Distillation prompts (train.jsonl), other lists than the SFT ones: 64 steps of 128 without a repeat."""
DISTILL_SEED = 3


@dataclass(frozen=True)
class Recipe:
    """Shape and SFT schedule of one model; its JSON is the cache key."""

    hidden_size: int
    layers: int
    tie_word_embeddings: bool
    steps: int
    lr: float
    batch_size: int = 128
    warmup_steps: int = 50
    seed: int = 0
    version: str = "toy-v1"


RECIPES = {
    "teacher": Recipe(hidden_size=192, layers=3, tie_word_embeddings=False, steps=200, lr=3e-3, seed=1),
    "student": Recipe(hidden_size=128, layers=2, tie_word_embeddings=True, steps=50, lr=3e-3, warmup_steps=12, seed=1),
}


def build_model(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """Random-init Qwen2 model; head_dim 64 because vLLM's CPU attention refuses smaller heads."""
    heads = recipe.hidden_size // 64
    attention: dict[str, Any] = {"num_attention_heads": heads, "num_key_value_heads": 1, "head_dim": 64}
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=2 * recipe.hidden_size,
        **attention, num_hidden_layers=recipe.layers, tie_word_embeddings=recipe.tie_word_embeddings,
        max_position_embeddings=256, dtype="float32", bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(recipe.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def sft_batch(
    problems: list[Problem], tokenizer: PreTrainedTokenizerBase, rng: random.Random, size: int
) -> dict[str, torch.Tensor]:
    """Right-padded chat rows with labels on the answer and its end token only."""
    rows = []
    for problem in rng.choices(problems, k=size):
        prompt = to_items([problem], tokenizer)[0].prompt_ids
        answer = [*tokenizer(problem.answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        rows.append((prompt, answer))
    length = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((size, length), int(tokenizer.pad_token_id), dtype=torch.long)
    labels = torch.full((size, length), -100, dtype=torch.long)
    attention_mask = torch.zeros((size, length), dtype=torch.long)
    for b, (prompt, answer) in enumerate(rows):
        input_ids[b, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[b, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        attention_mask[b, : len(prompt) + len(answer)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _lr_at(recipe: Recipe, step: int) -> float:
    """Linear warmup, then cosine decay to zero at the last step."""
    warm = min(1.0, step / recipe.warmup_steps)
    return recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))


def sft(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], recipe: Recipe) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(recipe.seed)
    model.train()
    for step in range(1, recipe.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(recipe, step)
        loss = model(**sft_batch(problems, tokenizer, rng, recipe.batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            print(f"  sft step {step}/{recipe.steps}  loss {loss.item():.3f}", flush=True)


def ensure_model(name: str, out: Path, train: list[Problem], eval_: list[Problem]) -> Path:
    """`out/name`, trained now unless a directory with the same recipe is already there."""
    recipe, target = RECIPES[name], out / name
    marker = target / "sft.json"
    key = {**asdict(recipe), **data_key()}
    if marker.exists() and json.loads(marker.read_text())["recipe"] == key:
        return target
    print(f"training the toy {name} ({recipe.hidden_size} hidden x {recipe.layers} layers, {recipe.steps} steps)")
    tokenizer = build_tokenizer()
    model, start = build_model(recipe, tokenizer), time.perf_counter()
    sft(model, tokenizer, train, recipe)
    seconds = time.perf_counter() - start
    rewards = greedy_rewards(model, tokenizer, to_items(eval_, tokenizer))
    summary = {"recipe": key, "eval_reward": sum(rewards) / len(rewards), "sft_seconds": seconds}
    print(f"  {name}: eval reward {summary['eval_reward']:.3f} after {seconds:.0f} s")
    with directory_written_aside(target) as aside:  # an interrupted run never leaves a dir that looks done
        model.save_pretrained(aside)
        tokenizer.save_pretrained(aside)
        (aside / "sft.json").write_text(json.dumps(summary, indent=2))
    return target


def data_key() -> dict:
    """What a model depends on besides its recipe: part of the cache key."""
    return {"num_sft": NUM_SFT, "num_eval": NUM_EVAL, "eval_seed": EVAL_SEED, "tokenizer": TINY_RECIPE}


def sft_summary(model_dir: Path) -> dict:
    """What `ensure_model` recorded: recipe, eval_reward, sft_seconds."""
    return json.loads((model_dir / "sft.json").read_text())


@dataclass(frozen=True)
class ToyFiles:
    teacher: Path
    student: Path
    train_jsonl: Path
    eval_jsonl: Path


def sft_problems(eval_: list[Problem]) -> list[Problem]:
    return train_problems(NUM_SFT, 0, eval_)


def distill_problems(eval_: list[Problem]) -> list[Problem]:
    """The distillation prompts (train.jsonl): lists that are neither eval lists nor SFT lists."""
    return train_problems(NUM_TRAIN_PROMPTS, DISTILL_SEED, [*eval_, *sft_problems(eval_)])


def prepare(out: Path) -> ToyFiles:
    """Teacher, student and prompt files under `out`, built or reused."""
    eval_ = eval_problems(NUM_EVAL)
    sft_lists = sft_problems(eval_)
    files = ToyFiles(ensure_model("teacher", out, sft_lists, eval_), ensure_model("student", out, sft_lists, eval_),
                     out / "train.jsonl", out / "eval.jsonl")  # fmt: skip
    write_jsonl(distill_problems(eval_), files.train_jsonl)
    write_jsonl(eval_, files.eval_jsonl)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the toy teacher and student (cached).")
    parser.add_argument("--out", type=Path, default=Path("runs/toy"), help="output directory (default runs/toy)")
    files = prepare(parser.parse_args().out)
    for name in ("teacher", "student"):
        print(f"{name}: {getattr(files, name)}  eval reward {sft_summary(getattr(files, name))['eval_reward']:.3f}")


if __name__ == "__main__":
    main()
