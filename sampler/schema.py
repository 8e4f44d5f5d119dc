"""Wire schema of the sampler. The learner imports these models; nothing builds JSON by hand.

POST /v1/generate  GenerateRequest -> GenerateResponse (or, with format safetensors, sampler/samples.py)
POST /v1/weights   safetensors bytes (application/octet-stream, ?version=N),
                   WeightsFromPath or WeightsShared (application/json) -> WeightsResponse
GET  /v1/info      InfoResponse
GET  /health       200 when ready
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from opd.limits import MAX_LOGPROBS_CAP, MAX_N, MAX_TEMPERATURE
from opd.serving import ChatMessage, ErrorResponse, InfoResponse

__all__ = [
    "ADAPTER_CONFIG_KEY",
    "LORA_RANKS",
    "ChatMessage",
    "Completion",
    "ErrorResponse",
    "GenerateRequest",
    "GenerateResponse",
    "InfoResponse",
    "PromptResult",
    "WeightsFromPath",
    "WeightsResponse",
    "WeightsShared",
]

TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily, as vLLM does: logits divided by a denormal like 5e-324
overflow to inf and the distribution to NaN (a fuzzer found that 500)."""


class GenerateRequest(BaseModel):
    """Either `prompt_ids` (token ids, preferred) or `messages` (chat, templated by the sampler)."""

    model_config = ConfigDict(extra="forbid")

    prompt_ids: Annotated[list[TokenIds], Field(min_length=1)] | None = None
    messages: Annotated[list[Annotated[list[ChatMessage], Field(min_length=1)]], Field(min_length=1)] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    """Completions per prompt."""
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    """0 means greedy; so does anything below GREEDY_BELOW. At most 2, vLLM's own limit, so both
    engines take the same requests."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int = Field(default=64, ge=1)
    seed: int | None = Field(default=None, ge=0)
    """Sample j of prompt i is drawn with seed + i * n + j (mod 2^31 - 1), so the same seed and
    request give the same completions, whatever else the engine is doing. Random when omitted."""
    top_logprobs: int = Field(default=0, ge=0, le=MAX_LOGPROBS_CAP)
    """Also return the k most likely ids at each generated position and their logprobs, under the
    distribution sampled from (the student's head for the learner's top-k loss). At most the
    server's --max-logprobs."""
    format: Literal["json", "safetensors"] = "json"
    """`safetensors`: the reply is not GenerateResponse's JSON but the same samples as flat tensors
    in a safetensors file (sampler/samples.py), what the learner asks for."""

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, temperature: float) -> float:
        return 0.0 if temperature < GREEDY_BELOW else temperature

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "GenerateRequest":
        if (self.prompt_ids is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt_ids and messages")
        return self


class Completion(BaseModel):
    completion_ids: list[int]
    """Generated token ids; a stop (EOS) token that ended generation is included."""
    logprobs: list[float]
    """Logprob of each generated token under the distribution it was sampled from (after
    temperature and top-p). With temperature 0 (greedy): the model's raw logprob."""
    finish_reason: Literal["stop", "length"]
    top_ids: list[list[int]] | None = None
    """With `top_logprobs` k: per generated position, the k most likely ids, most likely first."""
    top_logprobs: list[list[float]] | None = None
    """Their logprobs, under the same distribution as `logprobs`."""


class PromptResult(BaseModel):
    prompt_ids: list[int]
    completions: list[Completion]


class GenerateResponse(BaseModel):
    policy_version: int
    """Version of the weights every completion in this reply was sampled with."""
    results: list[PromptResult]


ADAPTER_CONFIG_KEY = "opd_adapter_config"
"""A LoRA adapter is pushed as safetensors (PEFT names: `base_model.model.<module>.lora_A.weight`,
`lora_B`) whose header metadata holds its PEFT adapter_config.json under this key."""

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM's LoRA kernels are built for (`--max-lora-rank` takes one of them)."""


MAX_VERSION = 2**63 - 2
"""Largest policy_version a push may set: versions are int64 wherever they are kept, and the
next push without a version adds one."""


class WeightsFromPath(BaseModel):
    """Load weights from a safetensors file on a volume the sampler can read."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    version: int | None = Field(default=None, ge=0, le=MAX_VERSION)
    """New policy_version; the current one + 1 when omitted."""


class SharedTensor(BaseModel):
    """Where one weight sits in the learner's buffer."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"]
    shape: list[Annotated[int, Field(ge=0)]]
    offset: int = Field(ge=0)
    """Bytes from the buffer's start (a multiple of 256)."""


class CudaIpcHandle(BaseModel):
    """A CUDA allocation of the learner's, as torch.multiprocessing shares one (bytes in base64)."""

    model_config = ConfigDict(extra="forbid")

    device: int = Field(ge=0)
    handle: str
    storage_bytes: int = Field(ge=0)
    storage_offset: int = Field(ge=0)
    tensor_offset: int = Field(ge=0)
    ref_counter: str
    ref_counter_offset: int = Field(ge=0)
    event: str | None = None
    event_sync_required: bool = False


class SharedBuffer(BaseModel):
    """The learner's weight buffer: an in-memory file (memfd, opened by its /proc path) or a CUDA
    allocation (opened by its IPC handle)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["memfd", "cuda"]
    size: int = Field(ge=1, description="bytes")
    path: str | None = Field(default=None, min_length=1)
    cuda: CudaIpcHandle | None = None

    @model_validator(mode="after")
    def _where(self) -> "SharedBuffer":
        if (self.kind == "memfd") != (self.path is not None) or (self.kind == "cuda") != (self.cuda is not None):
            raise ValueError("a memfd buffer names its path, a cuda buffer its handle (cuda), and nothing else")
        return self


class WeightsShared(BaseModel):
    """Copy the weights from the learner's buffer (`weight_transport: shared`, sampler/shared.py):
    a sampler on the learner's host with the torch engine; others answer 422."""

    model_config = ConfigDict(extra="forbid")

    buffer: SharedBuffer
    tensors: list[SharedTensor] = Field(min_length=1)
    version: int | None = Field(default=None, ge=0, le=MAX_VERSION)
    """New policy_version; the current one + 1 when omitted."""


class WeightsResponse(BaseModel):
    policy_version: int
