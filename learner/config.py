"""The learner's config: one pydantic model per section, loaded from YAML, overridable from the CLI.

    opd run examples/tiny.yml --train.steps 20 --sampling.temperature 0.7

Every field has its default here and nowhere else; unknown keys are errors that name the key.
The resolved config is written to `<run_dir>/config.yml` at start.
"""

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from learner.rewards import BUILT_IN, CUSTOM
from opd.errors import ConfigError
from opd.limits import MAX_N, MAX_TEMPERATURE
from opd.paths import missing_local_model
from sampler.staging import memfd_available

Dtype = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of attention and MLP in Qwen/Llama-style models (vLLM's LoRA set for Qwen2)."""


class LoraSpec(Section):
    r: int = Field(default=8, gt=0)
    """Adapter rank; the vLLM sampler must be started with --max-lora-rank at least this."""
    alpha: float = Field(default=16.0, gt=0.0)
    """Scale: the adapter adds (alpha / r) * B @ A to each target weight."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input while training."""
    target_modules: list[str] = Field(default=list(LORA_TARGETS), min_length=1)
    """Module names (last path component) that get adapters."""


class ModelSpec(Section):
    path: str
    """HF model id, local directory, or `tiny:student` / `tiny:teacher` (built locally)."""
    dtype: Dtype = "float32"
    """Weights dtype in the server that serves this model; the learner trains in float32."""
    lora: LoraSpec | None = None
    """Student only: train LoRA adapters on the frozen base and push only the adapter (needs the
    `lora` extra: peft). Absent: full fine-tuning."""

    @field_validator("path")
    @classmethod
    def _local_path_exists(cls, path: str) -> str:
        if missing_local_model(path):
            raise ValueError(f"model directory {path} does not exist")
        return path


class DataConfig(Section):
    train_path: str | None = None
    """JSONL: one object per line with `prompt` (text) or `messages` (chat), optional `answer`.
    Required unless the Python API is given a train_dataset."""
    eval_path: str | None = None
    """JSONL in the same format; items with `answer` also get reward metrics."""
    chat_template: bool = True
    """Wrap `prompt` text as a user message and apply the tokenizer's chat template."""
    max_prompt_tokens: int = Field(default=512, gt=0)
    """Prompts longer than this are refused when the data is loaded (naming the line)."""
    chat_template_kwargs: dict[str, Any] = {}
    """Passed to the chat template of train and eval prompts, e.g. {enable_thinking: true} (Qwen3)."""
    shuffle: bool = True
    """Reshuffle the training prompts each epoch (seeded by train.seed)."""

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_switches_only(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(kwargs) & TOKENIZER_CALL_KEYS)
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set here: these are the tokenizer's own arguments, which "
                             "opd sets (a prompt ends ready for the assistant's turn, as token ids); the template's "
                             "switches (enable_thinking, ...) can")  # fmt: skip
        return kwargs


TOKENIZER_CALL_KEYS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})  # fmt: skip
"""Arguments of transformers' `apply_chat_template` itself, which opd passes (or must not change)."""


class SamplingConfig(Section):
    n: int = Field(default=1, ge=1, le=MAX_N)
    """Completions sampled per prompt."""
    temperature: float = Field(default=0.7, gt=0.0, le=MAX_TEMPERATURE)
    """Sampling temperature of training rollouts (the reference method uses 0.6-0.8)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass of training rollouts."""
    max_tokens: int = Field(default=128, gt=0)
    """Most tokens generated per completion."""


class TrainConfig(Section):
    steps: int = Field(default=100, gt=0)
    """Training steps (one batch of rollouts each)."""
    batch_size: int = Field(default=4, gt=0)
    """Prompts per step (per process under accelerate)."""
    lr: float = Field(default=1e-5, gt=0.0)
    """AdamW learning rate."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup of the learning rate, then constant."""
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    """Gradients are clipped to this global norm before each update."""
    ppo_steps: int = Field(default=1, ge=1)
    """Clipped updates per batch of samples."""
    loss: Literal["sampled", "topk"] = "sampled"
    """sampled: the seed method, the teacher's logprob of each sampled token; topk: the exact reverse
    KL over a head of tokens (the teacher's and the student's top_k at each position) plus the
    sampled token's estimate of the rest, unbiased with less variance (docs/design.md)."""
    top_k: int = Field(default=16, gt=0)
    """Head size per side for loss topk; at most the servers' --max-logprobs."""
    top_k_head: Literal["teacher", "both"] = "teacher"
    """The head of loss topk: the teacher's top_k at each position, or both the teacher's and the
    student's top_k (the student's come with the samples; the grader scores them as candidate_ids).
    Either is unbiased; "both" lowers the variance where the student is sure of tokens the teacher
    is not, at the cost of the top-k in generation and a candidate lookup in grading (on the toy task
    0.30 vs 0.21 s/step, the same reward)."""
    clip_eps: float = Field(default=0.2, gt=0.0, lt=1.0)
    """PPO clip range: ratios outside [1 - clip_eps, 1 + clip_eps] stop pushing further."""
    max_staleness: int = Field(default=0, ge=0)
    """0: the strictly on-policy loop (sample, grade, learn, push, in series). k >= 1: the next
    batches are generated and graded while the learner learns, from weights at most k versions
    old; older samples are dropped and generated again (`pipeline/dropped_stale`). With the learner
    and its local servers on one CPU, k >= 1 splits the cores between them (README)."""
    is_cap: float = Field(default=2.0, gt=0.0)
    """With max_staleness >= 1, each token is weighted by min(p_proximal / p_behaviour, is_cap)."""
    kl_coef: float = Field(default=1.0, gt=0.0)
    """Scale of the per-token advantage kl_coef * (logp_teacher - logp_student_old)."""
    discount: float = Field(default=0.0, ge=0.0, le=1.0)
    """0: each token's advantage is its own reverse-KL term; >0: discounted sum of later terms."""
    logprob_temperature: float = Field(default=1.0, gt=0.0)
    """Temperature of the learner's own (old and new) student logprobs."""
    micro_batch_tokens: int = Field(default=16384, gt=0)
    """Padded tokens (prompt + completion) per forward/backward; a step's samples are packed into
    micro-batches of at most this many and their gradients accumulated into one optimizer step, so
    memory follows this budget, not the batch. A longer sample goes alone."""
    logprob_chunk_tokens: int = Field(default=512, gt=0)
    """Positions projected onto the vocabulary at once; memory of the LM head is about 4 x this x
    vocabulary floats (512 x 151,936: ~1.2 GB), recomputed in backward."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: forward and backward under bf16 autocast, float32 master weights and optimizer state
    (GPUs); fp32: float32 throughout."""
    gradient_checkpointing: bool = False
    """Recompute the model's layer activations in backward instead of keeping them."""
    seed: int = 0
    """Seeds torch, the prompt order and the sampler's per-step seeds."""
    device: str = "cpu"
    """Where the learner's student trains, e.g. cpu or cuda:0."""
    use_accelerate: bool = False
    """Data-parallel learning under `accelerate launch` / torchrun; batch_size is per process."""
    fsdp: bool = False
    """With use_accelerate: shard the student with FSDP instead of replicating it (DDP)."""

    @model_validator(mode="after")
    def _topk_is_per_position(self) -> "TrainConfig":
        if self.loss == "topk" and self.discount > 0:
            raise ValueError("train.loss topk is a per-position divergence: it needs train.discount 0")
        return self


class EvalConfig(Section):
    eval_steps: int = Field(default=0, ge=0)
    """Evaluate every this many steps (and before the first and after the last); 0: never."""
    max_items: int | None = Field(default=None, gt=0)
    """Evaluate on the first this many eval items; all when unset."""
    n: int = Field(default=1, ge=1, le=MAX_N)
    """Samples per eval prompt for the reverse-KL estimate (temperature 1)."""
    max_tokens: int = Field(default=128, gt=0)
    """Most tokens per eval completion."""
    reward: str = "exact"
    """How an eval completion is checked against its item's answer: exact (the stripped completion),
    last_line, math (the final answer by value, via math-verify: `pip install 'opd[math]'`), or
    `package.module:function` of your own, called as function(completion, answer) -> float."""

    @field_validator("reward")
    @classmethod
    def _known_reward(cls, reward: str) -> str:
        if reward not in BUILT_IN and not CUSTOM.match(reward):
            raise ValueError(f"{reward!r} is none of {', '.join(BUILT_IN)} nor a module:function path")
        return reward


Transport = Literal["http", "path", "memory", "shared"]
"""How a weight push travels (`weight_transport`, `learner.clients.SamplerPool.push_weights_by`)."""

MEMORY_PUSH_MIN_BYTES = 16 * 2**20
"""Under `weight_transport: auto`, the smallest push to the learner's own samplers sent through memory."""


class ServicesConfig(Section):
    sampler_url: str | None = None
    """Base URL of a running sampler; omit both URLs to start local servers (the embedded default)."""
    grader_url: str | None = None
    """Base URL of a running grader; set together with sampler_url."""
    sampler_urls: list[str] | None = None
    """Several running samplers (replicas of the student); requests go to the least loaded, weight
    pushes to all. sampler_url is the shorthand for one."""
    grader_urls: list[str] | None = None
    """Several running graders (replicas of the teacher); grader_url is the shorthand for one."""
    samplers: int = Field(default=1, ge=1)
    """Locally started samplers (the embedded default)."""
    graders: int = Field(default=1, ge=1)
    """Locally started graders (the embedded default)."""
    engine: Literal["auto", "vllm", "torch"] = "auto"
    """Engine of the locally started servers; auto: vllm where it is installed, else torch."""
    device: str = "cpu"
    """Device of the locally started servers."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Share of the GPU each locally started vLLM server may take (weights + KV cache). Unset, vLLM
    takes 0.92 and a second server on the same GPU cannot start; set, the servers start one after
    another so their memory profiles do not overlap. Their shares plus the learner's need must stay
    under 1 when all share one GPU."""
    request_timeout_s: float = Field(default=300.0, gt=0.0)
    """Per request; a generate of 256 tokens x 64 samples on a busy GPU can take minutes."""
    retry_deadline_s: float = Field(default=120.0, ge=0.0)
    """Total time to keep retrying transport errors and 5xx before failing the run."""
    startup_timeout_s: float = Field(default=300.0, gt=0.0)
    """How long locally started servers may take to load their models."""
    api_key_file: str | None = None
    """File with the sampler's bearer token for weight pushes (else $OPD_API_KEY, if set)."""
    weight_transport: Literal["auto", Transport] = "auto"
    """http: stream safetensors in the request body; path: write to shared_dir and post the path;
    memory: write to an anonymous in-memory file and post its /proc path (samplers on this host,
    run by this user); shared: copy into one buffer the samplers map, kept for the run (an
    in-memory file, or on a GPU a CUDA allocation they open by IPC), and post its layout (torch
    samplers on this host; others get the body over HTTP); auto: for the samplers the learner
    starts itself shared on the torch engine, memory on vLLM for pushes of 16 MB and more; http
    otherwise."""
    shared_dir: str | None = None
    """A directory both learner and sampler can read (same machine or a shared volume); for path."""

    @model_validator(mode="after")
    def _path_transport_needs_a_dir(self) -> "ServicesConfig":
        if self.weight_transport == "path" and self.shared_dir is None:
            raise ValueError("weight_transport 'path' needs shared_dir")
        return self

    @model_validator(mode="after")
    def _both_or_neither(self) -> "ServicesConfig":
        for one, many in (("sampler_url", "sampler_urls"), ("grader_url", "grader_urls")):
            if getattr(self, one) is not None and getattr(self, many) is not None:
                raise ValueError(f"set {one} or {many}, not both")
            if getattr(self, many) == []:
                raise ValueError(f"{many} is empty")
        if (self.sampler_list is None) != (self.grader_list is None):
            raise ValueError("set sampler_url(s) and grader_url(s) both, or neither (to start local servers)")
        return self

    @property
    def sampler_list(self) -> list[str] | None:
        """The running samplers' URLs, or None to start local ones."""
        return self.sampler_urls or ([self.sampler_url] if self.sampler_url else None)

    @property
    def grader_list(self) -> list[str] | None:
        return self.grader_urls or ([self.grader_url] if self.grader_url else None)

    def push_transport(self, nbytes: int, engine: str) -> Transport:
        """How a push of `nbytes` to samplers of `engine` travels: `weight_transport` with auto
        settled. The learner's own samplers are on its host: a torch sampler copies the weights
        out of the learner's buffer (sampler/shared.py; no bytes through HTTP or a file at any
        size), a vLLM one, whose weights live in its worker process, reads a model-sized push from
        an in-memory file (1.2-1.3 s instead of 1.9-2.1 s over HTTP for 1 GB), while a small one
        crosses loopback HTTP faster than it is staged (the toy's 1.4 MB: ~3-5 ms against ~4-6 ms).
        A running sampler may be on another host."""
        if self.weight_transport != "auto":
            return self.weight_transport
        if self.sampler_list is not None:
            return "http"
        if engine == "torch":
            return "shared"
        return "memory" if memfd_available() and nbytes >= MEMORY_PUSH_MIN_BYTES else "http"


class CheckpointConfig(Section):
    save_steps: int = Field(default=0, ge=0)
    """Save the student in HF format every this many steps (and at the end); 0: only at the end."""
    keep_last: int | None = Field(default=3, gt=0)
    """Keep the newest this many checkpoints; null keeps all."""


class LoggingConfig(Section):
    progress: bool = True
    """Live progress bar with reverse KL, tokens/s and step time."""
    tensorboard: bool = False
    """Also write every metric to RUN_DIR/tb for TensorBoard (`pip install 'opd[tensorboard]'`)."""


class OpdConfig(Section):
    student: ModelSpec
    teacher: ModelSpec

    @model_validator(mode="after")
    def _lora_is_for_the_student(self) -> "OpdConfig":
        if self.teacher.lora is not None:
            raise ValueError("teacher.lora: the teacher is never trained; LoRA belongs under student")
        if self.student.lora is not None and self.train.fsdp:
            raise ValueError("student.lora with train.fsdp is not supported yet: use DDP (train.fsdp false)")
        return self

    data: DataConfig = DataConfig()
    run_dir: str = "runs/latest"
    """Metrics, resolved config, checkpoints and server logs go here."""
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    services: ServicesConfig = ServicesConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--a.b value` / `--a.b=value` pairs (values: `override_value`)."""
    pairs = list(overrides)
    while pairs:
        flag = pairs.pop(0)
        if not flag.startswith("--"):
            raise ConfigError(f"expected --section.key, got {flag!r}")
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if not pairs:
                raise ConfigError(f"--{key} needs a value")
            value = pairs.pop(0)
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is not a section")
        node[leaf] = override_value(value, _field_type(key.split(".")))
    return raw


def override_value(text: str, field_type: Any) -> Any:
    """A command-line value: YAML (numbers, booleans, null, [lists], {maps}), except for a key that
    takes text, which gets the text as typed, since YAML would cut `runs/exp #2` at its comment,
    fold a newline, or read `2024` as a number. Quoted text ('007') is YAML's string either way.
    Text YAML cannot parse ("[x", "@foo") stays text too; the key's type then judges it."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(parsed, str) and text.lstrip()[:1] in ("'", '"'):
        return parsed
    takes_text = str in _members(field_type)
    return text if takes_text and not isinstance(parsed, list | dict | None) else parsed


def _field_type(keys: list[str]) -> Any:
    """The annotation of the config key `keys` (["train", "lr"]); None for a key the config lacks
    (validation names it)."""
    model: Any = OpdConfig
    for key in keys:
        sections = [m for m in _members(model) if isinstance(m, type) and issubclass(m, BaseModel)]
        field = sections[0].model_fields.get(key) if sections else None
        if field is None:
            return None
        model = field.annotation
    return model


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types a (possibly union) annotation admits: `str | None` -> (str, NoneType)."""
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {key}: {error['msg']}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last
    one silently, so a second `student:` block would replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: list[str] | None = None) -> OpdConfig:
    """Parse YAML + overrides; relative data paths are resolved against the config's folder."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = OpdConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(path))) from exc
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: OpdConfig, base: Path) -> OpdConfig:
    def resolve(p: str | None) -> str | None:
        return p if p is None or Path(p).is_absolute() else str(base / p)

    data = config.data.model_copy(
        update={"train_path": resolve(config.data.train_path), "eval_path": resolve(config.data.eval_path)}
    )
    return config.model_copy(update={"data": data})


def dump_config(config: OpdConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
