"""The weight push's wire format (`sampler/wire.py`) against the safetensors library itself: the
same bytes out, the same tensors in, the same bodies refused; and no copy of the tensors."""

import asyncio
import json
import struct

import pytest
import torch
from safetensors.torch import load, save, save_file

from opd.errors import RequestError
from sampler.wire import CHUNK_BYTES, decode, decode_file, encode


def mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(CHUNK_BYTES // 4 + 7, generator=gen),  # over one chunk
        "layers.0.w": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "layers.0.b": torch.randn(5, generator=gen).half(),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "ids": torch.arange(7),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "fp8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
    }


def sent_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    body = encode(tensors, metadata)
    out = b"".join(bytes(chunk) for chunk in body.chunks())
    assert len(out) == body.size
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)  # bitwise: NaN-safe, and for dtypes torch cannot compare

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(raw(a[k]), raw(b[k])) for k in a
    )


@pytest.mark.parametrize("metadata", [None, {"adapter_config": '{"r": 8}', "format": "pt"}])
def test_a_body_written_here_loads_with_the_library(metadata):
    tensors = mixed_tensors()
    sent = sent_bytes(tensors, metadata)
    assert same(load(sent), tensors)
    (size,) = struct.unpack("<Q", sent[:8])
    header = json.loads(sent[8 : 8 + size])
    assert header.pop("__metadata__", None) == metadata and size % 8 == 0
    # every tensor starts at a multiple of its element size: views of it need no copy
    assert all(entry["data_offsets"][0] % tensors[name].element_size() == 0 for name, entry in header.items())


def test_a_body_read_here_gives_the_librarys_tensors_and_metadata():
    tensors = mixed_tensors()
    payload = save(tensors, {"k": "v"})
    ours, metadata = decode(payload)
    assert same(ours, load(payload)) and same(ours, tensors) and metadata == {"k": "v"}
    assert decode(save({"w": torch.ones(2)}))[1] == {}


def test_neither_side_copies_the_tensors():
    tensors = {"w": torch.zeros(4), "b": torch.zeros(2, dtype=torch.bfloat16)}
    body = encode(tensors)
    tensors["w"][1] = 3.0  # written after encoding: the body sends the tensor's own memory
    assert load(b"".join(bytes(c) for c in body.chunks()))["w"][1] == 3.0

    payload = bytearray(save({"w": torch.zeros(4)}))
    view = decode(payload)[0]["w"]
    payload[-4:] = struct.pack("<f", 7.0)  # the decoded tensor is a view into the received body
    assert view[-1] == 7.0


def test_a_body_can_be_sent_again_whole():
    """A retried push iterates the same body a second time."""
    body = encode(mixed_tensors())

    async def received() -> bytes:
        return b"".join([bytes(chunk) async for chunk in body])

    first = asyncio.run(received())
    assert first == asyncio.run(received()) and len(first) == body.size and same(load(first), mixed_tensors())


def header_body(header: object = None, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def f32(**fields) -> dict:
    return {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} | fields


MALFORMED = {
    "empty": b"",
    "shorter than the size field": b"\x01\x00\x00",
    "header past the end": struct.pack("<Q", 100) + b"{}",
    "header not JSON": header_body(raw=b"{nope"),
    "header not UTF-8": header_body(raw=b'{"\xff": 1}'),
    "header a JSON array": header_body([1, 2]),
    "a dtype torch lacks": header_body({"w": f32(dtype="F8_E8M0")}, b"\0" * 8),
    "size not the shape's": header_body({"w": f32(shape=[3])}, b"\0" * 8),
    "a gap": header_body({"a": f32(), "b": f32(data_offsets=[12, 20])}, b"\0" * 20),
    "an overlap": header_body({"a": f32(), "b": f32(data_offsets=[4, 12])}, b"\0" * 12),
    "bytes after the tensors": header_body({"w": f32()}, b"\0" * 12),
    "three offsets": header_body({"w": f32(data_offsets=[0, 8, 8])}, b"\0" * 8),
    "a negative dimension": header_body({"w": f32(shape=[-2])}, b"\0" * 8),
    "a string dimension": header_body({"w": f32(shape=["2"])}, b"\0" * 8),
    "a float dimension": header_body({"w": f32(shape=[2.0])}, b"\0" * 8),
    "no offsets": header_body({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "metadata not strings": header_body({"__metadata__": {"k": 1}, "w": f32()}, b"\0" * 8),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_body_the_library_refuses_is_refused_with_a_400_on_the_body(name):
    payload = MALFORMED[name]
    with pytest.raises(Exception):  # noqa: B017  the library raises its own SafetensorError
        load(payload)
    with pytest.raises(RequestError, match="body is not a valid safetensors file") as caught:
        decode(payload)
    assert caught.value.param == "body" and caught.value.status == 400


def test_what_the_library_accepts_is_accepted():
    assert decode(header_body({"w": f32(future_field=1)}, b"\0" * 8))[0]["w"].tolist() == [0.0, 0.0]
    assert decode(header_body({}))[0] == {}
    assert decode(header_body({"__metadata__": None, "w": f32()}, b"\0" * 8))[1] == {}


def test_a_file_is_read_through_its_memory_map(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "w.safetensors", {"k": "v"})
    read, metadata = decode_file(str(tmp_path / "w.safetensors"))
    assert same(read, tensors) and metadata == {"k": "v"}
    read["ids"][0] = 99  # copy-on-write: a loader that writes into a tensor never reaches the file
    assert load((tmp_path / "w.safetensors").read_bytes())["ids"][0] == 0

    for name, content in [("empty", b""), ("bad", MALFORMED["an overlap"])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RequestError, match=f"{tmp_path / name} is not a valid safetensors file") as caught:
            decode_file(str(tmp_path / name))
        assert caught.value.param == "path"
