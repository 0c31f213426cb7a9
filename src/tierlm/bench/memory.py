"""Process memory: peak RSS per run (and peak device memory on CUDA).

Linux keeps the process's RSS high-water mark in /proc/self/status (VmHWM); writing "5" to
/proc/self/clear_refs resets it, so each run gets its own peak. Where the reset is not allowed the
peak is process-lifetime (getrusage), which `peak_rss_scope` says, so the report never passes one
off as the other.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def total_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Call `reset()` before a run and `read()` after it."""

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self.scope = "run"

    def reset(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
            self.scope = "run"
        except OSError:
            self.scope = "process"
        if self.device_type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, int | str | None]:
        kib = _status_kib("VmHWM") if self.scope == "run" else None
        if kib is None:
            self.scope = "process"
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = ru if sys.platform == "darwin" else ru * 1024
        else:
            rss = kib * 1024
        device = None
        if self.device_type == "cuda":
            import torch

            device = int(torch.cuda.max_memory_allocated())
        return {"peak_rss_bytes": rss, "peak_rss_scope": self.scope, "peak_device_bytes": device}
