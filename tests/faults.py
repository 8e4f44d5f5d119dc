"""Injected faults shared by the tests that need a service to die mid-run."""

import os
import signal

from learner.trainer import OnPolicyDistillationTrainer
from opd.launch import LocalServer


class KillSamplerAfterPush(OnPolicyDistillationTrainer):
    """A trainer that SIGKILLs one sampler right after the weight push of step `kill_at` (once:
    not again after the watchdog has restarted it); kill_at -1 never does."""

    def __init__(self, *args, sampler: LocalServer, kill_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.killed_server, self.kill_at = sampler, kill_at

    async def push_weights(self) -> None:
        await super().push_weights()
        if self.step_count == self.kill_at and self.killed_server.restarts == 0:
            os.kill(self.killed_server.proc.pid, signal.SIGKILL)
