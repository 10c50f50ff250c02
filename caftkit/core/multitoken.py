"""One forward pass of the model and its auxiliary heads, reduced to per-head loss sums and counts.

This is the single code path of every mode (`caft`, `ntp`, `heads`): the trainer, the benchmark and the
evaluation all call `head_statistics` and differ only in the weights they give each head.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from .architecture import find_model_parts, unwrap_model
from .distributed import gather_for_loss, loss_impl_for
from .heads import get_heads
from .layer_call import LayerCall, call_rows, capture_layer_inputs
from .loss import (
    IGNORE_INDEX,
    linear_cross_entropy,
    sequence_ids_from_positions,
    shifted_targets,
)
from .trunk_cache import CachedTrunk, TrunkCache

# Batch keys the model's forward receives; everything else in a collated batch (labels, metadata) stays out.
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


@dataclass
class HeadStatistics:
    """Per head k = 1..n (index 0 is the main head): summed cross-entropy, valid targets, top-1 hits."""

    loss_sums: list[torch.Tensor]
    counts: torch.Tensor  # long [n]
    correct: torch.Tensor  # long [n]


def head_targets(batch: dict, num_aux_heads: int) -> list[torch.Tensor]:
    """Targets of the main head and the `num_aux_heads` auxiliary heads, k = 1..num_aux_heads + 1: `labels[t + k]`,
    never across packed sequences."""
    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    sequence_ids = sequence_ids_from_positions(position_ids) if position_ids is not None else None
    return [shifted_targets(labels, k, sequence_ids) for k in range(1, num_aux_heads + 2)]


def count_targets(batch: dict, num_aux_heads: int) -> torch.Tensor:
    """Number of valid targets of the main head and each auxiliary head in `batch` (long `[num_aux_heads + 1]`)."""
    return torch.stack([(t != IGNORE_INDEX).sum() for t in head_targets(batch, num_aux_heads)])


@functools.cache
def _class_accepts_logits_to_keep(model_class: type) -> bool:
    # Read once per model class: this runs on every training step.
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return _class_accepts_logits_to_keep(type(unwrap_model(model)))


def _row_calls(call: LayerCall) -> list[LayerCall] | None:
    """The call of layer L cut into one call per batch row, or None when it has one row or cannot be cut."""
    batch_size = call.hidden_states.shape[0]
    if batch_size == 1:
        return None
    rows = [call_rows(call, slice(row, row + 1)) for row in range(batch_size)]
    return None if any(row is None for row in rows) else rows


def _checkpointed_head(heads: nn.Module, index: int, call: LayerCall, row_calls: list[LayerCall] | None,
                       final_norm: nn.Module) -> torch.Tensor:
    """Head `index`'s normed output, keeping none of the head's activations: the backward pass recomputes them,
    one head and one batch row at a time (`row_calls`), so the heads' memory at the peak is one row of one head
    whatever their number (rows are independent in a decoder layer). The recomputation repeats the same operations
    on the same inputs (and the same random state), so losses and gradients are those of the plain forward; it
    costs one more forward of a decoder layer per head. Without `row_calls` the call runs whole."""
    def normed_output(hidden_states: torch.Tensor, row_call: LayerCall) -> torch.Tensor:
        return final_norm(heads.head_output(index, hidden_states, row_call))

    if row_calls is None:
        return torch.utils.checkpoint.checkpoint(normed_output, call.hidden_states, call, use_reentrant=False)
    return torch.cat([torch.utils.checkpoint.checkpoint(normed_output, row_call.hidden_states, row_call,
                                                        use_reentrant=False)
                      for row_call in row_calls])


def head_statistics(
    model: nn.Module,
    batch: dict,
    *,
    num_aux_heads: int,
    train_trunk: bool = True,
    heads_need_grad: bool = True,
    main_needs_grad: bool = True,
    impl: str = "fused",
    chunk_elements: int | None = None,
    trunk_cache: TrunkCache | None = None,
) -> HeadStatistics:
    """Run `model` (possibly PEFT/DDP-wrapped) on `batch` and score its main head and `num_aux_heads` auxiliary heads.

    The model is called through its own (wrapped) forward, so DDP, FSDP and PEFT hooks run as usual; only the
    logits of the last position are asked for, and the hidden states are taken from layer L's input and the
    final norm's output. With `train_trunk=False` the model runs without gradients (head training, eq. 3).
    `main_needs_grad=False` scores the main head without gradients (it is only logged).

    With a `trunk_cache` (head training only: `train_trunk=False`, `main_needs_grad=False`), a batch whose
    trunk outputs are cached runs only the heads; otherwise its layer-L call and main-head score are cached.
    """
    parts = find_model_parts(model)
    heads = get_heads(model)
    num_aux = num_aux_heads
    if num_aux > 0 and (heads is None or heads.num_aux_heads < num_aux):
        have = 0 if heads is None else heads.num_aux_heads
        raise ValueError(f"{num_aux} auxiliary heads requested but the model has {have}; see caftkit.attach_heads")
    if trunk_cache is not None and (train_trunk or main_needs_grad):
        raise ValueError("a trunk cache is only for head training: the trunk and the main head without gradients")
    targets = head_targets(batch, num_aux)
    cache_key = trunk_cache.key(batch) if trunk_cache is not None else None
    cached = trunk_cache.get(cache_key) if trunk_cache is not None else None
    if cached is not None:
        call, final_hidden = cached.layer_call, None
        main_stats = (cached.main_loss_sum, cached.main_count, cached.main_correct)
    else:
        inputs = {key: batch[key] for key in _MODEL_INPUT_KEYS if key in batch}
        inputs["use_cache"] = False
        if _accepts_logits_to_keep(model):
            inputs["logits_to_keep"] = 1  # the full logits are what this module exists to avoid
        grad_context = contextlib.nullcontext() if train_trunk else torch.no_grad()
        with grad_context, capture_layer_inputs(parts) as capture:
            model(**inputs)
        if capture.layer_call is None or capture.final_hidden is None:
            raise RuntimeError("the model's forward did not call its last layer and final norm; cannot score the "
                               "heads")
        call, final_hidden, main_stats = capture.layer_call, capture.final_hidden, None
        if not train_trunk:
            call.hidden_states = call.hidden_states.detach()
    # The norm and the unembedding are used below, after the forward: under FSDP2 they must be whole again, and
    # under ZeRO-3 the unembedding is called through its module.
    gather_for_loss(model, unwrap_model(model), parts.lm_head, parts.final_norm)
    impl = loss_impl_for(parts.lm_head, impl)

    hidden_per_head = [final_hidden]
    if num_aux > 0 and heads_need_grad and torch.is_grad_enabled():
        row_calls = _row_calls(call)  # cut once, shared by every head
        hidden_per_head += [_checkpointed_head(heads, index, call, row_calls, parts.final_norm)
                            for index in range(num_aux)]
    elif num_aux > 0:
        with torch.no_grad():
            hidden_per_head += [parts.final_norm(out) for out in heads(call, num_aux)]

    loss_sums, counts, correct = [], [], []
    for k, (hidden, target) in enumerate(zip(hidden_per_head, targets)):
        if k == 0 and main_stats is not None:
            for collected, value in zip((loss_sums, counts, correct), main_stats):
                collected.append(value)
            continue
        needs_grad = main_needs_grad if k == 0 else heads_need_grad
        mask = target != IGNORE_INDEX
        with contextlib.nullcontext() if needs_grad else torch.no_grad():
            loss_sum, num_correct = linear_cross_entropy(
                hidden[mask],
                parts.lm_head,
                target[mask],
                logit_scale=parts.logit_scale,
                logit_softcap=parts.logit_softcap,
                impl=impl,
                chunk_elements=chunk_elements,
            )
        loss_sums.append(loss_sum)
        counts.append(mask.sum())
        correct.append(num_correct)
        if k == 0 and trunk_cache is not None:
            trunk_cache.put(cache_key, CachedTrunk(call, loss_sum.detach(), counts[0], num_correct))
    return HeadStatistics(loss_sums, torch.stack(counts), torch.stack(correct))


def weighted_loss(stats: HeadStatistics, weights: list[float], counts: torch.Tensor) -> torch.Tensor:
    """`sum_k weights[k] * loss_sums[k] / counts[k]`; heads with weight 0 or no target contribute an exact 0.

    `counts` are the targets per head over the whole optimisation step (all gradient-accumulation
    micro-batches and processes), so that accumulated micro-batches give the loss of the one big batch.
    """
    total = stats.loss_sums[0] * 0.0
    for loss_sum, weight, count in zip(stats.loss_sums, weights, counts.tolist()):
        if weight != 0.0 and count > 0:
            total = total + loss_sum * (weight / count)
    return total
