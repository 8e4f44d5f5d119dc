"""The learner: pulls samples and teacher logprobs over HTTP and updates the student.

`OnPolicyDistillationTrainer` is the public entry point; `opd run CONFIG.yml` drives it.
"""

from learner.config import OpdConfig
from learner.trainer import OnPolicyDistillationTrainer

__all__ = ["OnPolicyDistillationTrainer", "OpdConfig"]
