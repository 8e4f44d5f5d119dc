"""`opd run CONFIG.yml`: build the trainer from a config and train."""

import logging

from learner.config import OpdConfig
from learner.trainer import OnPolicyDistillationTrainer

logger = logging.getLogger(__name__)


def run(config: OpdConfig) -> None:
    trainer = OnPolicyDistillationTrainer(config)
    history = trainer.train()
    last = history[-1] if history else {}
    logger.info(
        "done: %d steps, final reverse KL per token %.4f, run dir %s",
        len(history),
        last.get("kl/reverse_per_token", float("nan")),
        config.run_dir,
    )
