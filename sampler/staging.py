"""An anonymous in-memory file that another process of this host opens through /proc.

Two hand-offs use it. The vLLM sampler gives a pushed body to vLLM's worker process this way:
vLLM serialises `collective_rpc` arguments through its engine-core process, and a 1 GB body took
5.9-8.6 s that way on this project's 2-vCPU machine, against 1.9-2.6 s for the whole push with
the body staged here (BENCHMARKS.md). And a learner gives its weights to samplers it started itself
this way (`services.weight_transport: auto`): one copy into memory and a path posted, no body
through HTTP. The file is made by `memfd_create`: the kernel frees it when its last holder closes
it or dies, so a killed process leaves nothing behind, and it needs no room in /dev/shm (64 MB in
a default Docker container). `stage` returns None where it cannot be made (not Linux, or the
write is refused); callers then send the bytes the way they did before.
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcFile:
    """A file this process holds open, under a name through /proc."""

    fd: int

    @property
    def path(self) -> str:
        """A name another process of this user on this host can open while the file is held."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        """Let go of the file (an anonymous one is freed once every reader has too)."""
        os.close(self.fd)


def memfd_available() -> bool:
    return hasattr(os, "memfd_create")


def stage(*parts: bytes | bytearray | memoryview) -> ProcFile | None:
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
    except BaseException:  # interrupted: the file goes with the error, not left open
        os.close(fd)
        raise
    return ProcFile(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:  # one write() moves at most ~2 GB on Linux
        data = data[os.write(fd, data) :]
