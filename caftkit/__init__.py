"""caftkit: Concept-Aware Fine-Tuning (multi-token prediction in fine-tuning) for Hugging Face causal LMs.

    model = caftkit.attach_heads(model, "heads/")   # or attach_heads(model, 4) for new heads
    trainer = caftkit.CAFTTrainer(model=model, args=caftkit.CAFTConfig(...), train_dataset=...)
"""

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
from .core.loss import gamma_schedule, head_loss_weights, linear_cross_entropy
from .core.multitoken import head_statistics, weighted_loss
from .decoding.speculative import GenerationOutput, generate

__version__ = "0.1.0"


def __getattr__(name):
    # The trainer imports TRL, which is slow to import; load it only when asked for.
    if name in ("CAFTTrainer", "CAFTConfig"):
        from .training.trainer import CAFTConfig, CAFTTrainer

        return {"CAFTConfig": CAFTConfig, "CAFTTrainer": CAFTTrainer}[name]
    raise AttributeError(f"module 'caftkit' has no attribute {name!r}")


__all__ = [
    "AuxiliaryHeads",
    "CAFTConfig",
    "CAFTTrainer",
    "GenerationOutput",
    "HeadsMismatchError",
    "ModelParts",
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
