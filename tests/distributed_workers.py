"""Code run in each process of the two-process tests (spawned with gloo on CPU); see test_distributed.py."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from tiny_models import tiny_model

from caftkit.core.distributed import whole_tensor
from caftkit.core.heads import attach_heads, get_heads, save_heads
from caftkit.core.multitoken import count_targets, head_statistics, weighted_loss
from caftkit.core.weights import head_loss_weights

NUM_HEADS = 2
WEIGHTS = head_loss_weights("caft", NUM_HEADS, alpha=0.8, beta=0.5, gamma=0.7)


def model_with_heads():
    """A tiny llama with two trainable heads that differ from the last layer (so their gradients are not trivial)."""
    model = tiny_model("llama", seed=5)
    attach_heads(model, NUM_HEADS, trainable=True)
    torch.manual_seed(6)
    with torch.no_grad():
        for param in get_heads(model).parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def global_batch() -> dict[str, torch.Tensor]:
    """Four left-padded rows of different lengths; the prompt part of each row is not a target."""
    torch.manual_seed(7)
    lengths = [10, 7, 9, 5]
    width = max(lengths)
    ids = torch.randint(3, 120, (4, width))
    mask = torch.zeros(4, width, dtype=torch.long)
    labels = torch.full((4, width), -100)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
        labels[row, width - length + 2:] = ids[row, width - length + 2:]
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def caft_loss(model, batch, counts, impl: str, scale: float = 1.0) -> torch.Tensor:
    stats = head_statistics(model, batch, num_aux_heads=NUM_HEADS, impl=impl)
    return weighted_loss(stats, WEIGHTS, counts) * scale


def single_process(impl: str) -> dict:
    """Loss and gradients of one process on the whole batch."""
    model, batch = model_with_heads(), global_batch()
    loss = caft_loss(model, batch, count_targets(batch, NUM_HEADS), impl)
    loss.backward()
    return {"loss": loss.detach(), "grads": {name: p.grad for name, p in model.named_parameters()}}


def fsdp_worker(rank: int, world: int, port: int, out: str, impl: str) -> None:
    """The same loss under FSDP2 (`fully_shard` on every decoder layer, every head and the root, parameters
    resharded after each forward), each process holding half of the rows."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, batch = model_with_heads(), global_batch()
        counts = count_targets(batch, NUM_HEADS)  # the whole step's targets, as the trainer reduces them
        rows = slice(rank * 2, rank * 2 + 2)
        local = {key: value[rows] for key, value in batch.items()}
        for layer in [*model.model.layers, *get_heads(model).layers]:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        # FSDP averages gradients over processes; each process's share of the sum is scaled back up.
        loss = caft_loss(model, local, counts, impl, scale=world)
        loss.backward()
        total = loss.detach() / world
        dist.all_reduce(total)
        grads = {name: whole_tensor(p.grad) for name, p in model.named_parameters()}
        save_heads(get_heads(model), os.path.join(out, "heads"))
        if rank == 0:
            torch.save({"loss": total, "grads": grads}, os.path.join(out, "fsdp.pt"))
        # A worker now and then died at exit (SIGABRT, `terminate called without an active exception`): gloo
        # was torn down while FSDP's state (its hooks form reference cycles, freed only at interpreter exit)
        # or the other process still used it. Free that state now and wait for both processes first.
        del model, loss
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
