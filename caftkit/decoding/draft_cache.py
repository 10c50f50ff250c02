"""The KV cache of speculative decoding: after a verification pass it keeps only the accepted draft path.

transformers' `DynamicCache` can drop the last slots (`crop`), which is enough for a chain of drafts, whose
accepted tokens are a prefix of the block. A tree's accepted path is scattered through the block, so its slots
are gathered instead.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class DraftCache(DynamicCache):
    """A KV cache that can keep, of the block just verified, only the slots of the accepted path of each row."""

    def keep_block_slots(self, width: int, slots: torch.Tensor) -> None:
        """Replace the last `width` slots by `slots[row]` of them (`[batch, kept]` indices into the block)."""
        for layer in self.layers:
            if not layer.is_initialized:  # a head's cache fills only its own layer index
                continue
            layer.keys = _keep_slots(layer.keys, width, slots)
            layer.values = _keep_slots(layer.values, width, slots)


def _keep_slots(states: torch.Tensor, width: int, slots: torch.Tensor) -> torch.Tensor:
    index = slots[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
    return torch.cat([states[:, :, :-width], states[:, :, -width:].gather(2, index)], dim=2)
