"""The peak memory of this process on a device, as the benchmarks compare it between sides run in fresh processes.

On a CUDA or XPU device: torch's allocator statistics (`max_memory_allocated`, reset before the timed steps). On the
CPU (and for MPS, whose memory the process shares): the process's resident set size. Linux keeps its peak (VmHWM)
and resets it on request; elsewhere (macOS) only the peak since the process started is known (`ru_maxrss`), which
then includes loading. `memory_kind` says which one a figure is.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from ..files.controls import write_control

# Where Linux shows a process's current and peak resident set size, and where writing 5 resets that peak.
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
_ALLOCATOR_DEVICES = ("cuda", "xpu")
# Set when Linux refused to reset the peak RSS (a locked-down /proc): the peak is then the one since the start.
_rss_reset_refused = False


def _device(device: torch.device | str) -> torch.device:
    return torch.device(device)


def _reset_peak_rss() -> None:
    global _rss_reset_refused
    if PROC_STATUS.exists():
        try:
            write_control(PROC_CLEAR_REFS, "5")
        except OSError:
            _rss_reset_refused = True


def memory_kind(device: torch.device | str) -> str:
    """What `peak_memory_bytes` measures on `device` here, for the benchmark's output."""
    device = _device(device)
    if device.type in _ALLOCATOR_DEVICES:
        return f"{device.type} max_memory_allocated"
    if not PROC_STATUS.exists():
        kind = "peak RSS since the process started (ru_maxrss)"
    else:
        kind = "peak RSS since the process started (VmHWM)" if _rss_reset_refused else "peak RSS (VmHWM)"
    return kind + ("; MPS buffers may not be counted in it" if device.type == "mps" else "")


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory measurement of this process on `device`. Where the system cannot reset the peak
    RSS (see the module's docstring), the peak stays the one since the process started."""
    device = _device(device)
    if device.type in _ALLOCATOR_DEVICES:
        getattr(torch, device.type).reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()


def peak_memory_bytes(device: torch.device | str) -> int:
    """This process's peak memory on `device` since `reset_peak_memory` (see `memory_kind`)."""
    return _memory(_device(device), peak=True)


def memory_bytes(device: torch.device | str) -> int:
    """This process's memory on `device` now; without a reading of the current RSS (macOS), its peak so far."""
    return _memory(_device(device), peak=False)


def _memory(device: torch.device, peak: bool) -> int:
    if device.type in _ALLOCATOR_DEVICES:
        accelerator = getattr(torch, device.type)
        return accelerator.max_memory_allocated(device) if peak else accelerator.memory_allocated(device)
    if PROC_STATUS.exists():
        key = "VmHWM:" if peak else "VmRSS:"
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{PROC_STATUS} has no {key} line")
    # ru_maxrss is in bytes on macOS and in KiB on Linux and the BSDs.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_rss if sys.platform == "darwin" else peak_rss * 1024
