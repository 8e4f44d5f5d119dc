"""The embedded default: with no service URLs in the config, start a local sampler and grader.

They run as child processes on free loopback ports, load their models in parallel, and are
stopped when the run ends, also on error or Ctrl-C. Their logs go to `<run_dir>/logs/`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from learner.config import ModelSpec, OpdConfig
from opd.errors import ConfigError
from opd.launch import LocalServer, local_servers


def server_args(spec: ModelSpec, config: OpdConfig) -> list[str]:
    services = config.services
    return ["--model", spec.path, "--dtype", spec.dtype, "--device", services.device, "--engine", services.engine]


@contextmanager
def service_urls(config: OpdConfig, log_dir: Path, world_size: int = 1) -> Iterator[tuple[str, str]]:
    """Yield (sampler_url, grader_url): the configured ones, or those of local servers."""
    services = config.services
    if services.sampler_url is not None and services.grader_url is not None:
        yield services.sampler_url, services.grader_url
        return
    if world_size > 1:
        raise ConfigError("several learner processes need services.sampler_url and grader_url: the embedded "
                          "default starts servers for one process only")  # fmt: skip
    key_file = ["--api-key-file", services.api_key_file] if services.api_key_file else []
    servers = [
        LocalServer("sampler", server_args(config.student, config) + key_file, log_dir),
        LocalServer("grader", server_args(config.teacher, config), log_dir),
    ]
    with local_servers(servers, services.startup_timeout_s) as (sampler_url, grader_url):
        yield sampler_url, grader_url
