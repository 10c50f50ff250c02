"""The benchmarks' peak-memory readings on the CPU: Linux's resettable peak RSS, and the peak since the process
started where the system shows no more (macOS) or refuses the reset."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from caftkit.bench import memory

MB = 2**20


def test_the_peak_rss_is_reset_and_sees_what_was_allocated_after(monkeypatch):
    monkeypatch.setattr(memory, "_rss_reset_refused", False)
    assert memory.memory_kind("cpu") == "peak RSS (VmHWM)"
    memory.reset_peak_memory("cpu")
    before = memory.memory_bytes("cpu")
    block = torch.ones(256 * MB // 4)  # 256 MB, every page written
    with_block = memory.peak_memory_bytes("cpu")
    assert with_block >= before + 240 * MB
    del block
    memory.reset_peak_memory("cpu")
    # After the reset the peak is today's resident size again, without the freed block.
    assert memory.peak_memory_bytes("cpu") <= with_block - 200 * MB
    assert memory.peak_memory_bytes("cpu") >= memory.memory_bytes("cpu") > 0


def test_a_refused_reset_is_named_in_the_kind(monkeypatch):
    monkeypatch.setattr(memory, "_rss_reset_refused", False)
    monkeypatch.setattr(memory, "PROC_CLEAR_REFS", Path("/proc/self/no-such-control"))  # the kernel has none
    memory.reset_peak_memory("cpu")
    assert memory.memory_kind("cpu") == "peak RSS since the process started (VmHWM)"


def test_without_proc_the_peak_since_the_process_started(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "PROC_STATUS", tmp_path / "no-status")
    assert memory.memory_kind("cpu") == "peak RSS since the process started (ru_maxrss)"
    assert memory.memory_kind("mps").endswith("; MPS buffers may not be counted in it")
    memory.reset_peak_memory("cpu")  # nothing to reset: no error either
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert memory.peak_memory_bytes("cpu") == memory.memory_bytes("cpu") == expected
