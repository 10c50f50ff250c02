"""Several processes (DDP, FSDP2, DeepSpeed ZeRO, launched by `accelerate launch` or `torchrun`): who writes
files, and whole parameters where the multi-token loss uses them outside the model's forward.

The heads' loss reads the final norm and the unembedding after the model's forward has returned. Under FSDP2 the
root module's parameters are sharded again at the end of its forward (accelerate asks for it), so they are
gathered back first: the gradients that flow into them are then reduce-scattered by FSDP at the end of the
backward pass, like any other. Under DeepSpeed ZeRO-3 a parameter is only whole inside its own module's forward,
so the unembedding is called through its module (`loss_impl_for`).
"""

from __future__ import annotations

import os

import torch
from torch import nn


def _group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def process_index() -> int:
    """This process's global rank: from the process group once it exists, from the launcher's `RANK` before."""
    if _group_exists():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together: from the process group once it exists, from `WORLD_SIZE` before."""
    if _group_exists():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_record(accelerator) -> dict[str, int | str]:
    """How a training run was spread: its process count and accelerate's distribution (`NO`, `MULTI_CPU`,
    `MULTI_GPU`, `FSDP`, `DEEPSPEED`, ...), for the run's record."""
    return {"processes": world_size(), "distribution": accelerator.distributed_type.value}


def is_main_process() -> bool:
    """True in the one process that writes shared files (global rank 0; always true without a launcher)."""
    return process_index() == 0


def wait_for_everyone() -> None:
    """A barrier across processes (nothing in a single process)."""
    if _group_exists():
        torch.distributed.barrier()


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or the full tensor of an FSDP2 shard (a collective: every process must call it)."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def is_zero3_partitioned(module: nn.Module) -> bool:
    """Whether `module`'s parameters are partitioned by DeepSpeed ZeRO-3 (whole only inside its forward)."""
    return any(hasattr(param, "ds_id") for param in module.parameters(recurse=False))


def loss_impl_for(lm_head: nn.Module, impl: str) -> str:
    """The cross-entropy implementation that works with `lm_head` as it is wrapped: the fused kernel reads the
    weight directly, which a ZeRO-3 partitioned module does not hold; the checkpointed one calls the module."""
    return "checkpoint" if impl == "fused" and is_zero3_partitioned(lm_head) else impl


def gather_for_loss(*modules: nn.Module) -> None:
    """Make the parameters of the FSDP2 units among `modules` whole again if their forward resharded them (a no-op
    when they are whole already, or not sharded at all)."""
    try:
        from torch.distributed.fsdp import FSDPModule  # deferred: 0.7 s to import, for FSDP2 runs only
    except ImportError:  # a torch without FSDP2 cannot have sharded them
        return
    seen = set()
    for module in modules:
        if isinstance(module, FSDPModule) and id(module) not in seen:
            seen.add(id(module))
            module.unshard()


def average_gradients(params) -> None:
    """Average the `.grad` of `params` over all processes, in one all-reduce (nothing in a single process)."""
    if not _group_exists():
        return
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()
