"""A weight push on the wire: safetensors written from the tensors' own memory, and read back as
views into the received body (or a mapped file), with no whole-model copy on either side.

    body = encode(tensors, metadata)            # the learner: header + the tensors' memory, in order
    tensors, metadata = decode(payload)         # the sampler: views into `payload`, checked

The safetensors library serialises into one new byte string and deserialises into new tensors.
For a Qwen2.5-1.5B-shaped bf16 push on 2 cores `save` took 5.4 s and `load` 1.1 s, and each held
another copy of the model on the host (16 GB at 8B), on every step of the loop
(`bench/push_check.py`). The format is small enough to write and read here: an unsigned
little-endian 64-bit header size, a JSON header (name -> dtype, shape and [begin, end) byte
offsets into the data; an optional `__metadata__` of strings) padded with spaces to 8 bytes,
then the tensors' bytes back to back. A body is read as strictly as the library reads one
(offsets that tile the data exactly, sizes that match shapes, dtypes it knows): anything else is
a RequestError (400). Bodies written here load with the library and the other way round
(tests/test_wire.py). Little-endian hosts only, as every host opd runs on.
"""

import json
import math
import mmap
import struct
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from opd.errors import RequestError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
"""The safetensors dtype names the library maps to torch (others, e.g. F8_E8M0, are refused)."""
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000
"""The library's own limit on the JSON header."""
CHUNK_BYTES = 4 * 2**20
"""About what the body yields at a time: a push holds a chunk, not a copy of the model, in transit."""
METADATA_KEY = "__metadata__"

assert sys.byteorder == "little", "opd's weight wire format assumes a little-endian host"


Count = Annotated[int, Field(strict=True, ge=0)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # other fields: ignored, as the library does
    dtype: str
    shape: list[Count]
    data_offsets: Annotated[list[Count], Field(min_length=2, max_length=2)]


_ENTRIES = TypeAdapter(dict[str, _Entry])
_METADATA = TypeAdapter(dict[str, str] | None, config=ConfigDict(strict=True))


@dataclass(frozen=True)
class Body:
    """A safetensors body as buffers to send in order: the header, then each tensor's memory.
    Iterable any number of times (a retried push sends it again); `size` is its Content-Length."""

    parts: list[memoryview]
    size: int

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces of about CHUNK_BYTES, each copied once (small tensors share a
        piece, so a push is a few socket writes, not one per tensor); HTTP/1.1's writer then sends
        a `bytes` piece as it is."""
        pieces: list[memoryview] = []
        held = 0
        for part in self.parts:
            for start in range(0, len(part), CHUNK_BYTES):
                piece = part[start : start + CHUNK_BYTES]
                pieces.append(piece)
                held += len(piece)
                if held >= CHUNK_BYTES:
                    yield b"".join(pieces)
                    pieces, held = [], 0
        if pieces:
            yield b"".join(pieces)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks():
            yield chunk

    def write_to(self, path: Path) -> None:
        with open(path, "wb") as file:
            for part in self.parts:
                file.write(part)


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Body:
    """`tensors` (contiguous CPU tensors) as a safetensors body that shares their memory. As the
    library does, larger dtypes come first, so every tensor starts at a multiple of its size."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {METADATA_KEY: metadata} if metadata else {}
    parts, offset = [], 0
    for name in order:
        tensor = tensors[name]
        if not (tensor.device.type == "cpu" and tensor.is_contiguous()):
            raise ValueError(f"{name}: only contiguous CPU tensors can be sent as they are")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        if size:
            parts.append(tensor.detach().reshape(-1).view(torch.uint8).numpy().data)  # the memory itself
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = memoryview(struct.pack("<Q", len(text)) + text)
    return Body([head, *parts], len(head) + offset)


Buffer = bytes | bytearray | memoryview | mmap.mmap
Decoded = tuple[dict[str, torch.Tensor], dict[str, str]]
"""Tensors by name, and the header's metadata."""


def decode(payload: Buffer, *, what: str = "body", param: str = "body") -> Decoded:
    """The tensors of a safetensors body, as views into `payload` (which they keep alive), and its
    metadata; RequestError (400, `param`) if it is not a valid safetensors file."""
    invalid = partial(_invalid, what, param)
    size = len(payload)
    if size < 8:
        raise invalid(f"{size} bytes, shorter than the 8-byte header size")
    (header_size,) = struct.unpack_from("<Q", payload, 0)
    if header_size > min(MAX_HEADER_BYTES, size - 8):
        raise invalid(f"a header of {header_size} bytes in a body of {size}")
    try:
        header = json.loads(bytes(payload[8 : 8 + header_size]))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise invalid(f"its header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise invalid("its header is not a JSON object")
    try:
        metadata = _METADATA.validate_python(header.pop(METADATA_KEY, None)) or {}
    except ValidationError as exc:
        raise invalid(f"its {METADATA_KEY} {_first_error(exc)}") from exc
    try:
        entries = _ENTRIES.validate_python(header)
    except ValidationError as exc:
        raise invalid(f"its header {_first_error(exc)}") from exc
    start = 8 + header_size
    problem = _layout_problem(entries, size - start)
    if problem:
        raise invalid(problem)
    return {name: _view(payload, start, entry) for name, entry in entries.items()}, metadata


def decode_file(path: str, shown: str | None = None) -> Decoded:
    """A safetensors file's tensors as views into its memory map (pages are read when used); the
    caller has checked that `path` is a file. Errors name it `shown` (default: `path`)."""
    what = shown or path
    with open(path, "rb") as file:
        if Path(path).stat().st_size == 0:
            raise _invalid(what, "path", "the file is empty")
        # copy-on-write: a loader that writes into a tensor it was given never reaches the file
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    return decode(mapped, what=what, param="path")


def _layout_problem(entries: dict[str, _Entry], data_size: int) -> str | None:
    """Unknown dtypes, or byte ranges that do not match the shapes or do not tile the data exactly."""
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].data_offsets):
        if entry.dtype not in DTYPES:
            return f"tensor {name} has dtype {entry.dtype}, which torch cannot hold"
        begin, stop = entry.data_offsets
        expected = math.prod(entry.shape) * DTYPES[entry.dtype].itemsize
        if begin != end or stop - begin != expected:
            return f"tensor {name} spans bytes [{begin}, {stop}) where [{end}, {end + expected}) was due"
        end = stop
    if end != data_size:
        return f"the tensors take {end} bytes of data; the body holds {data_size}"
    return None


def _view(payload: Buffer, start: int, entry: _Entry) -> torch.Tensor:
    dtype, (begin, stop) = DTYPES[entry.dtype], entry.data_offsets
    if stop == begin:  # frombuffer refuses zero-size views
        return torch.empty(entry.shape, dtype=dtype)
    with warnings.catch_warnings():
        # A read-only body (bytes, as the vLLM worker and tests hand it): the views are only read.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(payload, dtype=dtype, count=(stop - begin) // dtype.itemsize, offset=start + begin)
    return flat.view(entry.shape)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"at {'.'.join(map(str, first['loc'])) or 'top'}: {first['msg']}"


def _invalid(what: str, param: str, reason: str) -> RequestError:
    return RequestError(f"{what} is not a valid safetensors file: {reason}", param=param)
