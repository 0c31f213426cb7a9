"""Native CPU kernels (cpu.c): built once with the system C compiler, loaded with ctypes, self-checked, or not used.

    paged_decode(q, kv_cache, block_tables, seq_lens, scale)   decode attention reading K/V blocks in place
    paged_decode_fp8(q, data, scales, fp8, scale_type,         the same over an FP8 KV cache (e4m3 / e5m2
                     block_tables, seq_lens, scale)             bytes, fp32 / UE8M0 scales), read in place
    add_rms_norm(x, residual, weight, eps)                      fused residual add + RMSNorm
    quest_select(q, key_min, key_max, block_tables, seq_lens,   Quest sparse block selection for a batch
                 block_size, sink, window, budget, scale)       of decodes (attention/sparse.py), key
                                                                bounds read in place

They take fp32 CPU tensors (the FP8 kernel: an fp32 q and a 1-byte data tensor); callers ask
`usable(*tensors)` (`usable_fp8(q, data)`) first and otherwise run their PyTorch path, which stays the
reference (`reference_decode`, `reference_decode_fp8`; the tests compare the two). The FP8 kernel widens
each token's K / V row to fp32 once (bit tricks onto fp16, then the AVX-512 / F16C conversion, else a
table), applies its fp32 or UE8M0 scales (per token and group, or static per layer and head), and runs
the fp32 kernel's running softmax; on AVX-512 it works in 16-token tiles with FMA dot products reduced 16
at a time. The shared library is compiled at first use ($CC, else cc, else gcc; -O3 -march=native
-fopenmp) into `<cache root>/kernels/` (the root converted models use: $TIERLM_CACHE_DIR or the user
cache dir), named by a hash of the source, flags, compiler and CPU, written to a temp file and renamed, so
concurrent first uses cannot load a half-written file. No compiler, a failed build or a failed self-check:
the PyTorch paths are used, logged once.
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
SOURCES = (SOURCE, Path(__file__).with_name("quant.c"))  # one library; quant.c: weight-quantized matmul
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LIBS = ["-lmvec", "-lm"]
ENV_SWITCH = "TIERLM_CPU_KERNELS"
_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


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
    src = b"\0".join(p.read_bytes() for p in SOURCES)
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
        subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, *LIBS], check=True, capture_output=True, text=True,
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
    _declare(lib)
    if not _self_check(lib):
        _status["reason"] = "self-check against the PyTorch definitions failed"
        log.warning("tierlm's CPU kernels failed their self-check; using the PyTorch paths")
        return None
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures, for ctypes."""
    lib.tierlm_paged_decode_f32.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _P, _I64]
    lib.tierlm_paged_decode_f32.restype = ctypes.c_int
    lib.tierlm_paged_decode_fp8.argtypes = [_P, _P, _P, _INT, _INT, _I64, _I64, _I64, _I64, _I64, _P, _P, _P,
                                            _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _P, _P, _I64]
    lib.tierlm_paged_decode_fp8.restype = ctypes.c_int
    lib.tierlm_fp8_widen.argtypes = [_P, _P, _I64, _INT, _F32]
    lib.tierlm_fp8_widen.restype = ctypes.c_int
    lib.tierlm_add_rms_norm_f32.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _F32]
    lib.tierlm_add_rms_norm_f32.restype = None
    lib.tierlm_quest_select.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                                        _I64, _I64, _I64, _F32]
    lib.tierlm_quest_select.restype = ctypes.c_int
    lib.tierlm_index_select.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                                        _I64, _I64, _I64, _F32]
    lib.tierlm_index_select.restype = ctypes.c_int
    lib.tierlm_fp8_vector_width.argtypes = []
    lib.tierlm_fp8_vector_width.restype = ctypes.c_int


def usable(*tensors: torch.Tensor) -> bool:
    """True when every tensor is fp32 on the CPU and the kernels are built and checked."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _library() is not None


# ---- decode attention ----------------------------------------------------------------------------------
def _spill_rows(spill: torch.Tensor | None, like: torch.Tensor) -> tuple[int, int]:
    """(pointer, blocks) of a spill store's layer part [2, ns, bs, Hkv, D] shaped like the cache `like`; (0, 0)
    for none."""
    if spill is None:
        return 0, 0
    if (spill.shape[0] != 2 or spill.shape[2:] != like.shape[2:] or spill.element_size() != like.element_size()
            or spill.device.type != "cpu" or not spill.is_contiguous()):
        raise ValueError(f"spill store part {tuple(spill.shape)} {spill.dtype} does not fit the cache "
                         f"{tuple(like.shape)} {like.dtype} (contiguous, on the CPU)")
    return spill.data_ptr(), spill.shape[1]


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, spill: torch.Tensor | None = None) -> torch.Tensor | None:
    """q: [Nd, Hq, D] -> out [Nd, Hq, D]; None when the shape does not fit the kernel (use the torch path).

    kv_cache: one layer, [2, num_blocks, block_size, Hkv, D]; block_tables: [Nd, max_blocks] int64;
    seq_lens: [Nd] int64, each in 1 .. max_blocks * block_size (the new token's K/V already written).
    spill: the layer's spill store rows [2, num_spill, block_size, Hkv, D] (kvcache/spill.py): table ids
    >= num_blocks read block id - num_blocks there, in place."""
    lib = _library()
    q, kv_cache = q.contiguous(), kv_cache.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    nd, hq, d = q.shape
    _, nb, bs, hkv, _ = kv_cache.shape
    sp, ns = _spill_rows(spill, kv_cache)
    out = torch.empty_like(q)
    rc = lib.tierlm_paged_decode_f32(q.data_ptr(), kv_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
                                     out.data_ptr(), nd, hq, hkv, d, nb, bs, block_tables.shape[1], float(scale),
                                     sp, ns)
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


# ---- decode attention over an FP8 KV cache -------------------------------------------------------------
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
_FP8_KIND = {"e4m3": 0, "e5m2": 1}
_SCALE_KIND = {"fp32": 0, "ue8m0": 1}


def usable_fp8(q: torch.Tensor, data: torch.Tensor) -> bool:
    """True when q is fp32 on the CPU, data is a 1-byte (FP8 or uint8) CPU tensor and the kernels are built."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and data.device.type == "cpu"
            and data.element_size() == 1 and _library() is not None)


def _fp8_bytes(data: torch.Tensor, fp8: str) -> torch.Tensor:
    if fp8 not in FP8_DTYPES:
        raise ValueError(f"fp8 must be one of {sorted(FP8_DTYPES)}, not {fp8!r}")
    if data.dtype.is_floating_point and data.dtype != FP8_DTYPES[fp8]:
        raise ValueError(f"data is {data.dtype}, not the {fp8} format")
    if data.element_size() != 1:
        raise ValueError(f"data must hold one byte per value, not {data.dtype}")
    return data.view(torch.uint8)


def _scale_layout(scales: torch.Tensor, scale_type: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, int, tuple]:
    """(scales as float32 / uint8, groups, (s_kv, s_blk, s_tok, s_head)) in elements, checked against the
    data's shape [2, nb, bs, Hkv, D]: per token [2, nb, bs, Hkv, G], or static [2, Hkv] (G = 1)."""
    if scale_type == "fp32":
        if scales.dtype != torch.float32:
            raise ValueError(f"fp32 scales must be float32, not {scales.dtype}")
    elif scale_type == "ue8m0":
        if scales.element_size() != 1:
            raise ValueError(f"ue8m0 scales must be one byte each, not {scales.dtype}")
        scales = scales.view(torch.uint8)
    else:
        raise ValueError(f"scale_type must be 'fp32' or 'ue8m0', not {scale_type!r}")
    _, nb, bs, hkv, d = shape
    if scales.dim() == 5:
        groups = scales.shape[-1]
        if tuple(scales.shape) != (2, nb, bs, hkv, groups) or d % groups:
            raise ValueError(f"per-token scales {tuple(scales.shape)} do not fit data {shape}")
        if scales.stride(-1) != 1:
            scales = scales.contiguous()
        s_kv, s_blk, s_tok, s_head, _ = scales.stride()
        return scales, groups, (s_kv, s_blk, s_tok, s_head)
    if scales.dim() == 2:
        if tuple(scales.shape) != (2, hkv):
            raise ValueError(f"static scales {tuple(scales.shape)} do not fit data {shape} (want [2, {hkv}])")
        return scales, 1, (scales.stride(0), 0, 0, scales.stride(1))
    raise ValueError(f"scales must be [2, nb, bs, Hkv, G] (per token) or [2, Hkv] (static), not {tuple(scales.shape)}")


def paged_decode_fp8(q: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, fp8: str, scale_type: str,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     spill: torch.Tensor | None = None, spill_scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """q: [Nd, Hq, D] fp32 -> out [Nd, Hq, D]; None when the shape does not fit the kernel (use the torch path).

    data: one layer's FP8 cache [2, num_blocks, block_size, Hkv, D] (float8_e4m3fn / float8_e5m2, or its
    bytes as uint8); fp8: "e4m3" or "e5m2". scales: per token [2, num_blocks, block_size, Hkv, G] (G groups
    of D / G values per head) or static [2, Hkv]; scale_type "fp32" (float32) or "ue8m0" (uint8 e, 2^(e-127)).
    block_tables, seq_lens, scale, spill: as `paged_decode`; spill_scales: the store's per-token scales
    [2, num_spill, block_size, Hkv, G] (None for static scales, which cover both)."""
    return _paged_decode_fp8(_library(), q, data, scales, fp8, scale_type, block_tables, seq_lens, scale, spill,
                             spill_scales)


def _paged_decode_fp8(lib, q, data, scales, fp8, scale_type, block_tables, seq_lens, scale, spill=None,
                      spill_scales=None):
    raw = _fp8_bytes(data, fp8).contiguous()
    scales, groups, strides = _scale_layout(scales, scale_type, tuple(raw.shape))
    sp, ns = _spill_rows(None if spill is None else _fp8_bytes(spill, fp8), raw)
    sp_scales = 0
    if spill_scales is not None:
        if spill is None or scales.dim() != 5 or spill_scales.shape != (2, ns, *scales.shape[2:]) \
                or spill_scales.element_size() != scales.element_size() or not spill_scales.is_contiguous():
            raise ValueError(f"spill scales {tuple(spill_scales.shape)} do not fit the cache's {tuple(scales.shape)}")
        sp_scales = spill_scales.data_ptr()
    elif spill is not None and scales.dim() == 5:
        raise ValueError("a spill store over per-token scales needs its scales (spill_scales)")
    q = q.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    nd, hq, d = q.shape
    _, nb, bs, hkv, _ = raw.shape
    if (d != raw.shape[4] or hq % hkv or q.dtype != torch.float32 or block_tables.dtype != torch.int64
            or seq_lens.dtype != torch.int64 or block_tables.shape[0] != nd or tuple(seq_lens.shape) != (nd,)):
        raise ValueError(f"q {tuple(q.shape)} {q.dtype}, data {tuple(raw.shape)}, block_tables "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}, seq_lens {tuple(seq_lens.shape)} "
                         f"{seq_lens.dtype} do not fit together (fp32 q, int64 tables and lengths)")
    out = torch.empty_like(q)
    rc = lib.tierlm_paged_decode_fp8(q.data_ptr(), raw.data_ptr(), scales.data_ptr(), _SCALE_KIND[scale_type],
                                     _FP8_KIND[fp8], groups, *strides, block_tables.data_ptr(), seq_lens.data_ptr(),
                                     out.data_ptr(), nd, hq, hkv, d, nb, bs, block_tables.shape[1], float(scale),
                                     sp, sp_scales, ns)
    return None if rc else out


def dequantize_fp8(data: torch.Tensor, scales: torch.Tensor, fp8: str, scale_type: str) -> torch.Tensor:
    """The fp32 cache [2, nb, bs, Hkv, D] an FP8 one stands for (torch's float8 -> float32 conversion)."""
    raw = _fp8_bytes(data, fp8)
    scales, groups, _ = _scale_layout(scales, scale_type, tuple(raw.shape))
    x = raw.view(FP8_DTYPES[fp8]).to(torch.float32)
    s = scales.to(torch.float32) if scale_type == "fp32" else torch.exp2(scales.to(torch.float32) - 127)
    if s.dim() == 2:
        s = s[:, None, None, :, None]
    two, nb, bs, hkv, d = x.shape
    return (x.view(two, nb, bs, hkv, groups, d // groups) * s.unsqueeze(-1)).view(two, nb, bs, hkv, d)


def reference_decode_fp8(q, data, scales, fp8, scale_type, block_tables, seq_lens, scale) -> torch.Tensor:
    """The definition the FP8 kernel must match: each sequence's blocks gathered and dequantized, then
    `reference_decode`."""
    used = torch.unique(block_tables)
    remap = torch.zeros(data.shape[1], dtype=torch.long)
    remap[used] = torch.arange(len(used))
    raw = _fp8_bytes(data, fp8)
    scales, _, _ = _scale_layout(scales, scale_type, tuple(raw.shape))  # float32 or uint8, indexable
    kv = dequantize_fp8(raw[:, used], scales[:, used] if scales.dim() == 5 else scales, fp8, scale_type)
    return reference_decode(q, kv, remap[block_tables], seq_lens, scale)


def _fp8_widen(lib: ctypes.CDLL, src: torch.Tensor, fp8: str, scale: float = 1.0) -> torch.Tensor:
    """The kernel's widening of the bytes src (uint8, 1-D): fp8(src) * scale."""
    src = src.contiguous()
    out = torch.empty(src.numel(), dtype=torch.float32)
    lib.tierlm_fp8_widen(src.data_ptr(), out.data_ptr(), src.numel(), _FP8_KIND[fp8], float(scale))
    return out


def widen_fp8_rows(raw: torch.Tensor, fp8: str) -> torch.Tensor:
    """uint8 FP8 bytes of any shape -> fp32 of the same shape, by the native kernel (the library must be in
    use: `usable`). Bytes tierlm writes never hold e4m3's NaN encodings (quantize saturates at +-448)."""
    return _fp8_widen(_library(), raw.reshape(-1), fp8).view(raw.shape)


def fp8_widen(src: torch.Tensor, fp8: str, scale: float = 1.0) -> torch.Tensor:
    """The native kernel's FP8 -> fp32 widening of uint8 bytes (for tests; needs the built library).
    NaN encodings are not handled: e4m3's 0x7f / 0xff come out as +-480 (torch: NaN)."""
    return _fp8_widen(_library(), _fp8_bytes(src, fp8).reshape(-1), fp8, scale)


def _fp8_widening_ok(lib: ctypes.CDLL) -> bool:
    """Every byte of both formats widens to torch's float32 value (e4m3's two NaN encodings excepted), both
    through the vector path (256 bytes) and the table tail (runs of 7)."""
    every = torch.arange(256, dtype=torch.uint8)
    for fp8, dtype in FP8_DTYPES.items():
        want = every.view(dtype).to(torch.float32)
        finite = ~want.isnan()
        for got in (_fp8_widen(lib, every, fp8),
                    torch.cat([_fp8_widen(lib, part, fp8) for part in every.split(7)])):
            if not torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32)):
                return False
            if fp8 == "e5m2" and not got[~finite].isnan().all():
                return False
    return True


def _fp8_case(kv: torch.Tensor, fp8: str, scale_type: str, groups: int | None):
    """Quantize an fp32 cache: per-token scales with `groups` groups, or static [2, Hkv] ones (groups None)."""
    two, nb, bs, hkv, d = kv.shape
    fmax = FP8_MAX[fp8]
    x = kv.view(two, nb, bs, hkv, groups or 1, -1)
    amax = x.abs().amax(-1) if groups else kv.abs().amax((1, 2, 4)).view(2, 1, 1, hkv, 1)
    s = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    if scale_type == "ue8m0":
        e = torch.ceil(torch.log2(s)).clamp(-127, 127)
        s, stored = torch.exp2(e), (e + 127).to(torch.uint8)
    else:
        stored = s
    q8 = (x / s.unsqueeze(-1)).clamp(-fmax, fmax).to(FP8_DTYPES[fp8]).view(torch.uint8).view(kv.shape)
    if not groups:
        stored = stored.view(2, hkv).contiguous()
    return q8, stored.contiguous()


# ---- Quest sparse block selection ----------------------------------------------------------------------
def quest_select(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, block_size: int, sink_blocks: int, window_blocks: int, budget_blocks: int,
                 scale: float, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """QuestSelector.select's picks (attention/sparse.py, whose torch path is the definition) in one native
    call: (compacted tables [N, width] int64, their lengths [N] int64), or None when the arguments do not
    fit the kernel (use the torch path). Ties in a block's score go to the lower position.

    q [N, Hq, D] fp32; key_min / key_max: one layer's block bounds [num_blocks, Hkv, D] fp32, read in place
    (must be contiguous); block_tables [N, MB], seq_lens [N] int64. width: the output's columns, at least
    the most blocks a row keeps, min(ceil(max seq_len / block_size), budget_blocks), which it defaults to."""
    lib = _library()
    if not (key_min.is_contiguous() and key_max.is_contiguous()) or key_min.shape != key_max.shape:
        return None
    nb, hkv, dk = key_min.shape
    return _select_call(lib.tierlm_quest_select, q, key_min, key_max, nb, hkv, dk, block_tables, seq_lens, block_size,
                        sink_blocks, window_blocks, budget_blocks, scale, width)


def index_select(q: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, block_size: int, sink_blocks: int, window_blocks: int, budget_blocks: int,
                 scale: float, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """IndexKeySelector.select's picks (attention/index_keys.py, whose torch path is the definition) in one
    native call, as quest_select's: (compacted tables [N, width], lengths [N]) int64, or None when the
    arguments do not fit the kernel. keys: one layer's e4m3 index keys [num_ids, Hkv, D, block_size] (bytes),
    scales [num_ids, Hkv, block_size] fp32, both read in place (must be contiguous)."""
    lib = _library()
    if (keys.dtype != torch.uint8 or scales.dtype != torch.float32 or not keys.is_contiguous()
            or not scales.is_contiguous() or keys.dim() != 4 or (keys.shape[0], keys.shape[1], keys.shape[3]) != scales.shape):
        return None
    nid, hkv, dk, bs = keys.shape
    if bs != block_size:
        return None
    return _select_call(lib.tierlm_index_select, q, keys, scales, nid, hkv, dk, block_tables, seq_lens, block_size,
                        sink_blocks, window_blocks, budget_blocks, scale, width)


def _select_call(fn, q: torch.Tensor, meta_a: torch.Tensor, meta_b: torch.Tensor, num_ids: int, hkv: int, dk: int,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, sink_blocks: int,
                 window_blocks: int, budget_blocks: int, scale: float,
                 width: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The call both block selectors' kernels share (same signature: the layer's two metadata tensors, read in
    place, then the tables): shapes checked, outputs allocated; None when the kernel does not take them."""
    q = q.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    nd, hq, d = q.shape
    if (dk != d or q.dtype != torch.float32 or block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64
            or block_tables.dim() != 2 or block_tables.shape[0] != nd or tuple(seq_lens.shape) != (nd,) or not nd):
        return None
    if width is None:
        width = min(-(-int(seq_lens.max()) // block_size), budget_blocks)
    tables = torch.empty(nd, width, dtype=torch.int64)
    lens = torch.empty(nd, dtype=torch.int64)
    rc = fn(q.data_ptr(), meta_a.data_ptr(), meta_b.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
            tables.data_ptr(), lens.data_ptr(), nd, hq, hkv, d, num_ids, block_tables.shape[1], width, block_size,
            sink_blocks, window_blocks, budget_blocks, float(scale))
    return None if rc else (tables, lens)


def _index_ok(lib: ctypes.CDLL) -> bool:
    """The index kernel's picks on small cases (blocks of 32 tokens: two AVX-512 tiles where built, six query
    heads per KV head: two passes of up to four; blocks of 4: the portable loop) equal a brute-force search
    over the dequantized keys."""
    g = torch.Generator().manual_seed(2)
    for d, bs, hq in ((16, 32, 12), (8, 4, 4)):
        nid, hkv, sink, window, budget, scale = 40, 2, 1, 2, 6, 0.3
        keys = (torch.randn(nid, bs, hkv, d, generator=g) * 4).to(torch.float8_e4m3fn)
        ks = torch.rand(nid, bs, hkv, generator=g) + 0.5
        q = torch.randn(3, hq, d, generator=g)
        tables = torch.randperm(nid, generator=g)[:36].view(3, 12)
        lens = torch.tensor([11 * bs + 1, 3 * bs, 9 * bs + 3])
        out = (torch.empty(3, budget, dtype=torch.int64), torch.empty(3, dtype=torch.int64))
        raw = keys.view(torch.uint8).permute(0, 2, 3, 1).contiguous()  # the kernel's [nid, hkv, d, bs]
        kst = ks.transpose(1, 2).contiguous()  # [nid, hkv, bs]
        rc = lib.tierlm_index_select(q.data_ptr(), raw.data_ptr(), kst.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                                     out[0].data_ptr(), out[1].data_ptr(), 3, hq, hkv, d, nid, 12, budget, bs, sink,
                                     window, budget, scale)
        if rc:
            return False
        k = keys.float() * ks[..., None]  # [nid, bs, hkv, d]
        for n in range(3):
            length = int(lens[n])
            nblocks = -(-length // bs)
            if nblocks <= budget:
                keep = list(range(nblocks))
            else:
                kt = k[tables[n, :nblocks]].reshape(nblocks * bs, hkv, d)[:length]  # [T, hkv, d]
                qg = q[n].view(hkv, hq // hkv, d)
                logit = torch.einsum("thd,hgd->thg", kt, qg).reshape(length, hq) * scale
                pad = torch.full((nblocks * bs - length, hq), float("-inf"))
                lse = torch.cat([logit, pad]).view(nblocks, bs, hq).logsumexp(1)  # [nblocks, hq]
                share = (lse - lse.logsumexp(0)).amax(1)
                cand = list(range(sink, nblocks - window))
                best = sorted(cand, key=lambda c: (-float(share[c]), c))[: budget - sink - window]
                keep = sorted([*range(sink), *best, *range(nblocks - window, nblocks)])
            want = tables[n, keep].tolist() + [int(tables[n, 0])] * (budget - len(keep))
            if out[0][n].tolist() != want or int(out[1][n]) != (len(keep) - 1) * bs + length - (nblocks - 1) * bs:
                return False
    return True


def _quest_ok(lib: ctypes.CDLL) -> bool:
    """The kernel's picks on a small case (two query heads per KV head, scrambled tables, one row within the
    budget) equal a brute-force search's: bounds by the direct max form, candidates ranked by logsumexp."""
    g = torch.Generator().manual_seed(1)
    nb, hkv, hq, d, bs, sink, window, budget, scale = 40, 2, 4, 16, 4, 1, 2, 6, 0.3
    lo = torch.randn(nb, hkv, d, generator=g)
    hi = lo + torch.rand(nb, hkv, d, generator=g)
    q = torch.randn(3, hq, d, generator=g)
    tables = torch.randperm(nb, generator=g)[:36].view(3, 12)
    lens = torch.tensor([45, 13, 37])
    out = torch.empty(3, budget, dtype=torch.int64)
    out_lens = torch.empty(3, dtype=torch.int64)
    rc = lib.tierlm_quest_select(q.data_ptr(), lo.data_ptr(), hi.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                                 out.data_ptr(), out_lens.data_ptr(), 3, hq, hkv, d, nb, 12, budget, bs, sink, window,
                                 budget, scale)
    if rc:
        return False
    for n in range(3):
        length = int(lens[n])
        nblocks = -(-length // bs)
        if nblocks <= budget:
            keep = list(range(nblocks))
        else:
            cand = list(range(sink, nblocks - window))
            b = tables[n, cand]
            qh = q[n].view(hkv, hq // hkv, 1, d)
            u = torch.maximum(qh * lo[b].transpose(0, 1)[:, None], qh * hi[b].transpose(0, 1)[:, None]).sum(-1)
            u = u.reshape(hq, len(cand))
            rel = torch.logsumexp((u - u.amax(1, keepdim=True)) * scale, 0)
            best = sorted(range(len(cand)), key=lambda c: (-float(rel[c]), c))[: budget - sink - window]
            keep = sorted([*range(sink), *(cand[c] for c in best), *range(nblocks - window, nblocks)])
        want = tables[n, keep].tolist()
        want += [int(tables[n, 0])] * (budget - len(want))
        if out[n].tolist() != want or int(out_lens[n]) != (len(keep) - 1) * bs + length - (nblocks - 1) * bs:
            return False
    return True


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
                                     3, hq, hkv, d, nb, bs, 3, 0.25, None, 0)
    want32 = reference_decode(q, kv, tables, lens, 0.25)
    ok = rc == 0 and torch.allclose(out, want32, atol=1e-5, rtol=1e-5)
    # blocks 7 and 8 as spill ids: the last two blocks moved to a second buffer (kvcache/spill.py)
    dev, spill = kv[:, :7].contiguous(), kv[:, 7:].contiguous()
    rc = lib.tierlm_paged_decode_f32(q.data_ptr(), dev.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
                                     3, hq, hkv, d, 7, bs, 3, 0.25, spill.data_ptr(), 2)
    ok = ok and rc == 0 and torch.allclose(out, want32, atol=1e-5, rtol=1e-5)
    ok = ok and _fp8_widening_ok(lib) and _quest_ok(lib) and _index_ok(lib)
    # FP8: both formats, both scale kinds, per-token and static scales; D = 16 with groups of 8 (the row
    # kernel) and of 16, and D = 64 (the vector kernel's runtime-D and constant-D instances)
    kv64, q64 = torch.randn(2, nb, bs, 1, 64, generator=g), torch.randn(3, 2, 64, generator=g)
    for fp8, scale_type, groups, (kvc, qc) in (("e4m3", "fp32", 2, (kv, q)), ("e5m2", "ue8m0", 1, (kv, q)),
                                               ("e4m3", "ue8m0", None, (kv, q)), ("e5m2", "fp32", None, (kv, q)),
                                               ("e4m3", "fp32", 1, (kv64, q64))):
        data, scales = _fp8_case(kvc, fp8, scale_type, groups)
        sc, sgroups, strides = _scale_layout(scales, scale_type, tuple(data.shape))
        o = torch.empty_like(qc)
        rc = lib.tierlm_paged_decode_fp8(qc.data_ptr(), data.data_ptr(), sc.data_ptr(), _SCALE_KIND[scale_type],
                                         _FP8_KIND[fp8], sgroups, *strides, tables.data_ptr(), lens.data_ptr(),
                                         o.data_ptr(), 3, qc.shape[1], kvc.shape[3], kvc.shape[4], nb, bs, 3, 0.25,
                                         None, None, 0)
        want = reference_decode_fp8(qc, data, scales, fp8, scale_type, tables, lens, 0.25)
        ok = ok and rc == 0 and torch.allclose(o, want, atol=1e-5, rtol=1e-5)
        # the same with blocks 7 and 8 spilled: data and per-token scales from second buffers, read in place
        per_token = scales.dim() == 5
        o2 = _paged_decode_fp8(lib, qc, data[:, :7].contiguous(), scales[:, :7].contiguous() if per_token else scales,
                              fp8, scale_type, tables, lens, 0.25, spill=data[:, 7:].contiguous(),
                              spill_scales=scales[:, 7:].contiguous() if per_token else None)
        ok = ok and o2 is not None and torch.equal(o2, o)
    x, r, w = (torch.randn(5, 24, generator=g) for _ in range(3))
    y, s = torch.empty_like(x), torch.empty_like(x)
    lib.tierlm_add_rms_norm_f32(x.data_ptr(), r.data_ptr(), w[0].contiguous().data_ptr(), y.data_ptr(), s.data_ptr(),
                                5, 24, 1e-6)
    ok = ok and torch.equal(s, x + r) and torch.allclose(
        y, torch.nn.functional.rms_norm(x + r, (24,), w[0], 1e-6), atol=1e-5, rtol=1e-5)
    return ok
