"""The grader as a tool people query: text in, tokens out, the Python clients and `opd grade`.

Real servers on loopback (the shared torch sampler and grader); tests/test_vllm.py checks text
against ids on the vLLM grader too. The HTML report is rendered by a real headless Chromium.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from opd.client import GraderClient, SamplerClient
from opd.errors import ConfigError, GraderError, TokenizerMismatchError
from opd.grade import grade
from opd.launch import local_server
from opd.tokenizer import chat_prompt_ids
from tests import reference
from tests.test_cli import _teacher_with_other_tokenizer

CHAT = [{"role": "user", "content": "what is 2 + 3?"}]


def text_and_ids(url: str, tokenizer) -> tuple[dict, dict]:
    """The same sequences asked as text and as the ids the caller tokenised itself."""
    prompt_ids = tokenizer("sort the list 3 1 2", add_special_tokens=False)["input_ids"]
    chat_ids = chat_prompt_ids(tokenizer, CHAT)
    completion_ids = tokenizer(" 1 2 3 and five", add_special_tokens=False)["input_ids"]
    as_text = [{"prompt": "sort the list 3 1 2", "completion": " 1 2 3 and five"},
               {"messages": CHAT, "completion": " 1 2 3 and five"}]  # fmt: skip
    as_ids = [{"prompt_ids": prompt_ids, "completion_ids": completion_ids},
              {"prompt_ids": chat_ids, "completion_ids": completion_ids}]  # fmt: skip
    body = {"top_k": 3, "return_tokens": True}
    text = httpx.post(f"{url}/v1/logprobs", json={"sequences": as_text, **body}, timeout=60)
    ids = httpx.post(f"{url}/v1/logprobs", json={"sequences": as_ids, **body}, timeout=60)
    assert text.status_code == ids.status_code == 200, (text.text, ids.text)
    return text.json(), ids.json() | {"asked": as_ids}


def check_text_equals_ids(url: str, tokenizer) -> None:
    text, ids = text_and_ids(url, tokenizer)
    for by_text, by_ids, asked in zip(text["results"], ids["results"], ids["asked"], strict=True):
        assert by_text["logprobs"] == by_ids["logprobs"]
        assert (by_text["prompt_ids"], by_text["completion_ids"]) == (asked["prompt_ids"], asked["completion_ids"])
        assert by_text["tokens"] == [tokenizer.decode([i]) for i in asked["completion_ids"]]
        assert "".join(by_text["tokens"]) == " 1 2 3 and five"
        # ids past the 456-token tokenizer (padded vocabulary rows) show as a marker, not as ''
        want = [
            [tokenizer.decode([i]) if i < len(tokenizer) else f"<|id:{i}|>" for i in row] for row in by_text["top_ids"]
        ]
        assert by_text["top_tokens"] == want


def test_text_and_ids_give_the_same_logprobs(servers, teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    check_text_equals_ids(servers[1], tokenizer)
    # and they are the teacher's: a plain forward over the same ids
    text, _ = text_and_ids(servers[1], tokenizer)
    first = text["results"][0]
    want = reference.token_logprobs(reference.load(teacher_dir), first["prompt_ids"], first["completion_ids"])
    assert first["logprobs"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    "sequence",
    [
        {"prompt": "hi", "prompt_ids": [1], "completion": "x"},
        {"prompt": "hi", "messages": CHAT, "completion": "x"},
        {"prompt": "hi"},
        {"prompt": "hi", "completion": "x", "completion_ids": [5]},
    ],
)
def test_exactly_one_form_per_field(servers, sequence):
    response = httpx.post(f"{servers[1]}/v1/logprobs", json={"sequences": [sequence]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "sequences.0" and "exactly one of" in error["message"]


def test_python_clients_generate_and_score(servers, student_dir, teacher_dir):
    sampler_url, grader_url = servers
    with SamplerClient(sampler_url) as sampler, GraderClient(grader_url) as grader:
        reply = sampler.generate(messages=[CHAT], n=2, temperature=1.0, max_tokens=6, seed=5)
        completion = reply.results[0].completions[0].completion_ids
        scored = grader.logprobs([{"messages": CHAT, "completion_ids": completion}], return_tokens=True)
        student = sampler.logprobs([{"prompt_ids": reply.results[0].prompt_ids, "completion_ids": completion}])
        as_tensors = grader.logprobs_tensors(
            [{"prompt_ids": reply.results[0].prompt_ids, "completion_ids": completion}]
        )
        assert grader.info().model == str(teacher_dir)
        with pytest.raises(ValidationError):
            grader.logprobs([{"prompt": "hi"}])  # checked before sending: no completion
        with pytest.raises(GraderError, match=r"400.*out of the vocabulary"):
            grader.logprobs([{"prompt_ids": [1], "completion_ids": [100_000]}])  # 4xx at once, the server's message
    result = scored.results[0]
    assert result.prompt_ids == reply.results[0].prompt_ids and result.completion_ids == completion
    want = reference.token_logprobs(reference.load(teacher_dir), result.prompt_ids, completion)
    assert result.logprobs == pytest.approx(want, abs=1e-4)
    assert as_tensors.lengths_B.tolist() == [len(completion)] and as_tensors.logprobs_N.tolist() == result.logprobs
    # the sampler scores with its student: at temperature 1 the same numbers as its sampled logprobs
    assert student.results[0].logprobs == pytest.approx(reply.results[0].completions[0].logprobs, abs=1e-4)


PAIRS = [
    {"id": 7, "prompt": "what is 2 + 3?", "completion": "5"},  # a key opd grade does not read: named, left alone
    "not json at all",
    {"messages": CHAT, "completion": " it is five"},
    {"prompt": "no completion here", "completon": " misspelt"},
    {"prompt": "what is 1 + 1?", "completion": "2" * 5000},  # longer than the tiny models' context
    {"prompt": "sort 3 1 2", "completion": " 1 2 3"},
]


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if __import__("os").environ.get("CI"):
            raise RuntimeError("CI needs Debian's chromium (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


@pytest.mark.slow
def test_opd_grade_scores_good_rows_reports_bad_ones_and_renders_html(servers, tmp_path):
    sampler_url, grader_url = servers
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in PAIRS))
    out, page = tmp_path / "scored.jsonl", tmp_path / "pages" / "report.html"  # its folder is made
    result = subprocess.run([sys.executable, "-m", "opd.cli", "grade", "--grader", grader_url, "--sampler", sampler_url,
                             "--in", str(pairs), "--out", str(out), "--html", str(page), "--batch-size", "3"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 6]
    for line in (2, 4, 5):
        assert f":{line}:" in result.stderr or f"line {line}:" in result.stderr, result.stderr
    assert "keys opd does not read: 'id' (first at line 1), 'completon' (first at line 4)" in result.stderr
    for r in rows:
        assert len(r["tokens"]) == len(r["teacher_logprobs"]) == len(r["student_logprobs"]) == len(r["reverse_kl"])
        assert r["reverse_kl"] == pytest.approx([s - t for s, t in zip(r["student_logprobs"], r["teacher_logprobs"],
                                                                       strict=True)])  # fmt: skip
    assert "wrote 3 scored rows" in result.stdout

    shot = tmp_path / "report.png"
    headless = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    render = subprocess.run([chromium(), *headless, profile, "--window-size=900,700", f"--screenshot={shot}",
                             page.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 5_000, render.stderr[-2000:]
    from PIL import Image

    pixels = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20) or []
    colourful = [count for count, (r, g, b) in pixels if max(r, g, b) - min(r, g, b) > 60]
    assert sum(colourful) > 200, "the tokens should be drawn on coloured backgrounds"


@pytest.mark.slow
def test_opd_grade_refuses_a_student_of_another_tokenizer_and_a_directory_to_write_before_scoring(
    servers, teacher_dir, tmp_path
):
    sampler_url, grader_url = servers
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIRS[0]) + "\n")
    with pytest.raises(ConfigError, match="is a directory"):
        grade(grader_url, pairs, tmp_path, sampler_url=sampler_url)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot make the folder of"):
        grade(grader_url, pairs, tmp_path / "scored.jsonl", html_out=tmp_path / "a-file" / "report.html")
    other = _teacher_with_other_tokenizer(teacher_dir, tmp_path)
    other_grader = local_server("grader", ["--model", str(other), "--engine", "torch"], tmp_path / "logs")
    with other_grader as other_url, pytest.raises(TokenizerMismatchError, match="use different tokenizers"):
        grade(other_url, pairs, tmp_path / "scored.jsonl", sampler_url=sampler_url)
    assert not (tmp_path / "scored.jsonl").exists()


def readme_block(language: str, starts_with: str) -> str:
    """The README's code block in `language` whose first line starts with `starts_with`."""
    text = Path("README.md").read_text()
    for block in text.split(f"```{language}\n")[1:]:
        code = block.split("```")[0]
        if code.startswith(starts_with):
            return code
    raise AssertionError(f"no {language} block starting with {starts_with!r} in README.md")


def test_the_readmes_query_examples_run_as_written(servers):
    sampler_url, grader_url = servers
    curl = readme_block("bash", "curl -s localhost:8002/v1/logprobs").replace("localhost:8002", grader_url)
    result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    reply = json.loads(result.stdout)
    assert "".join(reply["results"][0]["tokens"]) == " it is five"
    assert len(reply["results"][0]["top_tokens"][0]) == 3

    code = readme_block("python", "from opd.client import")
    code = code.replace("http://localhost:8002", grader_url).replace("http://localhost:8001", sampler_url)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "".join(namespace["reply"].results[0].tokens) == " it is five"
    assert len(namespace["samples"].results[0].completions) == 2


def test_opd_grade_waits_as_long_as_it_is_told_for_a_silent_grader(tmp_path, capsys):
    """A grader that accepts connections and never answers (the kernel's backlog accepts them; the
    socket is never read): with --request-timeout-s 1 and --retry-deadline-s 0, `opd grade` stops
    after one second with one line naming the grader. At its defaults it would wait 300 s a try."""
    from opd.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIRS[0]) + "\n")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(SystemExit) as stopped:
            main(["grade", "--grader", url, "--in", str(pairs), "--out", str(tmp_path / "scored.jsonl"),
                  "--request-timeout-s", "1", "--retry-deadline-s", "0"])  # fmt: skip
        waited = time.monotonic() - started
    assert stopped.value.code == 1
    assert 1 <= waited < 30, waited
    err = capsys.readouterr().err
    assert f"grader at {url}/v1/logprobs" in err and "Traceback" not in err, err
    assert not (tmp_path / "scored.jsonl").exists()
