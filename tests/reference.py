"""The naive multi-token loss that the chunked one must equal: full logits of every head, plain cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caftkit.core.architecture import find_model_parts
from caftkit.core.heads import get_heads


def naive_head_losses(model, batch: dict, num_aux_heads: int, run_last_layer_copy=None) -> list[torch.Tensor]:
    """Mean cross-entropy of heads k = 1..num_aux_heads, from full `[batch, time, vocab]` logits.

    Layer L's input is taken from `output_hidden_states` (the state before the last layer), and each auxiliary
    layer is called with the model's own position handling by re-running the whole model with layer L swapped
    for the head: independent of caftkit's capture hooks.
    """
    parts = find_model_parts(model)
    heads = get_heads(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    labels = batch["labels"]
    losses = []
    for k in range(1, num_aux_heads + 1):
        if k == 1:
            logits = model(**inputs, use_cache=False).logits
        else:
            original = parts.layers[-1]
            parts.layers[len(parts.layers) - 1] = heads.layers[k - 2]
            try:
                logits = model(**inputs, use_cache=False).logits
            finally:
                parts.layers[len(parts.layers) - 1] = original
        logits = logits[:, : labels.shape[1] - k]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = labels[:, k:]
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100))
    return losses
