"""Weights a sampler reads straight from the learner's memory (`weight_transport: shared`).

The learner keeps one flat buffer for the whole model (`WeightBuffer`), copies the weights into
it at each push, and posts where the buffer lives and where each tensor sits in it
(`sampler.schema.WeightsShared`). The sampler maps the buffer once (`BufferMaps`) and copies each
tensor from it into its model. Nothing is serialised, nothing crosses HTTP but the layout, and
on a GPU nothing crosses the host:

    cpu    an anonymous in-memory file (`memfd_create`) that both map, the sampler through
           /proc/<learner pid>/fd/<n> (a sampler on the learner's host, run by its user)
    cuda   a CUDA allocation on the learner's GPU that the sampler opens by its CUDA IPC handle,
           the mechanism torch.multiprocessing passes CUDA tensors between processes with
           (a sampler on the learner's node that sees that GPU)

Why: every other transport moves the model through bytes on the host at each push. At a 0.5B
student that is 1-2 GB written, read and copied again per step, against steps of seconds; a
learner sharing a GPU with its sampler pays a device-to-host and a host-to-device copy on top.
Here a push is one copy into the buffer and one copy out of it, on the device.

The learner reuses the buffer while the tensors keep their names, shapes and dtypes, and writes
it only between pushes: a push returns after every sampler has copied out (the sampler waits for
its GPU copy before it answers).
"""

import base64
import contextlib
import math
import mmap
import os
import stat
import warnings
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from opd import torch_thread
from opd.errors import RequestError
from sampler.schema import CudaIpcHandle, SharedBuffer, SharedTensor
from sampler.staging import ProcFile

ALIGN = 256
"""Every tensor starts at a multiple of this many bytes: a view of any dtype, and aligned loads on a GPU."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a shared push carries (a model's floating-point weights)."""


def layout_of(tensors: dict[str, torch.Tensor]) -> list[SharedTensor]:
    """Where each tensor goes in one flat buffer: in order, each at an ALIGN boundary."""
    layout, offset = [], 0
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"a shared push carries {', '.join(DTYPES)}; {name} is {dtype}")
        layout.append(SharedTensor.model_validate({"name": name, "dtype": dtype, "shape": list(tensor.shape),
                                                   "offset": offset}))  # fmt: skip
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    return layout


def size_of(layout: list[SharedTensor]) -> int:
    return max((t.offset + _nbytes(t) for t in layout), default=0)


MEMFD_NAME = "opd-weights"
MEMFD_PREFIX = f"/memfd:{MEMFD_NAME}"
"""How the kernel names the learner's in-memory file: the sampler maps nothing else."""


class WeightBuffer:
    """The learner's side: one buffer on `device` that holds a push, and its handle."""

    def __init__(self, layout: list[SharedTensor], device: torch.device) -> None:
        self.layout, self.device = layout, device
        size = max(size_of(layout), 1)
        self._file: ProcFile | None = None
        if device.type == "cpu":
            self._file = ProcFile(os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC))
            os.ftruncate(self._file.fd, size)
            self._map = mmap.mmap(self._file.fd, size)
            self.flat = torch.frombuffer(self._map, dtype=torch.uint8)
        elif device.type == "cuda":
            self.flat = torch.empty(size, dtype=torch.uint8, device=device)
        else:
            raise ValueError(f"a shared push needs the learner's weights on cpu or cuda, not {device.type}")
        self.views = tensor_views(self.flat, layout)
        self._handle: SharedBuffer | None = None

    def fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether `tensors` have this buffer's names, shapes, dtypes and device (in order)."""
        return (
            len(tensors) == len(self.layout)
            and all(t.device.type == self.device.type for t in tensors.values())
            and layout_of(tensors) == self.layout
        )

    @torch.no_grad()
    def fill(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.device.type == "cpu" and self.flat.numel() < torch_thread.SMALL_WORK_BYTES:
            # byte copies by numpy, on this thread alone: torch's copies are parallel regions,
            # each of which waits for sleeping OpenMP workers (opd/torch_thread.alone_if_small)
            flat = self.flat.numpy()
            for entry, tensor in zip(self.layout, tensors.values(), strict=True):
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                flat[entry.offset : entry.offset + data.size] = data
            return
        for name, tensor in tensors.items():
            self.views[name].copy_(tensor)
        if self.device.type == "cuda":  # the sampler's process reads it on its own stream
            torch.cuda.synchronize(self.device)

    def handle(self) -> SharedBuffer:
        """Where the samplers find the buffer; the same for its whole life (each CUDA IPC export
        takes a slot that only the sampler's one import of it gives back)."""
        if self._handle is None:
            size = self.flat.numel()
            if self._file is not None:
                self._handle = SharedBuffer(kind="memfd", size=size, path=self._file.path)
            else:
                self._handle = SharedBuffer(kind="cuda", size=size, cuda=_ipc_handle(self.flat))
        return self._handle

    def close(self) -> None:
        self.views = {}
        if self._file is not None:
            del self.flat  # the map can close once no tensor views it
            with contextlib.suppress(BufferError):  # a view still held elsewhere: the map goes with it
                self._map.close()
            self._file.close()
            self._file = None


def _ipc_handle(flat: torch.Tensor) -> CudaIpcHandle:
    """`flat`'s allocation as torch.multiprocessing hands a CUDA tensor to another process."""
    _, args = reduce_tensor(flat)
    (_, _, _, tensor_offset, _, _, device, handle, storage_bytes, storage_offset, _, counter, counter_offset,
     event, event_sync) = args  # fmt: skip
    return CudaIpcHandle(
        device=device, handle=_b64(handle), storage_bytes=storage_bytes, storage_offset=storage_offset,
        tensor_offset=tensor_offset, ref_counter=_b64(counter), ref_counter_offset=counter_offset,
        event=None if event is None else _b64(event), event_sync_required=event_sync,
    )  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class _Mapped:
    key: tuple
    flat: torch.Tensor


class BufferMaps:
    """The sampler's side: the learner's buffer, mapped at its first push and kept while the
    pushes name the same one (a new learner's buffer replaces it)."""

    def __init__(self) -> None:
        self._mapped: _Mapped | None = None

    def open(self, buffer: SharedBuffer) -> torch.Tensor:
        if buffer.kind == "memfd":
            assert buffer.path is not None
            return self._open_file(buffer.path, buffer.size)
        assert buffer.cuda is not None
        return self._open_cuda(buffer.cuda, buffer.size)

    def _open_file(self, path: str, size: int) -> torch.Tensor:
        try:  # non-blocking: opening a FIFO would otherwise wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise RequestError(f"cannot open the learner's weight buffer {path}: {exc.strerror}",
                               param="buffer.path") from exc  # fmt: skip
        try:
            info = os.fstat(fd)
            # only a learner's buffer: not a device, a FIFO, or any other file the sampler could open
            if not stat.S_ISREG(info.st_mode) or not os.readlink(f"/proc/self/fd/{fd}").startswith(MEMFD_PREFIX):
                raise RequestError(f"{path} is not a learner's weight buffer", param="buffer.path")
            # mapped past the file's end, a read would kill the process (SIGBUS): the size is the file's
            if info.st_size < size:
                raise RequestError(f"{path} holds {info.st_size} bytes, not the {size} the push names",
                                   param="buffer.size")  # fmt: skip
            key = ("memfd", info.st_dev, info.st_ino)
            if self._mapped is None or self._mapped.key != key or self._mapped.flat.numel() != size:
                self._mapped = None  # the old map goes once nothing views it
                self._mapped = _Mapped(key, _read_only_map(fd, size))
            return self._mapped.flat
        except OSError as exc:  # a file that cannot be mapped
            raise RequestError(f"cannot map {path}: {exc.strerror or exc}", param="buffer.path") from exc
        finally:
            os.close(fd)

    def _open_cuda(self, ipc: CudaIpcHandle, size: int) -> torch.Tensor:
        key = ("cuda", ipc.device, ipc.handle, ipc.storage_offset)
        if self._mapped is not None and self._mapped.key == key and self._mapped.flat.numel() == size:
            return self._mapped.flat
        if not torch.cuda.is_available():
            raise RequestError("this sampler has no CUDA device to open the learner's weight buffer on",
                               param="buffer.cuda")  # fmt: skip
        if ipc.tensor_offset + size > ipc.storage_bytes:
            raise RequestError(f"a buffer of {size} bytes at {ipc.tensor_offset} exceeds its allocation of "
                               f"{ipc.storage_bytes}", param="buffer.size")  # fmt: skip
        self._mapped = None
        try:
            flat = rebuild_cuda_tensor(
                torch.Tensor, torch.Size([size]), (1,), ipc.tensor_offset, torch.storage.TypedStorage, torch.uint8,
                ipc.device, base64.b64decode(ipc.handle), ipc.storage_bytes, ipc.storage_offset, False,
                base64.b64decode(ipc.ref_counter), ipc.ref_counter_offset,
                None if ipc.event is None else base64.b64decode(ipc.event), ipc.event_sync_required,
            )  # fmt: skip
        except (RuntimeError, ValueError) as exc:  # a handle of another node, a freed allocation
            raise RequestError(f"cannot open the learner's CUDA weight buffer: {exc}", param="buffer.cuda") from exc
        self._mapped = _Mapped(key, flat)
        return flat


def _read_only_map(fd: int, size: int) -> torch.Tensor:
    """The file's pages, mapped read-only: the sampler cannot write the learner's weights (a write
    through the tensor would fault), and sees each push the learner writes into them."""
    memory = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # torch warns that a tensor on a read-only buffer is not
        warnings.simplefilter("ignore", UserWarning)  # protected from writes; nothing here writes
        return torch.frombuffer(memory, dtype=torch.uint8)


def tensor_views(flat: torch.Tensor, layout: list[SharedTensor]) -> dict[str, torch.Tensor]:
    """Each tensor of `layout` as a view into `flat`, after checking that it lies inside."""
    views = {}
    for t in layout:
        end = t.offset + _nbytes(t)
        if end > flat.numel():
            raise RequestError(f"{t.name} ends at byte {end}, past the buffer's {flat.numel()}",
                               param=f"tensors.{t.name}")  # fmt: skip
        if t.offset % ALIGN:
            raise RequestError(f"{t.name} starts at {t.offset}, not a multiple of {ALIGN}", param=f"tensors.{t.name}")
        if t.name in views:
            raise RequestError(f"{t.name} appears twice", param=f"tensors.{t.name}")
        views[t.name] = flat[t.offset : end].view(DTYPES[t.dtype]).view(t.shape)
    return views


def _nbytes(t: SharedTensor) -> int:
    return math.prod(t.shape) * DTYPES[t.dtype].itemsize
