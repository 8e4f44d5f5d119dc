"""Shared fixtures: tiny models built once per session, real servers on loopback.

OPD_CACHE points at a session temp dir so the tests build their own tiny models (the same
recipe the demo uses) and child server processes inherit it.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from opd.launch import LocalServer, local_servers
from opd.tiny import ensure_tiny_model


@pytest.fixture(scope="session", autouse=True)
def opd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("opd-cache")
    os.environ["OPD_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def student_dir(opd_cache: Path) -> Path:
    return ensure_tiny_model("student")


@pytest.fixture(scope="session")
def teacher_dir(opd_cache: Path) -> Path:
    return ensure_tiny_model("teacher")


@pytest.fixture(scope="session")
def servers(
    student_dir: Path, teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A torch sampler (student) and grader (teacher), shared by the service tests."""
    logs = tmp_path_factory.mktemp("server-logs")
    with local_servers(
        [
            LocalServer("sampler", ["--model", str(student_dir), "--engine", "torch"], logs),
            LocalServer("grader", ["--model", str(teacher_dir), "--engine", "torch"], logs),
        ]
    ) as (sampler_url, grader_url):
        yield sampler_url, grader_url


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory):
    """The toy task's SFT teacher and student and prompt files, built once (~40 s) for the session."""
    from examples.toy.prepare import prepare

    return prepare(tmp_path_factory.mktemp("toy"))
