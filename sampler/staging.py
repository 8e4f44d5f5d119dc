"""An anonymous in-memory file that another process of this host opens through /proc.

Two hand-offs use it. The vLLM sampler gives a pushed body to vLLM's worker process this way:
vLLM serialises `collective_rpc` arguments through its engine-core process, and a 1 GB body took
6-8 s that way on this project's 2-vCPU machine, against 2.0-2.3 s for the whole push with the
body staged here (BENCHMARKS.md). And a learner gives its weights to samplers it started itself
this way (`services.weight_transport: auto`): one copy into memory and a path posted, no body
through HTTP. The file is made by `memfd_create`: the kernel frees it when its last holder closes
it or dies, so a killed process leaves nothing behind, and it needs no room in /dev/shm (64 MB in
a default Docker container). `stage` returns None where it cannot be made (not Linux, no
memory); callers then send the bytes the way they did before.
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class StagedBody:
    fd: int

    @property
    def path(self) -> str:
        """A name another process of this user on this host can open while the body is staged."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        """Let go of the body (the kernel frees it once every reader has too)."""
        os.close(self.fd)


def stage(*parts: bytes | bytearray | memoryview) -> StagedBody | None:
    """`parts`, in order, copied once into a new anonymous in-memory file; None where that fails."""
    try:
        fd = os.memfd_create("opd-push", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return None
    try:
        for part in parts:
            _write_all(fd, memoryview(part).cast("B"))
    except OSError:
        os.close(fd)
        return None
    return StagedBody(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:  # one write() moves at most ~2 GB on Linux
        data = data[os.write(fd, data) :]
