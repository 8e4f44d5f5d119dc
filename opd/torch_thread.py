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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

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
