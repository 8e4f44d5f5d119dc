"""`opd grade`: score prompt/completion pairs with the teacher (and the student), from a JSONL file.

    opd grade --grader URL --in pairs.jsonl --out scored.jsonl [--sampler URL] [--html report.html]
              [--batch-size 16] [--request-timeout-s 300] [--retry-deadline-s 120]

Each input line is `{"prompt": text}` or `{"messages": [{role, content}, ...]}` plus
`{"completion": text}` (ids work too: `prompt_ids`, `completion_ids`). Each output line, in input
order, holds the line number, the ids the grader tokenised to, each completion token as text,
`teacher_logprobs` and their mean; with `--sampler`, also `student_logprobs` of the same tokens
(the sampler scores the grader's ids, so nothing is re-tokenised) and `reverse_kl`, the per-token
estimate log p_student - log p_teacher, with its mean: where the student and the teacher disagree.
A bad line (not JSON, missing fields, too long for the model) is reported on stderr with its
number and left out; the rest are still scored. `--html` writes a page that colours each token by
the teacher's logprob, or with `--sampler` by the student-teacher gap.
"""

import html
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from grader.schema import ScoredSequence, Sequence
from learner.data import warn_of_unread_keys
from opd import jsonl
from opd.client import GraderClient, SamplerClient
from opd.errors import ConfigError, ServiceError
from opd.tokenizer import check_same_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patience:
    """How long to wait for the servers: per request, and retrying an unreachable server or a 5xx
    (the defaults of `opd run`'s `services.request_timeout_s` and `services.retry_deadline_s`)."""

    request_timeout_s: float = 300.0
    retry_deadline_s: float = 120.0

    def grader(self, url: str) -> GraderClient:
        return GraderClient(url, timeout_s=self.request_timeout_s, retry_deadline_s=self.retry_deadline_s)

    def sampler(self, url: str) -> SamplerClient:
        return SamplerClient(url, timeout_s=self.request_timeout_s, retry_deadline_s=self.retry_deadline_s)


@dataclass(frozen=True)
class Row:
    line: int
    sequence: Sequence


READ_KEYS = ("prompt", "prompt_ids", "messages", "completion", "completion_ids")
"""What an input line may say; other keys (an id, a source) are left alone, and named in a warning."""


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """The good rows and, for every bad one, a message naming its line (and the field at fault)."""
    rows, problems = [], []
    seen: list[tuple[str, object]] = []
    for number, text in enumerate(jsonl.lines(jsonl.read_text(path)), start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("a line must be a JSON object")
            seen.append((f"line {number}", data))
            rows.append(Row(number, Sequence.model_validate({k: v for k, v in data.items() if k in READ_KEYS})))
        except ValidationError as exc:
            problems.append(f"{path}:{number}: {'; '.join(_field_error(error) for error in exc.errors())}")
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc}")
    warn_of_unread_keys(seen, str(path), READ_KEYS)
    return rows, problems


def _field_error(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def check_writable(*paths: Path | None) -> None:
    """Each output's folder made and writable, and the output not a directory: a run that scored
    for an hour must not fail at the end for want of a place to write."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise ConfigError(f"{path} is a directory: name the file to write")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the folder of {path}: {exc}") from exc
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"cannot write {path}: permission denied")


def score(
    client: GraderClient | SamplerClient, rows: list[Row], batch_size: int, problems: list[str], what: str
) -> Iterator[tuple[Row, ScoredSequence]]:
    """Score in batches; a batch the server refuses (4xx) is scored row by row, so one bad row is
    reported and the others still scored."""
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        try:
            reply = client.logprobs([row.sequence for row in batch], return_tokens=True)
        except ServiceError as exc:
            if exc.status is None or exc.status >= 500:  # the server is down or broken: stop
                raise
            if len(batch) == 1:
                problems.append(f"line {batch[0].line}: the {what} refused it: {exc}")
            else:
                yield from score(client, batch, 1, problems, what)
            continue
        yield from zip(batch, reply.results, strict=True)


def scored_row(row: Row, teacher: ScoredSequence, student: ScoredSequence | None) -> dict:
    out = {"line": row.line, "prompt_ids": teacher.prompt_ids, "completion_ids": teacher.completion_ids,
           "tokens": teacher.tokens, "teacher_logprobs": teacher.logprobs,
           "teacher_mean": sum(teacher.logprobs) / len(teacher.logprobs)}  # fmt: skip
    if student is not None:
        gaps = [s - t for s, t in zip(student.logprobs, teacher.logprobs, strict=True)]
        out |= {"student_logprobs": student.logprobs, "reverse_kl": gaps, "reverse_kl_mean": sum(gaps) / len(gaps)}
    return out


def grade(
    grader_url: str, source: Path, out: Path, *, sampler_url: str | None = None, html_out: Path | None = None,
    batch_size: int = 16, patience: Patience = Patience(),
) -> tuple[int, list[str]]:  # fmt: skip
    """Write one scored line per good input line; returns (lines written, problems). Outputs that
    cannot be written and a student whose tokenizer is not the teacher's fail before any scoring."""
    check_writable(out, html_out)
    if sampler_url is not None:
        check_same_tokenizers(grader_url, sampler_url, patience)
    rows, problems = read_rows(source)
    results: list[dict] = []
    with patience.grader(grader_url) as grader, tqdm(total=len(rows), desc="opd grade", unit="row") as bar:
        for row, teacher in score(grader, rows, batch_size, problems, "grader"):
            results.append(scored_row(row, teacher, None))
            bar.update(1)
    if sampler_url is not None:
        results = with_student(patience.sampler(sampler_url), results, batch_size, problems)
    results = sorted(results, key=lambda r: r["line"])
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    if html_out is not None:
        html_out.write_text(report_html(results, source))
    return len(results), problems


def check_same_tokenizers(grader_url: str, sampler_url: str, patience: Patience) -> None:
    """The student scores the ids the teacher's tokenizer gave: the same ids must mean the same
    tokens to both, as `opd run` checks at start."""
    with patience.grader(grader_url) as grader, patience.sampler(sampler_url) as sampler:
        teacher, student = grader.info(), sampler.info()
    check_same_tokenizer(f"sampler ({student.model})", (student.vocab_size, student.tokenizer_hash),
                         f"grader ({teacher.model})", (teacher.vocab_size, teacher.tokenizer_hash))  # fmt: skip


def with_student(sampler: SamplerClient, results: list[dict], batch_size: int, problems: list[str]) -> list[dict]:
    """The student's logprobs of exactly the tokens the teacher scored (ids, not text)."""
    by_line = {r["line"]: r for r in results}
    rows = [Row(r["line"], Sequence(prompt_ids=r["prompt_ids"], completion_ids=r["completion_ids"])) for r in results]
    out = []
    with sampler:
        for row, student in score(sampler, rows, batch_size, problems, "sampler"):
            teacher = by_line[row.line]
            out.append(teacher | scored_row(row, _teacher_view(teacher), student))
    return out


def _teacher_view(row: dict) -> ScoredSequence:
    return ScoredSequence(logprobs=row["teacher_logprobs"], prompt_ids=row["prompt_ids"],
                          completion_ids=row["completion_ids"], tokens=row["tokens"])  # fmt: skip


def _colour(value: float, gap: bool) -> str:
    """Teacher logprob 0 -> green, -8 and below -> red; a gap (student - teacher) 0 -> white,
    +4 and above -> red (the student sure where the teacher is not), -4 -> blue."""
    if gap:
        strength = min(abs(value) / 4.0, 1.0)
        return f"rgba(220, 40, 40, {strength:.2f})" if value > 0 else f"rgba(40, 90, 220, {strength:.2f})"
    hue = 120 * max(0.0, 1.0 + value / 8.0)
    return f"hsl({hue:.0f}, 75%, 75%)"


def report_html(results: list[dict], source: Path) -> str:
    gap = bool(results) and "reverse_kl" in results[0]
    legend = ("colour: student logprob - teacher logprob (red: the student is surer than the teacher)" if gap
              else "colour: teacher logprob (green: likely, red: unlikely to the teacher)")  # fmt: skip
    blocks = []
    for r in results:
        values = r["reverse_kl"] if gap else r["teacher_logprobs"]
        spans = "".join(
            f'<span style="background:{_colour(v, gap)}" title="teacher {t:.3f}'
            + (f" / student {s:.3f}" if gap else "") + f'">{html.escape(token)}</span>'
            for token, v, t, s in zip(r["tokens"], values, r["teacher_logprobs"],
                                      r.get("student_logprobs", r["teacher_logprobs"]), strict=True)
        )  # fmt: skip
        mean = f"reverse KL {r['reverse_kl_mean']:.3f}" if gap else f"mean teacher logprob {r['teacher_mean']:.3f}"
        blocks.append(f'<div class="row"><div class="meta">line {r["line"]} &middot; {mean}</div>'
                      f'<div class="completion">{spans}</div></div>')  # fmt: skip
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>opd grade: {html.escape(source.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} .row{{margin:1em 0;padding:.5em;border:1px solid #ddd}}
.meta{{color:#555;font-size:.9em}} .completion{{font-family:monospace;white-space:pre-wrap;line-height:1.8}}
.completion span{{padding:1px 0}}</style></head>
<body><h1>opd grade: {html.escape(source.name)}</h1><p>{legend}; hover a token for its logprobs.</p>
{"".join(blocks)}
</body></html>
"""


def main(
    grader: str, source: str, out: str, sampler: str | None, html_out: str | None, batch_size: int, patience: Patience
) -> None:
    written, problems = grade(grader, Path(source), Path(out), sampler_url=sampler,
                              html_out=Path(html_out) if html_out else None, batch_size=batch_size,
                              patience=patience)  # fmt: skip
    for problem in problems:
        print(f"opd grade: skipped {problem}", file=sys.stderr)
    print(f"wrote {written} scored rows to {out}" + (f" and {html_out}" if html_out else ""))
