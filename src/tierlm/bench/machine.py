"""The machine a benchmark ran on: hardware, versions, measured memory bandwidth, config digest."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata

from tierlm.bench.memory import total_memory_bytes


def measure_bandwidth(nbytes: int = 256 << 20, reps: int = 5, device=None) -> float:
    """Copy bandwidth of `device`'s memory (default: the CPU's) in GB/s (bytes read + written), best of reps.
    On CUDA every copy is synchronized and the buffers' cached memory is handed back afterwards."""
    import torch

    device = torch.device(device or "cpu")
    cuda = device.type == "cuda"
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    if cuda:
        dst.copy_(src)  # warm-up: the first CUDA copy loads its kernel
    best = float("inf")
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / best / 1e9


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def config_digest(obj) -> str:
    """Short stable digest of everything that defines the benchmark (configs, workloads, knobs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_machine(device: str, bandwidth_gb_s: float | None) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": total_memory_bytes(),
        "device": device,
        "bandwidth_gb_s": bandwidth_gb_s,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def versions() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "tierlm": _version("tierlm"),
            "transformers": _version("transformers"), "httpx": _version("httpx"),
            "matplotlib": _version("matplotlib"), "numpy": _version("numpy")}
