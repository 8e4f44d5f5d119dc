"""On-policy distillation from Python, on the embedded default (local CPU servers, tiny models).

    python examples/onpolicy_distillation_example.py [--steps 20] [--run-dir runs/example]

Swap `tiny:student` / `tiny:teacher` for real checkpoints (e.g. Qwen/Qwen2.5-0.5B-Instruct and
Qwen/Qwen2.5-1.5B-Instruct, or local directories) and raise the steps for a real run.
"""

import argparse
from dataclasses import dataclass

from learner import OnPolicyDistillationTrainer


@dataclass(frozen=True)
class LengthItem:
    """An eval item with its own reward: 1.0 when the completion is at most `answer` characters.

    Any object with `prompt_ids`, `answer` and `get_reward(completion) -> float` can be an eval
    item; reward metrics are computed only over items whose `answer` is set.
    """

    prompt_ids: list[int]
    answer: str | None

    def get_reward(self, completion: str) -> float:
        return float(len(completion) <= int(self.answer or 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--run-dir", default="runs/example")
    args = parser.parse_args()

    trainer = OnPolicyDistillationTrainer(
        student="tiny:student",
        teacher="tiny:teacher",
        train_dataset="examples/tiny/train.jsonl",
        eval_dataset=[
            {"prompt": "what is 2 + 3?", "answer": "5"},  # scored by PromptItem.get_reward (exact match)
            {"prompt": "please sort the list one two"},  # no answer: reverse KL only
        ],
        run_dir=args.run_dir,
        sampling={"n": 4, "temperature": 1.0, "max_tokens": 24},
        train={"steps": args.steps, "batch_size": 4, "lr": 1e-3},
        eval={"eval_steps": max(1, args.steps // 2), "n": 4, "max_tokens": 24},
        services={"engine": "torch"},
    )
    custom = LengthItem(trainer.train_items[0].prompt_ids, answer="200")
    trainer.eval_items = [*trainer.eval_items, custom]
    history = trainer.train()
    print(f"steps: {len(history)}  reverse KL per token: "
          f"{history[0]['kl/reverse_per_token']:.3f} -> {history[-1]['kl/reverse_per_token']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
