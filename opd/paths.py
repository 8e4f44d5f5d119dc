"""Where a model comes from: a local directory, `tiny:NAME`, or a Hugging Face hub id.

Light on purpose (no torch, no transformers at import): the config and the CLI check model
paths before anything heavy loads.

`org/name` may be a hub id or a relative folder; when no such folder exists, one quick request
to the hub (or its local cache) decides, so a mistyped local path fails at once naming the path
instead of after a minute of the hub client's retries.
"""

import functools
from pathlib import Path

from opd.errors import ConfigError

HUB_PROBE_TIMEOUT_S = 10.0
"""One metadata request to the hub; a reachable hub answers in well under a second."""


def missing_local_model(path: str) -> bool:
    """True for a path that can only be local (absolute, ./, ../, ~) and does not exist."""
    return path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists()


@functools.cache
def check_model_source(path: str) -> None:
    """Raise ConfigError naming `path` unless it is a local directory, a tiny model, or a hub id
    that is cached locally or exists on a reachable hub."""
    if path.startswith("tiny:") or Path(path).expanduser().is_dir():
        return
    where = f"model {path}: {Path(path).expanduser().resolve()} does not exist"
    if missing_local_model(path):
        raise ConfigError(where)
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return
        model_info(path, timeout=HUB_PROBE_TIMEOUT_S)
    except HFValidationError:
        raise ConfigError(f"{where}, and it is not a valid Hugging Face hub id") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}, and the Hugging Face hub has no such model") from None
    except Exception as exc:  # offline mode, DNS, TLS, timeouts: the hub client's many error types
        raise ConfigError(
            f"{where}, it is not in the Hugging Face cache, and the hub is unreachable ({exc}); "
            "if it is a local folder, check the path"
        ) from None


def resolve_model_path(path: str) -> str:
    """`tiny:NAME` -> the cached tiny model dir; a local dir or hub id is checked and returned unchanged."""
    if path.startswith("tiny:"):
        from opd.tiny import ensure_tiny_model

        return str(ensure_tiny_model(path.removeprefix("tiny:")))
    check_model_source(path)
    return path
