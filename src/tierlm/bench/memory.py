"""Process memory: peak RSS per run (and peak device memory on CUDA).

Linux keeps the process's RSS high-water mark in /proc/self/status (VmHWM); writing "5" to
/proc/self/clear_refs resets it, so each run gets its own peak. Where the reset is not allowed the
peak is process-lifetime (getrusage), which `peak_rss_scope` says, so the report never passes one
off as the other.
"""
from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for a moment: the profiler's C++ side prints start/stop lines there that no
    setting turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- what the model holds and reads ------------------------------------------------------------------------
def weight_bytes(model) -> tuple[int, int]:
    """(resident, read per step) bytes of a model's weights in their stored format.

    resident: every parameter and buffer (packed copies included: they are memory too);
    read per step: what one forward pass streams, i.e. all of it except embedding tables, which are
    only gathered row by row (a tied embedding that also serves as the output matrix is read in full
    by the logits matmul, and is counted when no separate output copy exists)."""
    import torch

    seen: set[int] = set()
    resident = read = 0
    head = getattr(model, "lm_head", None)
    # a quantized embedding's table (models/linear.py QuantEmbedding) is gathered too, unless it is the head
    tables = {id(m.table) for m in model.modules() if hasattr(m, "table") and m.table is not head}
    for module in model.modules():
        gathered = (isinstance(module, torch.nn.Embedding) and head is not None) or id(module) in tables
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            n = t.numel() * t.element_size()
            resident += n
            if not gathered:
                read += n
    return resident, read


def activation_peak_bytes(engine, prompt_ids: list[int]) -> int | None:
    """Peak bytes torch allocated during the engine steps that prefill `prompt_ids` (one request, one new
    token; one step, or one per chunk with chunked prefill): the activations (and logits) of those steps,
    beyond the weights and the KV pool, which are allocated before. On CUDA from the caching allocator's peak; on the CPU from the
    profiler's memory events (allocations made outside torch, e.g. oneDNN scratch, are not seen).
    None when the step cannot run (the prompt does not fit)."""
    import torch

    from tierlm.core.sampling_params import SamplingParams

    from tierlm.core.errors import InvalidParameterError

    if engine.has_unfinished_requests():
        return None
    try:  # a salt of its own: the probe computes every token, whatever the run left in the prefix cache
        rid = engine.add_request(list(prompt_ids), SamplingParams(temperature=0.0, max_tokens=1),
                                 request_id="activation-probe", cache_salt="activation-probe")
    except InvalidParameterError:  # the prompt does not fit this engine's context
        return None
    try:
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
            base = torch.cuda.memory_allocated(engine.device)
            torch.cuda.reset_peak_memory_stats(engine.device)
            while engine.has_unfinished_requests():
                engine.step()
            torch.cuda.synchronize(engine.device)
            return int(torch.cuda.max_memory_allocated(engine.device) - base)
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            while engine.has_unfinished_requests():
                engine.step()
        peak = cur = 0
        for ev in prof.profiler.kineto_results.events():  # allocation (+) and free (-) events, in time order
            if ev.name() == "[memory]":
                cur += ev.nbytes()
                peak = max(peak, cur)
        return peak
    finally:
        engine.abort_request(rid)
