"""The learner: pulls samples and teacher logprobs over HTTP and updates the student.

`OnPolicyDistillationTrainer` is the public entry point; `opd run CONFIG.yml` drives it. The
names below load on first use, so `import learner.config` (and `opd --help`) never imports torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from learner.config import OpdConfig
    from learner.trainer import OnPolicyDistillationTrainer

__all__ = ["OnPolicyDistillationTrainer", "OpdConfig"]


def __getattr__(name: str) -> Any:
    if name == "OnPolicyDistillationTrainer":
        from learner.trainer import OnPolicyDistillationTrainer

        return OnPolicyDistillationTrainer
    if name == "OpdConfig":
        from learner.config import OpdConfig

        return OpdConfig
    raise AttributeError(f"module 'learner' has no attribute {name!r}")
