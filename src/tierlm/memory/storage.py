"""An Engram table: `rows` x `dim` values in one storage, on one of three backends.

    device  a tensor on the compute device (fastest; costs device memory)
    host    a CPU tensor (pinned when CUDA is present, so gathered rows copy asynchronously)
    mmap    a file on disk, memory-mapped (tables larger than RAM; the page cache holds the hot rows)

`gather(rows)` returns [N, dim] fp32 on the requested device whatever the backend. A table file is raw rows in the
stored dtype next to a JSON header (rows, dim, dtype, byte size); a file whose size disagrees with its header is
refused as corrupt (the caller rebuilds or retrains), never read. A V4-mini checkpoint keeps its tables in a
safetensors file instead (`from_safetensors`): one format for every tensor a model ships, mapped in place.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch

from tierlm.core.errors import CorruptModelError, InvalidParameterError

BACKENDS = ("device", "host", "mmap")
_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
_ST_DTYPES = {"F32": "float32", "F16": "float16"}  # safetensors' names


class EngramTable:
    def __init__(self, data: torch.Tensor, backend: str, path: Path | None = None, offset: int | None = None):
        self.data, self.backend, self.path = data, backend, path
        self.rows, self.dim = data.shape
        # a table mapped from `path` with row 0 at byte `offset`: gather first asks the kernel to read the rows' pages
        # (POSIX_FADV_WILLNEED, all at once), so a cold read costs one disk round trip, not one per row
        self.offset = offset if backend == "mmap" and path is not None else None
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # the prefetch worker and the layer may gather from one table at once

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

    @classmethod
    def from_safetensors(cls, path: str | Path, name: str, backend: str = "mmap", device: str | torch.device = "cpu",
                         shape: tuple[int, int] | None = None) -> "EngramTable":
        """Tensor `name` of a safetensors file as a table: memory-mapped read-only in place ("mmap"), read into host
        memory ("host", pinned on CUDA) or onto `device`. `shape`, when given, must match; a missing tensor, another
        dtype than F32/F16 or data running past the file is a CorruptModelError."""
        if backend not in BACKENDS:
            raise InvalidParameterError(f"unknown Engram table backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        path = Path(path)
        fix = f"re-export or retrain the model whose tables are in {path}"
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            info = header[name]
            dtype, (rows, dim), (lo, hi) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except FileNotFoundError as exc:
            raise CorruptModelError(f"Engram table file {path} is missing", fix) from exc
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise CorruptModelError(f"{path} holds no readable Engram table {name!r} ({type(exc).__name__}: {exc})",
                                    fix) from exc
        if shape is not None and (rows, dim) != tuple(shape):
            raise CorruptModelError(f"Engram table {name} in {path} is {rows} x {dim}, the config implies "
                                    f"{shape[0]} x {shape[1]}", fix)
        ndtype = _DTYPES[dtype][1]
        start = 8 + n + lo
        if hi - lo != rows * dim * np.dtype(ndtype).itemsize or start + hi - lo > path.stat().st_size:
            raise CorruptModelError(f"Engram table {name} in {path} is truncated", fix)
        if backend == "mmap":
            # Copy-on-write (a tensor torch may write to; the file never changes), read in the rows' random order:
            # MADV_RANDOM stops the kernel reading around each faulted page, which for scattered rows is waste.
            with open(path, "rb") as fh:
                mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mapping.madvise(mmap.MADV_RANDOM)
            arr = np.frombuffer(mapping, dtype=ndtype, count=rows * dim, offset=start).reshape(rows, dim)
            return cls(torch.from_numpy(arr), backend, path, start)
        arr = np.memmap(path, dtype=ndtype, mode="c", offset=start, shape=(rows, dim))
        data = torch.from_numpy(np.array(arr))
        if backend == "device":
            return cls(data.to(device), backend, path)
        if backend == "host" and torch.cuda.is_available():
            data = data.pin_memory()
        return cls(data, backend, path)

    def advise(self, rows: torch.Tensor) -> None:
        """Ask the kernel to start reading the pages that hold `rows` (a mapped table; a no-op otherwise). Pages
        already in the page cache cost a syscall per run of pages and nothing else."""
        if self.offset is None or not rows.numel():
            return
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
        size = self.dim * self.data.element_size()
        first = (self.offset + rows.numpy().astype(np.int64) * size)
        pages = np.unique(np.concatenate([first // mmap.PAGESIZE, (first + size - 1) // mmap.PAGESIZE]))
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for run in np.split(pages, breaks):
            os.posix_fadvise(self._fd, int(run[0]) * mmap.PAGESIZE, run.size * mmap.PAGESIZE, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def gather(self, rows: torch.Tensor, device: str | torch.device = "cpu",
               out: torch.Tensor | None = None) -> torch.Tensor:
        """rows [N] int64 -> [N, dim] fp32 on `device` (into `out` when given). IndexError outside the table."""
        flat = rows.reshape(-1).to(self.data.device if self.backend == "device" else "cpu", torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.rows):
            raise IndexError(f"Engram row outside the table [0, {self.rows})")
        self.advise(flat)
        got = self.data.index_select(0, flat).float()
        if out is not None:
            out.copy_(got, non_blocking=True)
            return out
        return got.to(device, non_blocking=True)


def drop_page_cache(path: str | Path) -> None:
    """Evict a table file from the OS page cache, so the next reads of its rows go to the disk: a cold start. Pages
    a process has mapped and touched stay; call it before serving from the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages (a file just written) are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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
