"""A body staged as an anonymous in-memory file (sampler/staging.py): another process reads it
whole through its path, it is gone once closed, and where staging fails the caller gets None
(and sends the bytes another way) with nothing left open."""

import errno
import hashlib
import os
import subprocess
import sys

from sampler import staging
from sampler.staging import stage

PAYLOAD = bytearray(os.urandom(3 << 20))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_another_process_reads_the_whole_body_until_it_is_closed():
    staged = stage(memoryview(PAYLOAD)[:1000], PAYLOAD[1000:])  # parts in order, as a Body's
    assert staged is not None
    read = [
        sys.executable,
        "-c",
        f"import hashlib; print(hashlib.sha256(open({staged.path!r}, 'rb').read()).hexdigest())",
    ]
    digest = subprocess.run(read, capture_output=True, text=True, check=True).stdout.strip()
    assert digest == hashlib.sha256(PAYLOAD).hexdigest()
    staged.close()
    assert not os.path.exists(staged.path)


def test_staging_that_fails_gives_none_and_leaves_nothing_open(monkeypatch):
    before = _open_fds()

    def full(fd, data):  # injected fault: no memory left for the copy
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(staging.os, "write", full)
    assert stage(PAYLOAD) is None
    assert _open_fds() == before
    monkeypatch.undo()

    def no_memfd(name, flags):  # injected fault: a kernel or OS without memfd_create
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(staging.os, "memfd_create", no_memfd)
    assert stage(PAYLOAD) is None
    assert _open_fds() == before
