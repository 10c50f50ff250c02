"""Reuse of the frozen trunk's work across the epochs of head training.

In head training (eq. 3) the base model is frozen and deterministic, so for a given batch it hands layer L the
same inputs z, and its main head scores the same loss, every epoch. `TrunkCache` keeps them per batch (keyed by
the batch's tokens and labels) within a memory budget, so that later epochs and repeated held-out evaluations
run only the heads. For batches to recur, the training batches must be the same every epoch
(`samplers.FixedBatchesSampler`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layer_call import LayerCall

# Config attributes that put dropout into a transformer's forward pass in training mode.
_DROPOUT_ATTRIBUTES = ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop",
                       "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout")


def trunk_is_deterministic(model: nn.Module, heads: nn.Module | None = None) -> bool:
    """Whether the base model runs the same way twice in training mode: no dropout outside the heads."""
    head_modules = set(heads.modules()) if heads is not None else set()
    for module in model.modules():
        if module in head_modules:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            return False
    config = getattr(model, "config", None)
    return not any(isinstance(getattr(config, name, 0), (int, float)) and getattr(config, name, 0) > 0
                   for name in _DROPOUT_ATTRIBUTES)


@dataclass
class CachedTrunk:
    """What the frozen base produced for one batch: layer L's call and the main head's statistics."""

    layer_call: LayerCall
    main_loss_sum: torch.Tensor
    main_count: torch.Tensor
    main_correct: torch.Tensor


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    return 0


class TrunkCache:
    """Per-batch trunk outputs of a frozen base, up to `max_bytes` of tensors (later batches are not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, CachedTrunk] = {}

    @staticmethod
    def key(batch: dict) -> str:
        """A digest of the batch's tokens, attention mask, position ids and labels (what the trunk and the
        main head's score depend on)."""
        digest = hashlib.sha256()
        for name in ("input_ids", "attention_mask", "position_ids", "labels"):
            value = batch.get(name)
            if value is not None:
                tensor = value.detach().to("cpu").contiguous()
                digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> CachedTrunk | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: str, entry: CachedTrunk) -> bool:
        """Keep `entry` if it fits the budget; returns whether it was kept."""
        size = _tensor_bytes(entry.layer_call.hidden_states) + _tensor_bytes(entry.layer_call.args) + \
            _tensor_bytes(entry.layer_call.kwargs)
        if key in self._entries or self.bytes + size > self.max_bytes:
            return False
        self._entries[key] = entry
        self.bytes += size
        return True

    def __len__(self) -> int:
        return len(self._entries)
