"""The services a run talks to: the configured URLs, or the embedded default's local servers, and
the checks at start that they can work together.

With no service URLs in the config, `services.samplers` samplers and `services.graders` graders
run as child processes on free loopback ports, load their models in parallel, and are stopped
when the run ends, also on error or Ctrl-C. Their logs go to `<run_dir>/logs/`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from learner.config import LoraSpec, ModelSpec, OpdConfig, ServicesConfig, TrainConfig
from opd import torch_thread
from opd.auth import load_api_key
from opd.errors import ConfigError
from opd.launch import LocalServer, local_servers
from opd.serving import InfoResponse
from opd.tokenizer import check_same_tokenizer, check_vocabularies
from sampler.schema import LORA_RANKS


def served_lora_rank(r: int) -> int:
    """The smallest rank vLLM's LoRA kernels are built for that holds adapters of rank `r`."""
    if r > LORA_RANKS[-1]:
        raise ConfigError(f"student.lora.r is {r}: vLLM serves adapters of rank at most {LORA_RANKS[-1]}")
    return min(rank for rank in LORA_RANKS if rank >= r)


def server_args(spec: ModelSpec, config: OpdConfig) -> list[str]:
    services = config.services
    args = ["--model", spec.path, "--dtype", spec.dtype, "--device", services.device, "--engine", services.engine]
    if spec.lora is not None:  # a LoRA student's sampler serves adapters of its rank
        args += ["--max-lora-rank", str(served_lora_rank(spec.lora.r))]
    if services.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(services.gpu_memory_utilization)]
    return args


class CpuShares(NamedTuple):
    """torch threads of the learner and of each local server when they share the CPU's cores."""

    learner: int
    server: int


def cpu_shares(config: OpdConfig, cores: int) -> CpuShares | None:
    """How the pipelined loop splits `cores` (the learner's torch threads) between its learner and
    the local servers it starts, when all compute on the CPU; None where each keeps every core.

    In the serial loop (max_staleness 0) one process computes at a time, so each takes every core.
    In the pipelined loop the learner learns while a server samples or grades the next batch (the
    sampler and the grader take turns on it), so two processes compute at once. Each running an
    OpenMP team as large as the machine oversubscribes the cores, and a team's barriers then wait
    on threads the OS has descheduled: on 2 cores the toy step took 0.46-0.62 s against 0.23 s
    serial, and 0.17-0.21 s with one thread each (BENCHMARKS.md). So the learner takes half the
    cores, the larger half when they are odd, and each server the rest. (At max_staleness 1 the
    sampler and the grader take turns; a deeper lookahead, or replicas, let them overlap too, and
    they then share their half.)"""
    services, train = config.services, config.train
    local = services.sampler_list is None
    on_cpu = torch.device(train.device).type == "cpu" and torch.device(services.device).type == "cpu"
    if not (train.max_staleness and local and on_cpu):
        return None
    server = max(1, cores // 2)
    return CpuShares(learner=max(1, cores - server), server=server)


@contextmanager
def service_urls(
    config: OpdConfig, log_dir: Path, world_size: int = 1, server_threads: int | None = None
) -> Iterator[tuple[list[str], list[str]]]:
    """Yield (sampler URLs, grader URLs): the configured ones, or those of local servers
    (`services.samplers` and `services.graders` of each, logs in log_dir/sampler.log or sampler-N.log),
    each with `server_threads` OpenMP threads when set."""
    services = config.services
    if services.sampler_list is not None and services.grader_list is not None:
        yield services.sampler_list, services.grader_list
        return
    if world_size > 1:
        raise ConfigError("several learner processes need services.sampler_url(s) and grader_url(s): the embedded "
                          "default starts servers for one process only")  # fmt: skip
    one_at_a_time = services.gpu_memory_utilization is not None  # sharing a GPU: never profile at once
    servers = embedded_servers(config, log_dir, server_threads)
    with local_servers(servers, services.startup_timeout_s, one_at_a_time) as urls:
        yield urls[: services.samplers], urls[services.samplers :]


def check_service_settings(services: ServicesConfig) -> None:
    """Before any server starts: the device of the servers the learner would start (on this
    machine), and the key file the learner pushes with, named by their config keys."""
    if services.sampler_list is None:
        torch_thread.checked_device(services.device, "services.device")
    if services.api_key_file is not None:
        try:
            load_api_key(services.api_key_file)
        except ConfigError as exc:
            raise ConfigError(f"services.api_key_file: {exc}") from None


def embedded_servers(config: OpdConfig, log_dir: Path, threads: int | None = None) -> list[LocalServer]:
    """The embedded default's samplers, then graders, not yet started; each with `threads` OpenMP
    threads when set."""
    services = config.services
    key_file = ["--api-key-file", services.api_key_file] if services.api_key_file else []
    sampler_args, grader_args = server_args(config.student, config) + key_file, server_args(config.teacher, config)
    env = None if threads is None else {"OMP_NUM_THREADS": str(threads)}
    servers = [LocalServer("sampler", sampler_args, log_dir, env, name=_log_name("sampler", i, services.samplers))
               for i in range(services.samplers)]  # fmt: skip
    return servers + [LocalServer("grader", grader_args, log_dir, env, name=_log_name("grader", i, services.graders))
                      for i in range(services.graders)]  # fmt: skip


def _log_name(role: str, index: int, count: int) -> str:
    return role if count == 1 else f"{role}-{index}"


def check_services(
    sampler: InfoResponse, grader: InfoResponse, *, student: str, own_fingerprint: tuple[int, str], own_vocab: int,
    train: TrainConfig, longest: tuple[int, int], lora: LoraSpec | None = None,
) -> None:  # fmt: skip
    """Fail at start, naming both sides: tokenizers that differ (fingerprints), vocabulary row counts
    that cannot work together, sequences longer than a server takes (`longest`: the longest prompt
    and the most tokens generated after a prompt), a top-k larger than the servers allow."""
    sampler_fp = (sampler.vocab_size, sampler.tokenizer_hash)
    grader_fp = (grader.vocab_size, grader.tokenizer_hash)
    check_same_tokenizer(f"sampler ({sampler.model})", sampler_fp, f"grader ({grader.model})", grader_fp)
    check_same_tokenizer(f"learner student ({student})", own_fingerprint, f"sampler ({sampler.model})", sampler_fp)
    check_vocabularies(own_vocab, sampler, grader)
    check_lora(lora, sampler)
    check_context(longest, sampler, grader)
    for info in (sampler, grader):
        if train.loss == "topk" and train.top_k > info.max_logprobs:
            raise ConfigError(f"train.top_k {train.top_k} is over {info.model}'s --max-logprobs {info.max_logprobs}: "
                              "start the servers with a larger --max-logprobs or lower train.top_k")  # fmt: skip


def check_context(longest: tuple[int, int], sampler: InfoResponse, grader: InfoResponse) -> None:
    """The longest prompt plus the most tokens sampled after it must fit both servers: the sampler
    refuses a longer request, and the grader could not score the sample (a vLLM grader scores one
    token less than its context)."""
    prompt, generated = longest
    for role, info in (("sampler", sampler), ("grader", grader)):
        if prompt + generated > info.max_model_len:
            fix = ("shorten the prompt (data.max_prompt_tokens refuses such lines at load)"
                   if prompt >= info.max_model_len else "lower sampling.max_tokens / eval.max_tokens")  # fmt: skip
            raise ConfigError(f"the longest prompt ({prompt} tokens) plus up to {generated} sampled tokens exceed the "
                              f"{role}'s ({info.model}, {info.engine}) context of {info.max_model_len} tokens: {fix} "
                              "or start the servers with a larger --max-model-len")  # fmt: skip


def check_lora(lora: LoraSpec | None, sampler: InfoResponse) -> None:
    """A LoRA student needs a sampler that serves adapters of its rank; a full one, one that does not."""
    if lora is None and sampler.max_lora_rank is not None:
        raise ConfigError(f"the sampler ({sampler.model}) serves LoRA adapters (--max-lora-rank "
                          f"{sampler.max_lora_rank}) but student.lora is not set: start it without "
                          "--max-lora-rank")  # fmt: skip
    if lora is not None and (sampler.max_lora_rank is None or sampler.max_lora_rank < lora.r):
        raise ConfigError(f"student.lora.r is {lora.r}: start the sampler ({sampler.model}) with --max-lora-rank "
                          f"{served_lora_rank(lora.r)} or more "
                          f"(it serves {sampler.max_lora_rank or 'full weights'})")  # fmt: skip
