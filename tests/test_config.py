"""Config loading: YAML + dotted CLI overrides, errors that name the key."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from learner.config import MEMORY_PUSH_MIN_BYTES, DataConfig, OpdConfig, apply_overrides, load_config
from learner.data import load_prompts
from learner.trainer import OnPolicyDistillationTrainer
from opd.errors import ConfigError

MINIMAL = "student: {path: tiny:student}\nteacher: {path: tiny:teacher}\ndata: {train_path: train.jsonl}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def test_defaults_follow_the_reference_method(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    t = config.train
    assert (t.lr, t.clip_eps, t.kl_coef, t.discount, t.max_grad_norm, t.ppo_steps) == (1e-5, 0.2, 1.0, 0.0, 1.0, 1)
    assert config.data.train_path == str(tmp_path / "train.jsonl")  # relative to the config file
    assert config.services.sampler_url is None


def test_overrides_in_both_spellings_are_typed(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL), ["--train.lr", "3e-4", "--sampling.n=8", "--logging.progress", "false"]
    )
    assert config.train.lr == 3e-4
    assert config.sampling.n == 8
    assert config.logging.progress is False


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        (MINIMAL + "train: {lrr: 1}\n", [], "train.lrr"),
        (MINIMAL, ["--train.clip_eps", "1.5"], "train.clip_eps"),
        (MINIMAL, ["--sampling.n", "0"], "sampling.n"),
        (MINIMAL, ["--sampling.n", "65"], "sampling.n"),  # the sampler's limits, known before it starts
        (MINIMAL, ["--eval.n", "65"], "eval.n"),
        (MINIMAL, ["--sampling.temperature", "2.5"], "sampling.temperature"),
        (MINIMAL + "student: {path: tiny:teacher}\n", [], "duplicate key 'student'"),
        ("student: {path: x}\n", [], "teacher"),
        (MINIMAL + "services: {sampler_url: 'http://x'}\n", [], "grader_url"),
        (MINIMAL, ["--train.lr"], "--train.lr needs a value"),
        ("[1, 2]", [], "must be a YAML mapping"),
        (MINIMAL, ["--student.path", "/no/such/model"], "student.path"),
        (MINIMAL, ["--services.weight_transport", "path"], "needs shared_dir"),
        (
            MINIMAL,
            ["--data.chat_template_kwargs", "{tokenize: false, enable_thinking: true}"],
            "data.chat_template_kwargs: Value error, tokenize cannot be set here",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(write(tmp_path, text), overrides)
    assert needle in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yml")


def test_apply_overrides_refuses_descending_into_a_value():
    with pytest.raises(ConfigError, match="lr is not a section"):
        apply_overrides({"train": {"lr": 1}}, ["--train.lr.x", "2"])


def test_a_value_for_a_text_key_is_the_text_as_typed(tmp_path):
    config = write(tmp_path, "student: {path: s}\nteacher: {path: t}\n")
    cases = {"runs/exp #2": "runs/exp #2", "2024": "2024", "a\nb": "a\nb", "[x": "[x", "@foo": "@foo", "'007'": "007"}
    for typed, meant in cases.items():
        assert load_config(config, ["--run_dir", typed, "--student.path", typed]).run_dir == meant
    loaded = load_config(config, ["--services.sampler_urls", "[http://a:1, http://b:2]", "--services.grader_url",
                                  "http://c:3", "--services.api_key_file", "null", "--train.steps", "7"])  # fmt: skip
    assert (loaded.services.sampler_urls, loaded.services.api_key_file, loaded.train.steps) == (
        ["http://a:1", "http://b:2"], None, 7)  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.lr: Input should be a valid number"):  # not a YAML traceback
        load_config(config, ["--train.lr", "[x"])


def test_every_field_is_documented():
    def walk(model: type) -> list[str]:
        undocumented = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, OpdConfig.__base__):
                undocumented += walk(annotation)
            elif not field.description:
                undocumented.append(f"{model.__name__}.{name}")
        return undocumented

    assert walk(OpdConfig) == []


def test_hub_ids_are_not_mistaken_for_missing_local_paths(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["--student.path", "Qwen/Qwen2.5-0.5B-Instruct"])
    assert config.student.path == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ConfigError, match=r"student\.path"):
        load_config(write(tmp_path, MINIMAL), ["--student.path", "./no/such/dir"])


RUNNING = ["--services.sampler_url", "http://localhost:8000", "--services.grader_url", "http://localhost:8001"]


@pytest.mark.parametrize(
    ("overrides", "nbytes", "engine", "transport"),
    [
        ([], MEMORY_PUSH_MIN_BYTES, "vllm", "memory"),  # the samplers it starts itself are on its host
        ([], MEMORY_PUSH_MIN_BYTES - 1, "vllm", "http"),  # a small push crosses loopback faster than it is staged
        ([], 1, "torch", "shared"),  # a torch sampler copies out of the learner's buffer at any size
        ([], 2**30, "torch", "shared"),
        (RUNNING, 2**30, "torch", "http"),
        (["--services.weight_transport", "http"], 2**30, "torch", "http"),
        (["--services.weight_transport", "memory", *RUNNING], 1, "vllm", "memory"),
        (["--services.weight_transport", "shared", *RUNNING], 1, "vllm", "shared"),
        (["--services.weight_transport", "path", "--services.shared_dir", "/shared"], 1, "torch", "path"),
    ],
)
def test_weight_transport_auto_settles_by_where_the_samplers_are_and_their_engine(
    tmp_path, overrides, nbytes, engine, transport
):
    assert load_config(write(tmp_path, MINIMAL), overrides).services.push_transport(nbytes, engine) == transport


@pytest.mark.parametrize(("device", "needle"), [("nonsense", "is not a torch device"), ("cuda", "sees no CUDA")])
def test_a_device_this_torch_cannot_use_is_refused_at_start(tmp_path, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ConfigError, match=needle):
        OnPolicyDistillationTrainer(student="tiny:student", teacher="tiny:teacher", train_dataset=[{"prompt": "x"}],
                                    run_dir=str(tmp_path), train={"device": device})  # fmt: skip


def test_resume_under_fsdp_is_refused_before_anything_starts(tmp_path):
    # A checkpoint of an FSDP run holds the optimizer moments of the main process's shards only.
    with pytest.raises(ConfigError, match=r"resuming under train\.fsdp"):
        OnPolicyDistillationTrainer(student="tiny:student", teacher="tiny:teacher", run_dir=str(tmp_path),
                                    train={"use_accelerate": True, "fsdp": True}, resume_from=tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"messages": "hi"}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0]: role: Input should be"),
        ('{"messages": [{"role": "user"}]}', "messages[0]: content: Field required"),
        ('{"prompt": 5}', "'prompt' must be text"),
        ('{"prompt": "\\ud800"}', "'prompt' must be text (valid Unicode)"),
        ('{"prompt": "hi", "answer": [1]}', "'answer' must be a string or number"),
    ],
)
def test_a_bad_data_line_is_refused_naming_its_line(tmp_path, student_dir, line, needle):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_prompts(str(path), AutoTokenizer.from_pretrained(student_dir), DataConfig())
    assert f"{path}:2: " in str(info.value) and needle in str(info.value)


def test_jsonl_lines_end_at_newlines_only_and_the_text_must_be_utf8(tmp_path, student_dir):
    # U+2028, U+2029 and U+0085 are legal raw inside a JSON string; str.splitlines cut lines there
    path = tmp_path / "train.jsonl"
    prompts = ["a\u2028b", "c\u2029d", "e\x85f"]
    rows = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\r\n" for p in prompts)
    path.write_bytes(b"\xef\xbb\xbf" + rows.encode())  # a BOM and CRLF, as Windows writes
    items = load_prompts(str(path), AutoTokenizer.from_pretrained(student_dir), DataConfig())
    assert len(items) == 3
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ConfigError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9"):
        load_prompts(str(path), AutoTokenizer.from_pretrained(student_dir), DataConfig())


def test_keys_opd_does_not_read_are_named_once(tmp_path, student_dir, caplog):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "answr": "2", "id": 1}\n{"prompt": "b", "answr": "3"}\n')
    items = load_prompts(str(path), AutoTokenizer.from_pretrained(student_dir), DataConfig())
    assert [item.answer for item in items] == [None, None]
    (warning,) = [r.getMessage() for r in caplog.records if "keys opd does not read" in r.getMessage()]
    assert f"'answr' (first at {path}:1), 'id' (first at {path}:1)" in warning
