"""An Engram table: `rows` x `dim` values in one storage, on one of three backends.

    device  a tensor on the compute device (fastest; costs device memory)
    host    a CPU tensor (pinned when CUDA is present, so gathered rows copy asynchronously)
    mmap    a file on disk, memory-mapped (tables larger than RAM; the page cache holds the hot rows)

`gather(rows)` returns [N, dim] fp32 on the requested device whatever the backend. A table file is raw rows in the
stored dtype next to a JSON header (rows, dim, dtype, byte size); a file whose size disagrees with its header is
refused as corrupt (the caller rebuilds or retrains), never read.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tierlm.core.errors import CorruptModelError, InvalidParameterError

BACKENDS = ("device", "host", "mmap")
_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


class EngramTable:
    def __init__(self, data: torch.Tensor, backend: str, path: Path | None = None):
        self.data, self.backend, self.path = data, backend, path
        self.rows, self.dim = data.shape

    @classmethod
    def create(cls, rows: int, dim: int, backend: str = "host", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, path: str | Path | None = None, init_std: float = 0.0,
               seed: int = 0) -> "EngramTable":
        """A new table (zeros, or N(0, init_std) from `seed`); mmap needs `path` (written there)."""
        if backend not in BACKENDS:
            raise InvalidParameterError(f"unknown Engram table backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        values = torch.zeros(rows, dim, dtype=dtype)
        if init_std:
            values = (torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * init_std).to(dtype)
        if backend == "mmap":
            if path is None:
                raise InvalidParameterError("an mmap Engram table needs a file path", "pass path=...")
            save_table(path, values)
            return cls.open(path)
        if backend == "device":
            return cls(values.to(device), backend)
        if torch.cuda.is_available():
            values = values.pin_memory()
        return cls(values, backend)

    @classmethod
    def open(cls, path: str | Path) -> "EngramTable":
        """A saved table, memory-mapped read/write."""
        path = Path(path)
        header = _read_header(path)
        tdtype, ndtype = _DTYPES[header["dtype"]]
        arr = np.memmap(path, dtype=ndtype, mode="r+", shape=(header["rows"], header["dim"]))
        return cls(torch.from_numpy(arr), "mmap", path)

    def gather(self, rows: torch.Tensor, device: str | torch.device = "cpu",
               out: torch.Tensor | None = None) -> torch.Tensor:
        """rows [N] int64 -> [N, dim] fp32 on `device` (into `out` when given). IndexError outside the table."""
        flat = rows.reshape(-1).to(self.data.device if self.backend == "device" else "cpu", torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.rows):
            raise IndexError(f"Engram row outside the table [0, {self.rows})")
        got = self.data.index_select(0, flat).float()
        if out is not None:
            out.copy_(got, non_blocking=True)
            return out
        return got.to(device, non_blocking=True)


def _header_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_table(path: str | Path, values: torch.Tensor) -> None:
    """Rows to `path` (raw) and `path`.json (the header), the file written first and renamed into place."""
    path = Path(path)
    name = str(values.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise InvalidParameterError(f"Engram tables are float32 or float16, not {name}", "convert the table")
    tmp = path.with_name(path.name + ".tmp")
    values.contiguous().numpy().tofile(tmp)
    tmp.replace(path)
    header = {"rows": int(values.shape[0]), "dim": int(values.shape[1]), "dtype": name,
              "bytes": int(values.numel() * values.element_size())}
    _header_path(path).write_text(json.dumps(header))


def _read_header(path: Path) -> dict:
    try:
        header = json.loads(_header_path(path).read_text())
        rows, dim, dtype, size = header["rows"], header["dim"], header["dtype"], header["bytes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptModelError(f"Engram table {path} has no readable header ({exc})", "rebuild or retrain the table")
    if dtype not in _DTYPES or size != rows * dim * np.dtype(_DTYPES[dtype][1]).itemsize:
        raise CorruptModelError(f"Engram table header {_header_path(path)} is inconsistent", "rebuild the table")
    actual = path.stat().st_size if path.exists() else -1
    if actual != size:
        raise CorruptModelError(f"Engram table {path} holds {actual} bytes, its header says {size}",
                                "the file is truncated or from another table: rebuild or retrain it")
    return header
