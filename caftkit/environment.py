"""What `caft env` reports: the versions caftkit runs with and what the machine offers it (devices, native bf16)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

from .command_line import print_json
from .models import bf16_is_fast

PACKAGES = ("caftkit", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors")


def package_version(name: str) -> str | None:
    """The installed version of the distribution `name`, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Python, platform, package versions, CPU cores and torch threads, and each device with whether it multiplies
    bf16 natively (where `--mixed-precision auto` turns bf16 autocast on)."""
    import torch  # deferred: caft starts without torch

    gpus = [{"device": f"cuda:{index}", "name": torch.cuda.get_device_name(index),
             "memory_gb": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
             "bf16_native": bf16_is_fast(f"cuda:{index}")}
            for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "bf16_native": bf16_is_fast("cpu")},
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda, "gpus": gpus},
    }


def env_command() -> dict:
    """Print the versions caftkit runs with and what the machine offers it, as JSON.

    Python, platform, the versions of caftkit, torch, transformers, TRL, PEFT, accelerate, datasets and
    safetensors, the CPU cores and torch threads, and each CUDA GPU, each with whether it multiplies bf16
    natively (where `--mixed-precision auto` turns bf16 autocast on). Paste it into a bug report.
    """
    return print_json(environment())
