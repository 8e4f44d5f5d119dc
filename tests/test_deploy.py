"""deploy/docker-compose.yml, proven without a Docker engine (none runs here):

1. a real compose implementation (Debian's docker-compose) validates and renders the file;
2. each rendered service's command line and environment run as local processes on CPU (torch
   engine, tiny models), with container paths mapped to temp dirs the way the volumes would, and a
   short distillation runs through them. A command that drifts from the CLI fails here.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from learner.metrics import read_metrics
from opd.launch import free_port, stop_process, wait_healthy

COMPOSE = Path("deploy/docker-compose.yml")
KEY = "compose-test-key"


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs docker-compose (Debian package docker-compose; .ci/run installs it)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return found


def render(tmp_path: Path, student_dir: Path, teacher_dir: Path) -> dict:
    """`docker-compose config` with the test's env file and tiny models: the file as compose sees it."""
    env_file = tmp_path / "test.env"
    env_file.write_text(f"OPD_API_KEY={KEY}\n")
    env = {**os.environ, "OPD_ENV_FILE": str(env_file), "STUDENT_MODEL": str(student_dir),
           "TEACHER_MODEL": str(teacher_dir), "CONFIG_DIR": str(tmp_path / "config")}  # fmt: skip
    result = subprocess.run([docker_compose(), "-f", str(COMPOSE), "config"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid(tmp_path, student_dir, teacher_dir):
    rendered = render(tmp_path, student_dir, teacher_dir)
    services = rendered["services"]
    assert set(services) == {"sampler", "grader", "learner"}
    for name in ("sampler", "grader"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
        assert services[name]["restart"] == "unless-stopped"
    assert services["learner"]["depends_on"] == {
        "sampler": {"condition": "service_healthy"},
        "grader": {"condition": "service_healthy"},
    }
    assert all(services[s]["environment"]["OPD_API_KEY"] == KEY for s in services)
    # the per-step weight file goes through memory (tmpfs), mounted where the learner writes it
    assert rendered["volumes"]["weights"]["driver_opts"]["type"] == "tmpfs"
    learner = services["learner"]["command"]
    assert learner[learner.index("--services.shared_dir") + 1] == "/weights"
    for name in ("sampler", "learner"):  # compose v1 renders a volume as "source:target:mode"
        mounted = [
            v.split(":")[:2] if isinstance(v, str) else [v["source"], v["target"]] for v in services[name]["volumes"]
        ]
        assert ["weights", "/weights"] in mounted, (name, mounted)


def local_command(command: list[str], ports: dict[str, int], mounts: dict[str, Path]) -> list[str]:
    """The container command as a CPU process here: torch engine, loopback, free ports, volume paths."""
    swap = {"vllm": "torch", "0.0.0.0": "127.0.0.1", "cuda:0": "cpu",
            "8001": str(ports["sampler"]), "8002": str(ports["grader"]),
            "http://sampler:8001": f"http://127.0.0.1:{ports['sampler']}",
            "[http://sampler:8001]": f"[http://127.0.0.1:{ports['sampler']}]",
            "http://grader:8002": f"http://127.0.0.1:{ports['grader']}"}  # fmt: skip
    args = []
    for arg in command:
        arg = swap.get(arg, arg)
        for container, host in mounts.items():
            if arg.startswith(container):
                arg = str(host) + arg.removeprefix(container)
        args.append(arg)
    assert args[0] == "opd"
    return [sys.executable, "-m", "opd.cli", *args[1:]]


def short_run_config(config_dir: Path) -> None:
    """deploy/config with the method's settings cut down to a CPU-sized run."""
    shutil.copytree("deploy/config", config_dir)
    config = yaml.safe_load((config_dir / "config.yml").read_text())
    config["train"] |= {"steps": 3}
    config["sampling"] |= {"max_tokens": 12}
    config["eval"] |= {"eval_steps": 3, "max_items": 4, "max_tokens": 12}
    config["checkpoint"] |= {"save_steps": 3}
    (config_dir / "config.yml").write_text(yaml.safe_dump(config))


@pytest.mark.slow
def test_compose_services_run_a_distillation_as_local_processes(tmp_path, student_dir, teacher_dir):
    short_run_config(tmp_path / "config")
    services = render(tmp_path, student_dir, teacher_dir)["services"]
    mounts = {"/config": tmp_path / "config", "/shared": tmp_path / "shared", "/weights": tmp_path / "weights",
              "/hf-cache": tmp_path / "hf"}  # fmt: skip
    ports = {"sampler": free_port(), "grader": free_port()}
    procs = {}
    try:
        for name in ("sampler", "grader"):  # compose starts them first (depends_on: healthy)
            env = {**os.environ, **{k: str(v) for k, v in services[name]["environment"].items()}}
            env["HF_HOME"] = str(mounts["/hf-cache"])
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            procs[name] = subprocess.Popen(local_command(services[name]["command"], ports, mounts), env=env,
                                           stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        for name, proc in procs.items():
            wait_healthy(f"http://127.0.0.1:{ports[name]}", proc, name, tmp_path / f"{name}.log", 120)
        learner_env = {**os.environ, **{k: str(v) for k, v in services["learner"]["environment"].items()}}
        learner_env["HF_HOME"] = str(mounts["/hf-cache"])
        command = local_command(services["learner"]["command"], ports, mounts)
        result = subprocess.run(command, env=learner_env, capture_output=True, text=True, timeout=600)
    finally:
        for proc in procs.values():
            stop_process(proc)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "shared" / "runs" / "default"
    steps = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if "kl/reverse_per_token" in m]
    assert steps == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step_000003" / "model.safetensors").exists()
    # weights went through the shared volume; the sampler required the env file's key (it is set in
    # its environment), so every push carried it, and the key itself never reaches the log
    log = (tmp_path / "sampler.log").read_text()
    assert re.search(r"loaded \d+ weight tensors from \S+/weights-v000003\.safetensors, policy_version=3", log)
    assert list((tmp_path / "weights").iterdir()) == []  # the last push's file removed as the run ended
    assert KEY not in log


def test_replicas_override_adds_a_second_sampler_the_learner_uses(tmp_path, student_dir, teacher_dir):
    two = "[http://sampler:8001, http://sampler2:8003]"
    env = {**os.environ, "OPD_ENV_FILE": str(tmp_path / "test.env"), "STUDENT_MODEL": str(student_dir),
           "TEACHER_MODEL": str(teacher_dir), "SAMPLER_URLS": two}  # fmt: skip
    (tmp_path / "test.env").write_text(f"OPD_API_KEY={KEY}\n")
    replicas = Path("deploy/docker-compose.replicas.yml")
    result = subprocess.run([docker_compose(), "-f", str(COMPOSE), "-f", str(replicas), "config"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"sampler", "sampler2", "grader", "learner"}
    assert set(services["learner"]["depends_on"]) == {"sampler", "sampler2", "grader"}
    command = services["learner"]["command"]
    urls = yaml.safe_load(command[command.index("--services.sampler_urls") + 1])
    assert urls == ["http://sampler:8001", "http://sampler2:8003"]
    assert services["sampler2"]["command"][services["sampler2"]["command"].index("--port") + 1] == "8003"


def test_qwen3_override_from_opd_init_renders_and_matches_its_config(tmp_path):
    """`opd init -t distill-reasoning-qwen3` writes a config and the compose override deploy/ holds;
    compose accepts the pair, each service has GPUs of its own, every command parses with opd's own
    CLI, and the learner's config names exactly the samplers and grader the override starts."""
    from learner.config import load_config
    from opd.cli import build_parser

    folder = tmp_path / "qwen3"
    result = subprocess.run([sys.executable, "-m", "opd.cli", "init", str(folder), "-t", "distill-reasoning-qwen3"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    override = folder / "docker-compose.qwen3.yml"
    assert override.read_text() == Path("deploy/docker-compose.qwen3.yml").read_text()
    assert f"CONFIG_DIR={folder.resolve()} docker compose" in result.stdout
    config = load_config(folder / "config.yml")

    (tmp_path / "test.env").write_text(f"OPD_API_KEY={KEY}\n")
    env = {**os.environ, "OPD_ENV_FILE": str(tmp_path / "test.env"), "CONFIG_DIR": str(folder)}
    for name in ("STUDENT_MODEL", "TEACHER_MODEL", "MAX_MODEL_LEN"):
        env.pop(name, None)
    compose = [docker_compose(), "-f", str(COMPOSE), "-f", str(override), "config"]
    rendered = subprocess.run(compose, env=env, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    samplers = sorted(name for name in services if name.startswith("sampler"))
    assert samplers == ["sampler", "sampler2", "sampler3", "sampler4", "sampler5"]

    gpus = {name: services[name]["environment"]["CUDA_VISIBLE_DEVICES"].split(",") for name in services}
    assert sorted(gpu for ids in gpus.values() for gpu in ids) == [str(i) for i in range(8)]  # none shared
    parser = build_parser()
    parsed = {name: parser.parse_known_args(services[name]["command"][1:]) for name in services}
    args = {name: known for name, (known, _) in parsed.items()}
    assert all(not rest for name, (_, rest) in parsed.items() if name != "learner")
    assert args["grader"].tensor_parallel_size == len(gpus["grader"]) == 2
    assert all(services[name]["volumes"] for name in samplers)
    assert set(services["learner"]["depends_on"]) == {*samplers, "grader"}
    # the learner reaches every sampler and the grader by its compose name and port
    assert config.services.sampler_urls == [f"http://{name}:{args[name].port}" for name in samplers]
    assert config.services.grader_url == f"http://grader:{args['grader'].port}"
    # the servers fit what the config asks of them: the adapter rank, prompt + completion lengths
    longest = config.data.max_prompt_tokens + max(config.sampling.max_tokens, config.eval.max_tokens)
    for name in [*samplers, "grader"]:
        assert args[name].model == (config.teacher.path if name == "grader" else config.student.path)
        assert args[name].max_model_len - (name == "grader") >= longest  # a vLLM grader scores one token less
    for name in samplers:
        assert args[name].max_lora_rank >= config.student.lora.r
    # the config file is the one the learner's command reads, from the folder opd init wrote
    assert f"{folder}:/config:ro" in services["learner"]["volumes"]
    assert args["learner"].config == "/config/config.yml"
    assert load_config(folder / "config.yml", parsed["learner"][1]).run_dir == "/shared/runs/qwen3"
    assert config.train.max_staleness == 1 and config.train.precision == "bf16" and config.student.lora is not None
    assert config.data.chat_template_kwargs == {"enable_thinking": True} and config.sampling.max_tokens >= 4096
