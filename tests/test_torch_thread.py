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


def test_torch_threads_set_both_threads_and_give_each_its_own_back():
    original = torch.get_num_threads(), torch_thread.call(torch.get_num_threads)
    torch.set_num_threads(3)
    torch_thread.call(torch.set_num_threads, 2)
    try:
        with torch_thread.torch_threads(1):
            inside = torch.get_num_threads(), torch_thread.call(torch.get_num_threads)
        with torch_thread.torch_threads(None):
            untouched = torch.get_num_threads(), torch_thread.call(torch.get_num_threads)
        after = torch.get_num_threads(), torch_thread.call(torch.get_num_threads)
    finally:
        torch.set_num_threads(original[0])
        torch_thread.call(torch.set_num_threads, original[1])
    assert (inside, untouched, after) == ((1, 1), (3, 2), (3, 2))


def _bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU build of torch does with CUDA calls")
def test_only_an_indexed_cuda_device_is_set_on_the_torch_thread(monkeypatch):
    # cpu and a bare "cuda" (the current device) touch nothing: torch.cuda.set_device raises for both
    torch_thread.use_device(torch.device("cpu"))
    torch_thread.use_device(torch.device("cuda"))
    # cuda:1 is set, on the torch thread (recorded: a CPU build has no CUDA to set it in)
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(f"{d} on {threading.current_thread().name}"))
    torch_thread.use_device(torch.device("cuda:1"))
    assert len(seen) == 1 and seen[0].startswith("cuda:1 on opd-torch"), seen
