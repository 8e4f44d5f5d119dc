"""A CPU server keeps the memory its requests free (opd/host_memory.py says why): from its third
request on, a torch grader scores a batch without faulting the batch's memory in again."""

import json
import subprocess
import sys

import torch

from opd.host_memory import keep_freed_host_memory

# Fresh processes: malloc's settings are process-wide and the test process has set them already.
# "off" starts the same engine with the setting left out.
SCRIPT = """
import asyncio, json, resource, sys
import opd.torch_thread
if sys.argv[2] == "off":
    opd.torch_thread.keep_freed_host_memory = lambda device: False
from grader.engine import ToScore
from grader.engines.torch import TorchGraderEngine

engine = TorchGraderEngine(sys.argv[1])
batch = [ToScore(list(range(5, 25)), list(range(30, 50))) for _ in range(32)]

async def faults_per_request():
    counts = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        await engine.score(batch, 16)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

print(json.dumps(asyncio.run(faults_per_request())))
"""


def page_faults(teacher_dir, setting: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(teacher_dir), setting], capture_output=True, text=True,
                          check=True, timeout=120)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cpu_server_does_not_fault_its_requests_memory_in_again(teacher_dir):
    kept, returned = page_faults(teacher_dir, "on"), page_faults(teacher_dir, "off")
    # measured: [6387, 0, 320, 0, 0, 0] against [8264, 5696, 3328, 6016, 4896, 6176] pages
    assert sum(kept[2:]) * 10 < sum(returned[2:]), (kept, returned)


def test_only_cpu_processes_change_their_malloc():
    assert keep_freed_host_memory(torch.device("meta")) is False
    assert keep_freed_host_memory(torch.device("cpu")) is (sys.platform == "linux")
