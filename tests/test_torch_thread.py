"""Every torch call of a server runs on one OS thread (opd/torch_thread.py says why)."""

import asyncio
import threading

import pytest
import torch

from opd import torch_thread


def test_sync_and_async_calls_share_one_thread_and_nested_calls_do_not_deadlock():
    from_sync = torch_thread.call(threading.current_thread)
    from_async = asyncio.run(torch_thread.run(threading.current_thread))
    nested = torch_thread.call(torch_thread.call, threading.current_thread)  # would wait on itself
    assert from_sync is from_async is nested
    assert from_sync is not threading.main_thread()


def test_small_work_runs_on_one_thread_and_the_thread_count_comes_back():
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_thread.alone_if_small([_bytes(torch_thread.SMALL_WORK_BYTES - 5), _bytes(4)]):
            inside = torch.get_num_threads()
        with pytest.raises(RuntimeError), torch_thread.alone_if_small([_bytes(1)]):
            raise RuntimeError("a refused push")
        after_error = torch.get_num_threads()
        with torch_thread.alone_if_small([_bytes(torch_thread.SMALL_WORK_BYTES - 4), _bytes(4)]):
            large = torch.get_num_threads()
    finally:
        torch.set_num_threads(original)
    assert (inside, after_error, large) == (1, 2, 2)


def _bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)
