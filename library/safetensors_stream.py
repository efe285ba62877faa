"""Write a ``.safetensors`` file one tensor at a time, atomically.

``safetensors.torch.save_file`` needs every tensor in memory at once; merging a LoRA into a
multi-GB checkpoint should not. The format is simple (https://github.com/huggingface/safetensors):
an 8-byte little-endian header length, a JSON header (padded with spaces to a multiple of 8)
giving each tensor's dtype, shape and byte range, then the raw little-endian bytes in header
order. Since the shapes and dtypes are known before any data is produced, the header is written
first and each tensor's bytes follow as soon as it exists; the peak memory is one tensor.

The file is written under a temporary name in the destination folder, flushed to disk, and
renamed into place only when every tensor was written: an interrupted merge never leaves a
truncated checkpoint under the final name.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """Write tensors in a fixed order, each as soon as it is computed.

    Usage::

        layout = [(name, dtype, shape), ...]
        with StreamingSafetensorsWriter(path, layout, metadata) as writer:
            for name, dtype, shape in layout:
                writer.write(name, compute(name))

    Leaving the ``with`` block normally renames the finished file into place; an exception (or
    a missing tensor) removes the temporary file and leaves any existing file at ``path`` alone.

    Args:
        path: destination ``.safetensors`` file.
        layout: ``(name, dtype, shape)`` of every tensor, in the order they will be written.
        metadata: string-to-string metadata (``__metadata__``), or None.
    """

    def __init__(self, path: str | os.PathLike[str], layout: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.layout = [(name, dtype, tuple(int(size) for size in shape)) for name, dtype, shape in layout]
        names = [name for name, _, _ in self.layout]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the layout")
        self.metadata = {str(key): str(value) for key, value in (metadata or {}).items()}
        self._next = 0
        self._handle = None
        self._temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def _header(self) -> bytes:
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        offset = 0
        for name, dtype, shape in self.layout:
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        data = json.dumps(header, separators=(",", ":")).encode("utf-8")
        data += b" " * (-len(data) % 8)
        return len(data).to_bytes(8, "little") + data

    def __enter__(self) -> StreamingSafetensorsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self._temp, "wb")  # noqa: SIM115 - closed in __exit__
        self._handle.write(self._header())
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout (its name, dtype and shape must match)."""
        if self._handle is None:
            raise RuntimeError("use the writer in a with block")
        if self._next >= len(self.layout):
            raise ValueError(f"{name}: every tensor of the layout was already written")
        expected, dtype, shape = self.layout[self._next]
        if name != expected:
            raise ValueError(f"tensors must be written in layout order: expected {expected}, got {name}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
                raise RuntimeError("big-endian machines are not supported")
            self._handle.write(data.view(torch.uint8).numpy().data)
        self._next += 1

    def __exit__(self, kind, value, traceback) -> None:
        handle, self._handle = self._handle, None
        complete = kind is None and self._next == len(self.layout)
        try:
            if handle is not None:
                if complete:
                    handle.flush()
                    os.fsync(handle.fileno())
                handle.close()
            if complete:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self._temp, 0o666 & ~umask)
                os.replace(self._temp, self.path)
        finally:
            self._temp.unlink(missing_ok=True)
        if kind is None and not complete:
            missing = len(self.layout) - self._next
            raise ValueError(f"{missing} tensors were not written (first: {self.layout[self._next][0]}); nothing was saved")


class SafetensorsReader:
    """Read a ``.safetensors`` file's header, then single tensors with plain reads (no memory map).

    ``safetensors.safe_open`` memory-maps the file; reading every tensor of a multi-GB checkpoint
    through the map leaves the whole file resident in the process (file-backed pages count towards
    its RSS until the kernel reclaims them). Reading each tensor into a fresh buffer keeps the
    process at one tensor.

    Args:
        path: the file.

    Raises:
        ValueError: the file is not a well-formed safetensors file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise ValueError("file too short for a safetensors header")
            length = int.from_bytes(head, "little")
            size = self.path.stat().st_size
            if length > min(size - 8, 100 * 2**20):
                raise ValueError("header length out of range")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._data_start = 8 + length
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES_BY_NAME[info["dtype"]]
                shape = tuple(int(size) for size in info["shape"])
                begin, end = (int(offset) for offset in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"bad header entry for {name!r}") from None
            if end - begin != _nbytes(dtype, shape) or self._data_start + end > size:
                raise ValueError(f"bad data offsets for {name!r}")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self.entries, key=lambda name: self.entries[name][2])

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into a new CPU tensor."""
        dtype, shape, begin, end = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            with open(self.path, "rb") as handle:
                handle.seek(self._data_start + begin)
                view = tensor.reshape(-1).view(torch.uint8).numpy()
                if handle.readinto(memoryview(view)) != end - begin:
                    raise ValueError(f"{self.path.name}: truncated data for {name!r}")
        return tensor
