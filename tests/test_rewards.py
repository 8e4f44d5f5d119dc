"""Eval rewards (`eval.reward`): answers checked as reasoning models write them, chat-template
options, and the reasoning templates' own evals."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.config import DataConfig, EvalConfig, load_config
from learner.data import load_prompts
from learner.metrics import read_metrics
from learner.rewards import exact, last_line, load_reward, math
from opd.errors import ConfigError
from opd.templates import init_project

REASONING = "First, 6 boxes of 7 apples make 6 * 7 = 42 apples.\nThen none are sold, so 42 remain.\n"

MATH_TABLE = [
    # (completion, answer, reward)
    (REASONING + "\\boxed{42}", "42", 1.0),
    (REASONING + "The answer is $\\boxed{42}$.", "42", 1.0),
    (REASONING + "42", "42", 1.0),  # the number alone on the last line
    (REASONING + "So there are 42 apples left.", "42", 1.0),  # units after the number
    ("<think>\n40 + 2 = 42\n</think>\n\nThere are 42 apples.", "42", 1.0),  # a Qwen3 thinking trace
    (REASONING + "\\boxed{\\frac{84}{2}}", "42", 1.0),  # a fraction, equal by value
    (REASONING + "\\boxed{42.0}", "42", 1.0),
    ("Half of it: \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("In total 1,234 apples.", "1234", 1.0),
    ("Counting down gives \\boxed{-5}", "-5", 1.0),
    (REASONING + "\\boxed{41}", "42", 0.0),  # wrong
    (REASONING + "Wait, one was sold: 41", "42", 0.0),  # the last number is the answer, and it is wrong
    ("Counting down gives \\boxed{5}", "-5", 0.0),
    ("I cannot tell.", "42", 0.0),  # no number at all
    ("", "42", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "reward"), MATH_TABLE)
def test_math_reward_reads_the_final_answer_by_value(completion, answer, reward):
    assert math(completion, answer) == reward


def test_math_reward_off_the_main_thread():
    """math-verify's own timeout needs the main thread; an eval run from a thread must still score."""
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math, REASONING + "\\boxed{42}", "42").result() == 1.0
        assert pool.submit(math, REASONING + "\\boxed{41}", "42").result() == 0.0


def test_last_line_and_exact():
    assert last_line(REASONING + "42\n\n", "42") == 1.0
    assert last_line(REASONING + "42 apples", "42") == 0.0  # the whole last line must match
    assert last_line("", "42") == 0.0
    assert exact(" 42\n", "42") == 1.0
    assert exact(REASONING + "42", "42") == 0.0  # why reasoning templates need another reward


def right_answer(completion: str, answer: str) -> float:
    """A reward of the kind users write, loaded by `eval.reward: tests.test_rewards:right_answer`."""
    return 1.0 if completion.rstrip().endswith(answer) else 0.25


def test_a_reward_of_your_own_by_module_path(student_dir, tmp_path):
    assert EvalConfig(reward="tests.test_rewards:right_answer").reward == "tests.test_rewards:right_answer"
    reward = load_reward("tests.test_rewards:right_answer")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "how many?", "answer": "42"}) + "\n")
    (item,) = load_prompts(str(tmp_path / "eval.jsonl"), AutoTokenizer.from_pretrained(student_dir), DataConfig(),
                           reward)  # fmt: skip
    assert item.get_reward("so 42") == 1.0 and item.get_reward("41") == 0.25


def test_reward_names_are_checked_at_start():
    with pytest.raises(ValidationError, match="none of exact, last_line, math"):
        EvalConfig(reward="fuzzy")
    with pytest.raises(ConfigError, match=r"cannot import nope from tests\.test_rewards"):
        load_reward("tests.test_rewards:nope")
    with pytest.raises(ConfigError, match="cannot import score from no_such_module"):
        load_reward("no_such_module:score")
    with pytest.raises(ConfigError, match="is not a function"):
        load_reward("tests.test_rewards:REASONING")
    with pytest.raises(ConfigError, match=r"json:dumps cannot be called as fn\(completion, answer\)"):
        load_reward("json:dumps")  # (obj, *, ...): one positional argument


REWARDS_GIVEN: list[float] = []


def wrong_reward(completion: str, answer: str) -> float:
    """Right at the start's eval (step 0, two items with answers), wrong from the next one on."""
    if len(REWARDS_GIVEN) >= 2:
        raise KeyError("the user's bug")
    REWARDS_GIVEN.append(0.0)
    return 0.0


@pytest.mark.slow
def test_a_reward_that_fails_is_named_and_the_steps_checkpoint_is_kept(tmp_path):
    from learner.trainer import OnPolicyDistillationTrainer

    config = load_config("examples/tiny/config.yml", [
        "--run_dir", str(tmp_path / "run"), "--train.steps", "2", "--eval.eval_steps", "2", "--eval.max_items", "4",
        "--eval.reward", "tests.test_rewards:wrong_reward", "--checkpoint.save_steps", "0",
        "--services.engine", "torch", "--logging.progress", "false"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"the eval reward failed on a completion \(KeyError: \"the user's bug\"\)"):
        OnPolicyDistillationTrainer(config).train()
    assert len(REWARDS_GIVEN) == 2  # the eval at step 0 went through
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()  # the last step's, saved after the eval


THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
)
"""Qwen3's switch, cut down: enable_thinking false opens the answer with an empty think block."""


def test_chat_template_kwargs_reach_the_template(student_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.chat_template = THINKING_TEMPLATE
    rows = [{"prompt": "what is 2 + 2?"}, {"messages": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = str(tmp_path / "train.jsonl")
    default = load_prompts(path, tokenizer, DataConfig())
    thinking = load_prompts(path, tokenizer, DataConfig(chat_template_kwargs={"enable_thinking": True}))
    direct = load_prompts(path, tokenizer, DataConfig(chat_template_kwargs={"enable_thinking": False}))
    assert [i.prompt_ids for i in thinking] == [i.prompt_ids for i in default]
    for plain, skipped in zip(default, direct, strict=True):  # both row kinds, prompt and messages
        assert tokenizer.decode(skipped.prompt_ids) == tokenizer.decode(plain.prompt_ids) + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("template", ["distill-reasoning", "distill-reasoning-qwen3"])
def test_reasoning_templates_reward_the_right_final_number(template, student_dir, tmp_path):
    """Each reasoning template's own eval set and eval.reward: a reasoning-style completion that
    ends with the right number scores 1.0, one that ends with a wrong number 0.0."""
    init_project(tmp_path / "proj", template)
    config = load_config(tmp_path / "proj" / "config.yml")
    assert config.eval.reward == "math"
    tokenizer = AutoTokenizer.from_pretrained(student_dir)  # the Qwen tokenizers are not downloadable here
    items = load_prompts(config.data.eval_path, tokenizer, config.data, load_reward(config.eval.reward))
    assert len(items) == 16
    train = load_prompts(config.data.train_path, tokenizer, config.data)
    assert all(int(item.answer) > 0 for item in [*items, *train])  # no shop sells apples it does not have
    for item in items:
        prompt = tokenizer.decode(item.prompt_ids)
        boxed = "\\boxed{}" in prompt
        right = int(item.answer)
        ending = f"\\boxed{{{right}}}" if boxed else str(right)
        wrong = ending.replace(str(right), str(right + 1))
        trace = f"<think>\nThe shop starts with more apples than it sells.\n</think>\nSo {right + 3} - 3 is:\n"
        assert item.get_reward(trace + ending) == 1.0, (prompt, trace + ending)
        assert item.get_reward(trace + wrong) == 0.0


@pytest.mark.slow
def test_opd_run_with_the_math_reward(tmp_path, toy_models):
    """`opd run` with eval.reward math on the toy task, its references rewritten in another form
    ("01234679" as "1234679.0"): the run's greedy eval credits exactly the lists the student sorts,
    which an exact match of the text would score 0."""
    files = toy_models
    rows = [json.loads(line) for line in files.eval_jsonl.read_text().splitlines()]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({**r, "answer": f"{int(r['answer'])}.0"}) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    args = ["--student.path", str(files.student), "--teacher.path", str(files.teacher),
            "--data.train_path", str(files.train_jsonl), "--data.eval_path", str(eval_path),
            "--run_dir", str(run_dir), "--train.steps", "1", "--eval.eval_steps", "1", "--eval.reward", "math",
            "--logging.progress", "false"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "opd.cli", "run", "examples/toy/config.yml", *args],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    from examples.toy.evaluate import greedy_rewards
    from examples.toy.task import eval_problems, to_items

    tokenizer = AutoTokenizer.from_pretrained(files.student)
    items = to_items(eval_problems(len(rows)), tokenizer)
    sorted_right = greedy_rewards(AutoModelForCausalLM.from_pretrained(files.student), tokenizer, items)
    first_eval = next(m for m in read_metrics(run_dir / "metrics.jsonl") if "eval/reward" in m)
    assert sum(sorted_right) / len(items) >= 0.05
    assert first_eval["eval/reward"] == pytest.approx(sum(sorted_right) / len(items), abs=0.02)
