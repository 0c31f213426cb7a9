"""Native CPU kernels (cpu.c): built once with the system C compiler, loaded with ctypes, self-checked, or not used.

    paged_decode(q, kv_cache, block_tables, seq_lens, scale)   decode attention reading K/V blocks in place
    add_rms_norm(x, residual, weight, eps)                      fused residual add + RMSNorm

Both take fp32 CPU tensors; callers ask `usable(*tensors)` first and otherwise run their PyTorch path,
which stays the reference (the tests compare the two). The shared library is compiled at first use
($CC, else cc, else gcc; -O3 -march=native -fopenmp) into `<cache root>/kernels/` (the root converted
models use: $TIERLM_CACHE_DIR or the user cache dir), named by a hash of the source, flags, compiler and
CPU, written to a temp file and renamed, so concurrent first uses cannot load a half-written file. No
compiler, a failed build or a failed self-check: the PyTorch paths are used, logged once.
TIERLM_CPU_KERNELS=0 turns the kernels off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tierlm.paths import cache_root

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LIBS = ["-lmvec", "-lm"]
ENV_SWITCH = "TIERLM_CPU_KERNELS"
_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
        src, " ".join(FLAGS + LIBS), version, _cpu_signature(), platform.machine()))).hexdigest()[:16]
    out_dir = cache_root() / "kernels"
    target = out_dir / f"cpu-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_status: dict = {}


def status() -> dict:
    """{"native": bool, "library": path or None, "reason": why the PyTorch paths are used, or None};
    builds the kernels if that has not happened yet (for `tierlm info`)."""
    _library()
    return dict(_status)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded, self-checked kernels, or None (logged once; `status()` says why)."""
    lib = _load()
    _status["native"] = lib is not None
    return lib


def _load() -> ctypes.CDLL | None:
    _status.update(library=None, reason=None)
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _status["reason"] = f"turned off by {ENV_SWITCH}=0"
        return None
    cc = _compiler()
    if cc is None:
        _status["reason"] = "no C compiler found ($CC, cc or gcc)"
        log.info("no C compiler found; tierlm uses its PyTorch paths for decode attention and RMSNorm")
        return None
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = str(getattr(e, "stderr", "") or e)[:500]
        _status["reason"] = f"build failed: {detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__}"
        log.warning("building tierlm's CPU kernels failed (%s); using the PyTorch paths", detail)
        return None
    _status["library"] = str(path)
    lib.tierlm_paged_decode_f32.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32]
    lib.tierlm_paged_decode_f32.restype = ctypes.c_int
    lib.tierlm_add_rms_norm_f32.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _F32]
    lib.tierlm_add_rms_norm_f32.restype = None
    if not _self_check(lib):
        _status["reason"] = "self-check against the PyTorch definitions failed"
        log.warning("tierlm's CPU kernels failed their self-check; using the PyTorch paths")
        return None
    return lib


def usable(*tensors: torch.Tensor) -> bool:
    """True when every tensor is fp32 on the CPU and the kernels are built and checked."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _library() is not None


# ---- decode attention ----------------------------------------------------------------------------------
def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float) -> torch.Tensor | None:
    """q: [Nd, Hq, D] -> out [Nd, Hq, D]; None when the shape does not fit the kernel (use the torch path).

    kv_cache: one layer, [2, num_blocks, block_size, Hkv, D]; block_tables: [Nd, max_blocks] int64;
    seq_lens: [Nd] int64, each in 1 .. max_blocks * block_size (the new token's K/V already written)."""
    lib = _library()
    q, kv_cache = q.contiguous(), kv_cache.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    nd, hq, d = q.shape
    _, nb, bs, hkv, _ = kv_cache.shape
    out = torch.empty_like(q)
    rc = lib.tierlm_paged_decode_f32(q.data_ptr(), kv_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
                                     out.data_ptr(), nd, hq, hkv, d, nb, bs, block_tables.shape[1], float(scale))
    return None if rc else out


def reference_decode(q, kv_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """Dense attention per sequence (the definition the kernel must match)."""
    nd, hq, d = q.shape
    hkv = kv_cache.shape[3]
    outs = []
    for n in range(nd):
        length = int(seq_lens[n])
        kv = kv_cache[:, block_tables[n]].reshape(2, -1, hkv, d)[:, :length]  # [2, L, Hkv, D]
        k = kv[0].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = kv[1].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        p = (q[n].unsqueeze(1) @ k.transpose(1, 2) * scale).softmax(-1)  # [Hq, 1, L]
        outs.append((p @ v).squeeze(1))
    return torch.stack(outs)


# ---- RMSNorm -------------------------------------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); without a residual, (rms_norm(x) * weight, x)."""
    lib = _library()
    dim = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    if residual is None:
        lib.tierlm_add_rms_norm_f32(x.data_ptr(), None, weight.contiguous().data_ptr(), out.data_ptr(), None,
                                    x.numel() // dim, dim, float(eps))
        return out, x
    residual = residual.contiguous()
    new_res = torch.empty_like(x)
    lib.tierlm_add_rms_norm_f32(x.data_ptr(), residual.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(),
                                new_res.data_ptr(), x.numel() // dim, dim, float(eps))
    return out, new_res


def _self_check(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, hq, d = 9, 4, 2, 6, 16
    kv = torch.randn(2, nb, bs, hkv, d, generator=g)
    tables = torch.tensor([[3, 7, 1], [8, 0, 0], [2, 5, 6]])
    lens = torch.tensor([10, 1, 12])
    q = torch.randn(3, hq, d, generator=g)
    out = torch.empty_like(q)
    rc = lib.tierlm_paged_decode_f32(q.data_ptr(), kv.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
                                     3, hq, hkv, d, nb, bs, 3, 0.25)
    ok = rc == 0 and torch.allclose(out, reference_decode(q, kv, tables, lens, 0.25), atol=1e-5, rtol=1e-5)
    x, r, w = (torch.randn(5, 24, generator=g) for _ in range(3))
    y, s = torch.empty_like(x), torch.empty_like(x)
    lib.tierlm_add_rms_norm_f32(x.data_ptr(), r.data_ptr(), w[0].contiguous().data_ptr(), y.data_ptr(), s.data_ptr(),
                                5, 24, 1e-6)
    ok = ok and torch.equal(s, x + r) and torch.allclose(
        y, torch.nn.functional.rms_norm(x + r, (24,), w[0], 1e-6), atol=1e-5, rtol=1e-5)
    return ok
