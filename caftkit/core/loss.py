"""Cross-entropy of every head without holding full-vocabulary logits, and the weights that combine them.

A head's loss is `CE(lm_head(h), y)` over the positions whose target is a real label. Building the logits of
all heads at once costs heads x batch x time x vocab floats (the paper's reference code does this and pays
2-3x the memory of plain fine-tuning). Here the valid rows are pushed through `lm_head` a chunk at a time:

- `impl="fused"` (default): each chunk's gradient with respect to the hidden states (and to the unembedding
  when it is trained) is computed during the forward pass, as soon as the chunk's softmax is known, so the
  backward pass only scales stored gradients. No logits are recomputed.
- `impl="checkpoint"`: plain autograd through `lm_head` called as a module, each chunk checkpointed and
  recomputed in backward. Slower, but it calls `lm_head` through its module (FSDP2 unshards it there)
  and works with any `lm_head`, including PEFT-wrapped ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Elements of one logits chunk (rows x vocab). 8M float32 values are 32 MB: small next to the activations of
# any model caftkit trains.
DEFAULT_CHUNK_ELEMENTS = 8 * 1024 * 1024
# Fewest rows a default chunk holds. Every chunk reads the whole unembedding (vocab x hidden) twice, once for the
# logits and once for the gradient of the hidden states; with thin chunks that reading, not the arithmetic, sets
# the pace. Measured on 2,048 rows of width 576 (forward and backward, float32, 2 CPU threads): 64 rows per chunk
# at a 128k vocabulary took 4.56 s, 1,024 rows 2.86 s; at 49k 1.67 s and 1.21 s; at 32k no difference. The price
# is transient memory: 1,024 x vocab float32 values, 201 MB at 49k and 525 MB at 128k, one chunk at a time.
MIN_DEFAULT_CHUNK_ROWS = 1024


def chunk_rows(vocab_size: int, chunk_elements: int | None = None) -> int:
    """Rows of hidden states per chunk of logits.

    With `chunk_elements`, one chunk holds about that many logits (at least one row). By default, about
    `DEFAULT_CHUNK_ELEMENTS` logits but never fewer than `MIN_DEFAULT_CHUNK_ROWS` rows.
    """
    vocab_size = max(1, vocab_size)
    if chunk_elements is not None:
        return max(1, chunk_elements // vocab_size)
    return max(MIN_DEFAULT_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // vocab_size)


def _transform_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of `hidden @ weight.T (+ bias)`, gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, rows):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type
        ) else hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            # Softmax and accumulators in at least float32, whatever the matmul precision.
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)
            w = weight.to(compute_dtype)
            b = bias.to(acc_dtype) if bias is not None else None
            grad_hidden = torch.empty_like(hidden) if needs_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_weight else None
            grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if needs_bias else None
            loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
            num_correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(compute_dtype)
                t = targets[start : start + rows]
                raw = (h @ w.t()).to(acc_dtype)
                if b is not None:
                    raw += b
                logits = _transform_logits(raw, scale, softcap)
                target_logits = logits.gather(1, t[:, None]).squeeze(1)
                # One pass gives the row maxima and the top-1 predictions; the exponentials are taken in place and
                # serve both the log-sum-exp and the softmax: the chunk of logits is read as few times as it can be
                # (at this size the elementwise passes, not the matrix multiplies, are what a naive version adds).
                row_max, predicted = logits.max(dim=-1)
                num_correct += (predicted == t).sum()
                exponentials = logits.sub_(row_max[:, None]).exp_()
                sum_exp = exponentials.sum(dim=-1)
                loss_sum += (row_max + sum_exp.log() - target_logits).sum()
                if needs_hidden or needs_weight or needs_bias:
                    # d CE / d logits = softmax - one_hot, then back through the soft-cap and the scale.
                    grad_logits = exponentials.mul_(sum_exp.reciprocal()[:, None])
                    grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    if softcap is not None:
                        grad_logits *= 1.0 - torch.tanh(raw * (scale / softcap)) ** 2
                    if scale != 1.0:
                        grad_logits *= scale
                    if needs_bias:
                        grad_bias += grad_logits.sum(0)
                    grad_logits = grad_logits.to(compute_dtype)
                    if needs_hidden:
                        grad_hidden[start : start + rows] = (grad_logits @ w).to(hidden.dtype)
                    if needs_weight:
                        grad_weight.addmm_(grad_logits.t().to(acc_dtype), h.to(acc_dtype))
                # This chunk's logits go before the next chunk's are made: the names would otherwise hold them
                # through the next matrix multiply, two chunks at once at the peak.
                raw = logits = exponentials = grad_logits = None
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(num_correct)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss_sum, num_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _checkpointed_chunk(lm_head: nn.Module, scale: float, softcap: float | None):
    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = lm_head(h)
        logits = _transform_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)), scale, softcap)
        loss = F.cross_entropy(logits, t, reduction="sum")
        return loss, (logits.detach().argmax(dim=-1) == t).sum()

    return chunk_loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    impl: str = "fused",
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `lm_head(hidden)` against `targets`, and the number of top-1 hits.

    `hidden` is `[N, H]` (the valid positions only) and `targets` `[N]` with no ignored index. The logits are
    never held for more than one chunk of rows (`chunk_rows(vocab, chunk_elements)` of them). Returns
    `(loss_sum, num_correct)`; `loss_sum` is differentiable with respect to `hidden` and to `lm_head`'s parameters
    that require grad.
    """
    if hidden.shape[0] == 0:
        # A head can have no valid target in a micro-batch; keep the graph connected so that backward (and DDP)
        # still sees the hidden states, with an exact zero.
        return hidden.sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    # A ZeRO-3 partitioned weight is empty outside the module's forward; `ds_shape` keeps its real shape.
    vocab_size = getattr(lm_head.weight, "ds_shape", lm_head.weight.shape)[0]
    rows = chunk_rows(vocab_size, chunk_elements)
    if impl == "fused":
        if not isinstance(lm_head, nn.Linear):
            raise ValueError(
                f"impl='fused' needs lm_head to be a plain nn.Linear, got {type(lm_head).__name__}; "
                "use impl='checkpoint'"
            )
        return _FusedLinearCrossEntropy.apply(
            hidden, lm_head.weight, lm_head.bias, targets, logit_scale, logit_softcap, rows
        )
    if impl == "checkpoint":
        chunk_loss = _checkpointed_chunk(lm_head, logit_scale, logit_softcap)
        loss_sum = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        num_correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            if torch.is_grad_enabled():
                loss, correct = checkpoint(chunk_loss, h, t, use_reentrant=False)
            else:
                loss, correct = chunk_loss(h, t)
            loss_sum = loss_sum + loss
            num_correct += correct
        return loss_sum, num_correct
    raise ValueError(f"unknown loss impl {impl!r}; expected 'fused' or 'checkpoint'")


def shifted_targets(labels: torch.Tensor, offset: int, sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets of the head that predicts token t+`offset` at position t: `labels[t + offset]`.

    Positions whose target lies past the end of the row, or (with `sequence_ids`, for packed rows) in another
    sequence than position t, get `IGNORE_INDEX`.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    if offset < labels.shape[-1]:
        targets[..., :-offset] = labels[..., offset:]
        if sequence_ids is not None:
            crosses = sequence_ids[..., :-offset] != sequence_ids[..., offset:]
            targets[..., :-offset] = targets[..., :-offset].masked_fill(crosses, IGNORE_INDEX)
    return targets


def sequence_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Number each packed sequence in a row: a new one starts wherever the position id does not increase."""
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[..., 1:] = (position_ids[..., 1:] <= position_ids[..., :-1]).long()
    return starts.cumsum(-1)
