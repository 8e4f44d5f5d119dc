"""Lint and types are part of the test command: ruff (format + lint) and mypy must be clean."""

import subprocess
import sys

PACKAGES = ["opd", "sampler", "grader", "learner", "examples"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_ruff_lint_and_format():
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_mypy():
    result = run("mypy", *PACKAGES, "--ignore-missing-imports")
    assert result.returncode == 0, result.stdout
