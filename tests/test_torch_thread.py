"""Every torch call of a server runs on one OS thread (opd/torch_thread.py says why)."""

import asyncio
import threading

from opd import torch_thread


def test_sync_and_async_calls_share_one_thread_and_nested_calls_do_not_deadlock():
    from_sync = torch_thread.call(threading.current_thread)
    from_async = asyncio.run(torch_thread.run(threading.current_thread))
    nested = torch_thread.call(torch_thread.call, threading.current_thread)  # would wait on itself
    assert from_sync is from_async is nested
    assert from_sync is not threading.main_thread()
