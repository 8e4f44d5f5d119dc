"""Directories that appear whole or not at all."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def directory_written_aside(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside `target`, renamed to `target` when the block finishes.

    A crash or an exception in the block leaves `target` as it was, so a later run never loads a
    half-written model or checkpoint. An existing `target` is replaced, or with `keep_existing`
    kept and the new copy dropped: a concurrent builder of the same thing got there first and
    may be reading it already.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield aside
        if target.exists():
            if keep_existing:
                return
            shutil.rmtree(target)
        try:
            os.replace(aside, target)
        except OSError:  # lost a race with a concurrent builder: theirs is as good as ours
            if not (keep_existing and target.exists()):
                raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
