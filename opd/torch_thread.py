"""One OS thread per process for torch work: the servers' engines run every torch call on it.

PyTorch's CPU kernels run in OpenMP thread teams, and GNU OpenMP gives each OS thread that enters
a parallel region a team of its own. Once a process holds more OpenMP threads than cores (a model
loaded on the main thread, then run from an executor thread, on 2 cores), libgomp's idle threads
spin only briefly before they sleep, and every later parallel region pays to wake them: the toy
sampler's 128 x 10-token generation took 49 ms instead of 29-32 ms after a single call from a
second thread, and stayed there. So a server loads its model and runs every torch call (decode,
score, weight checks and copies) on this one thread, never on the event loop's or asyncio's
default executor; the event loop stays free meanwhile. Harmless on a GPU, where the kernels are
not OpenMP's.
"""

import asyncio
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

from opd.errors import ConfigError
from opd.host_memory import keep_freed_host_memory

P = ParamSpec("P")
T = TypeVar("T")

_NAME = "opd-torch"
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_NAME)


def _on_it() -> bool:
    return threading.current_thread().name.startswith(_NAME)


def call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `fn` on the torch thread and wait (from synchronous code: an engine's constructor)."""
    if _on_it():  # called from torch-thread work itself: waiting on the queue would deadlock
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `fn` on the torch thread without blocking the event loop; calls queue in order."""
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))


def checked_device(device: str, what: str) -> torch.device:
    """`device` as a torch device this machine has; else a ConfigError naming `what` (the config
    key or flag that gave it)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"{what} {device!r} is not a torch device: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} is {device}, but this torch ({torch.__version__}) sees no CUDA device")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} is {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def use_device(device: torch.device) -> None:
    """Set the process up for torch work on `device` from this thread.

    CUDA: make `device` the torch thread's current device. The current device is per OS thread
    and starts at GPU 0: a process working on GPU N from this thread (a server started with
    `--device cuda:N`, a data-parallel learner's pipelined update) would otherwise open a context
    on GPU 0, and any call that takes the current device instead of a tensor's would run there. A
    bare "cuda" names the current device: nothing to set.

    CPU: the process keeps the host memory it frees for its next request (`opd/host_memory.py`)."""
    keep_freed_host_memory(device)
    if device.type == "cuda" and device.index is not None:
        call(torch.cuda.set_device, device)


SMALL_WORK_BYTES = 16 * 2**20
"""Below this many bytes, memory-bound work (a weight push's checks and copies) runs on one thread."""


@contextmanager
def alone_if_small(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Run the enclosed CPU kernels on the calling thread alone when `tensors`, the work's data,
    hold fewer than SMALL_WORK_BYTES (the setting is process-wide: for a server, whose torch calls
    all come from this module's one thread). A server idles between requests, and its OpenMP
    workers go to sleep; each parallel region then waits for a worker to wake before it can end.
    On this project's 2-vCPU VM that wait was ~5 ms per region, every region, for a while after an
    idle spell (likely the hypervisor descheduling a spinning vCPU; not seen with
    OMP_WAIT_POLICY=PASSIVE), so the toy's 1.4 MB push took 9.8 ms checked and copied on two
    threads and 1.3 ms on one (a plain script; 9.6 and 5.7 ms through a real sampler's HTTP,
    bench/push_check.py). Splitting a few MB over threads saves at most a millisecond anywhere;
    larger pushes keep every thread."""
    # set_num_threads is process-wide and rebuilds torch's thread pools: only where it changes something
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if nbytes >= SMALL_WORK_BYTES or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the enclosed work with `threads` CPU threads per torch call, on the calling thread and on
    the torch thread alike (torch reads the setting per OS thread once that thread has computed),
    and give each back its own setting after; None leaves both as they are."""
    if threads is None:
        yield
        return
    here, there = torch.get_num_threads(), call(torch.get_num_threads)
    torch.set_num_threads(threads)
    call(torch.set_num_threads, threads)
    try:
        yield
    finally:
        torch.set_num_threads(here)
        call(torch.set_num_threads, there)
