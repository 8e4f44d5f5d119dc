"""Processes that compute on the CPU keep the memory they free, instead of handing it back to the
OS after every request and faulting it in again on the next.

glibc's malloc serves allocations above its mmap threshold (128 KB at first, raised up to 32 MB
as such blocks are freed) with fresh mappings, and gives the top of the heap back when more than
its trim threshold (twice the mmap threshold) lies free there. A server's request allocates its
activations and frees them all when it ends, so the next request touches the same amount of new
pages again. Each first touch is a page fault, and on this project's 2-vCPU VM a fault costs
microseconds. The toy's teacher forward and student update in two processes taking turns
(`bench/host_memory.py`, 60 turns): the forward's process faulted ~6,500 pages (25 MB) per turn
and took 76.6 ms, against 67.6 ms with both phases in one process and 69.4 ms with
`keep_freed_host_memory` in each, neither faulting. opd's three processes take turns like that
every step. GPU processes' activations live on the GPU: this changes only how CPU processes use
the host.
"""

import ctypes
import logging

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt's parameters (malloc.h)."""
MMAP_THRESHOLD_BYTES = 32 * 2**20
"""The largest mmap threshold glibc accepts on 64-bit: smaller allocations come from the heap."""
TRIM_THRESHOLD_BYTES = 2**30
"""Up to this much free memory stays at the top of the heap (a CUDA caching allocator holds its
peak the same way)."""


def keep_freed_host_memory(device: torch.device) -> bool:
    """On a CPU device, set this process's malloc to keep freed memory (glibc; elsewhere nothing
    changes). True if it was set."""
    if device.type != "cpu":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # None: not glibc's C library (macOS)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        logger.debug("malloc does not take mallopt's thresholds; freed host memory goes back to the OS")
    return done
