"""caftkit: Concept-Aware Fine-Tuning (multi-token prediction in fine-tuning) for Hugging Face causal LMs.

    model = caftkit.attach_heads(model, "heads/")   # or attach_heads(model, 4) for new heads
    trainer = caftkit.CAFTTrainer(model=model, args=caftkit.CAFTConfig(...), train_dataset=...)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it. They are imported on first use: `import caftkit` (and the `caft`
# command line, which reads and checks its settings before anything heavy is needed) does not import torch,
# transformers or TRL.
_PUBLIC = {
    "ModelParts": "core.architecture", "UnsupportedModelError": "core.architecture",
    "find_model_parts": "core.architecture",
    "AuxiliaryHeads": "core.heads", "HeadsMismatchError": "core.heads", "attach_heads": "core.heads",
    "base_fingerprint": "core.heads", "detach_heads": "core.heads", "get_heads": "core.heads",
    "load_heads": "core.heads", "rebase_heads": "core.heads", "save_heads": "core.heads",
    "gamma_schedule": "core.weights", "head_loss_weights": "core.weights", "linear_cross_entropy": "core.loss",
    "head_statistics": "core.multitoken", "weighted_loss": "core.multitoken",
    "GenerationOutput": "decoding.speculative", "generate": "decoding.speculative", "Sampling": "decoding.settings",
    "CAFTConfig": "training.trainer", "CAFTTrainer": "training.trainer",
}
__all__ = [
    "AuxiliaryHeads",
    "CAFTConfig",
    "CAFTTrainer",
    "GenerationOutput",
    "HeadsMismatchError",
    "ModelParts",
    "Sampling",
    "UnsupportedModelError",
    "attach_heads",
    "base_fingerprint",
    "detach_heads",
    "find_model_parts",
    "gamma_schedule",
    "generate",
    "get_heads",
    "head_loss_weights",
    "head_statistics",
    "linear_cross_entropy",
    "load_heads",
    "rebase_heads",
    "save_heads",
    "weighted_loss",
]

if TYPE_CHECKING:
    from .core.architecture import ModelParts, UnsupportedModelError, find_model_parts
    from .core.heads import (
        AuxiliaryHeads,
        HeadsMismatchError,
        attach_heads,
        base_fingerprint,
        detach_heads,
        get_heads,
        load_heads,
        rebase_heads,
        save_heads,
    )
    from .core.loss import linear_cross_entropy
    from .core.multitoken import head_statistics, weighted_loss
    from .core.weights import gamma_schedule, head_loss_weights
    from .decoding.settings import Sampling
    from .decoding.speculative import GenerationOutput, generate
    from .training.trainer import CAFTConfig, CAFTTrainer


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'caftkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
