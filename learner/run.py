"""`opd run CONFIG.yml`: build the trainer from a config and train."""

import logging
from pathlib import Path

from learner.checkpoint import resolve_resume
from learner.config import OpdConfig
from learner.trainer import OnPolicyDistillationTrainer

logger = logging.getLogger(__name__)


def run(config: OpdConfig, resume: str | None = None) -> None:
    """Train from `config`; `resume` is `latest`, `auto` or a checkpoint directory."""
    resume_from = resolve_resume(Path(config.run_dir) / "checkpoints", resume) if resume else None
    trainer = OnPolicyDistillationTrainer(config, resume_from=resume_from)
    history = trainer.train()
    if not trainer.processes.is_main or not history:
        return  # one summary line, of the main process's averaged metrics; train() said why nothing ran
    last = history[-1]
    logger.info(
        "done: %d steps, final reverse KL per token %.4f, run dir %s",
        len(history),
        last.get("kl/reverse_per_token", float("nan")),
        config.run_dir,
    )
