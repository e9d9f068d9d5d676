"""Bounds-checked access to (possibly sharded) safetensors checkpoints.

Files are untrusted: the header is parsed and every tensor's byte range checked against the file size before
safetensors memory-maps it, so a truncated or corrupt file gives an error naming the file and the tensor.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, FormatError

DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path}: corrupt or truncated safetensors header (says {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not an object)")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not (isinstance(start, int) and isinstance(end, int)):
            raise FormatError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        info = TensorInfo(name, dtype, shape, path)
        if end - start != info.nbytes or start < 0:
            raise FormatError(f"{path}: tensor {name!r}: byte range {start}..{end} does not match {dtype}{list(shape)}")
        if end > data_len:
            raise FormatError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"but the file holds only {data_len} data bytes"
            )
        out[name] = info
    return out


class CheckpointFiles:
    """All tensors of a checkpoint directory (single `model.safetensors` or sharded with an index)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        files: list[Path]
        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").is_file():
            idx_file = path / "model.safetensors.index.json"
            try:
                index = json.loads(idx_file.read_text(encoding="utf-8"))
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise FormatError(f"{idx_file}: corrupt index (expected JSON with a 'weight_map' object)") from None
            names = sorted(set(weight_map.values()))
            files = [path / n for n in names]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{idx_file}: shard {f.name} listed in the index is missing")
            self._index = {k: path / v for k, v in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {self.tensors[name].file.name}")
                self.tensors[name] = info
        if hasattr(self, "_index"):
            for name, f in self._index.items():
                if name not in self.tensors:
                    raise CheckpointError(f"index lists {name!r} in {f.name}, but that shard does not contain it")
                if self.tensors[name].file != f:
                    raise CheckpointError(f"index lists {name!r} in {f.name}, found in {self.tensors[name].file.name}")
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (memory-mapped read of just its bytes)."""
        info = self.tensors[name]
        h = self._handles.get(info.file)
        if h is None:
            try:
                h = safe_open(str(info.file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise FormatError(f"{info.file}: cannot open as safetensors: {e}") from None
            self._handles[info.file] = h
        try:
            return h.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as e:
            raise FormatError(f"{info.file}: cannot read tensor {name!r}: {e}") from None

    def close(self) -> None:
        self._handles.clear()
