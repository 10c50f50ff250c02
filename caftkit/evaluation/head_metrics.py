"""Held-out per-head losses and top-1 accuracies of a model with heads, outside any Trainer."""

from __future__ import annotations

import torch

from ..core.heads import get_heads
from ..core.loss import IGNORE_INDEX
from ..core.multitoken import head_statistics


def collate_examples(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (assistant tokens only) of tokenised examples."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example["input_ids"], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        mask = torch.tensor(example["assistant_masks"], dtype=torch.bool)
        labels[row, : len(ids)] = ids.masked_fill(~mask, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def head_metrics(model, examples: list[dict[str, list[int]]], *, pad_token_id: int, batch_size: int = 8,
                 num_aux_heads: int | None = None) -> dict[str, dict[str, float]]:
    """`{"head_k": {"loss", "accuracy"}}` for the main head (k = 1) and each auxiliary head over `examples`:
    mean cross-entropy and top-1 accuracy over every valid target, batches grouped by length."""
    heads = get_heads(model)
    n = (heads.num_aux_heads if heads is not None else 0) if num_aux_heads is None else num_aux_heads
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    loss = count = correct = None
    try:
        for start in range(0, len(order), batch_size):
            batch = collate_examples([examples[i] for i in order[start: start + batch_size]], pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            stats = head_statistics(model, batch, num_aux_heads=n, train_trunk=False, heads_need_grad=False,
                                    main_needs_grad=False)
            sums = torch.stack([s.double() for s in stats.loss_sums]).cpu()
            loss = sums if loss is None else loss + sums
            count = stats.counts.cpu() if count is None else count + stats.counts.cpu()
            correct = stats.correct.cpu() if correct is None else correct + stats.correct.cpu()
    finally:
        model.train(was_training)
    if loss is None:
        raise ValueError("no examples to evaluate")
    return {f"head_{k}": {"loss": float(loss[k - 1] / count[k - 1]), "accuracy": float(correct[k - 1] / count[k - 1])}
            for k in range(1, n + 2) if count[k - 1] > 0}
