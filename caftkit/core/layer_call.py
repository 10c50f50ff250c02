"""The call of layer L, captured from the model's forward and made safe for the heads to replay.

Every auxiliary head is a copy of layer L and runs on exactly the arguments layer L got: the hidden state z, the
attention mask, the position embeddings and ids. When the model runs with a KV cache, those arguments also hold
the cache; a head replaying them would append its keys to layer L's slots of the model's cache. `head_call` is
the one place that turns layer L's call into the heads' call, and it keeps no cache, whatever transformers names
the argument in the installed release (`past_key_value`, `past_key_values`, `layer_past`, `cache`,
`cache_params`): cache objects are recognised by their type, cache arguments by their name.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Cache

from .architecture import ModelParts

# Names the decoder layers of transformers 4.x and 5.x give their KV cache, in the order they were introduced.
KV_CACHE_NAMES = ("past_key_value", "layer_past", "past_key_values", "cache_params", "cache")
# Every argument a head must not receive: the cache under any of its names, and where in the cache to write.
CACHE_ARGUMENT_NAMES = frozenset(KV_CACHE_NAMES + ("cache_position",))
# An annotation that names a cache class (`Cache | None`, `Optional[MambaCache]`, "HybridCache").
_CACHE_ANNOTATION = re.compile(r"\b\w*Cache\b")


def is_cache_object(value: Any) -> bool:
    """Whether `value` is a KV cache: a `transformers.Cache` (any subclass), or a model-specific cache object whose
    class does not derive from it (mamba-style `cache_params`, xLSTM's), recognised by a class named `...Cache`."""
    if isinstance(value, Cache):
        return True
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__ if cls is not object)


def cache_parameter(function: Callable) -> str | None:
    """The name under which `function` (a model's or a decoder layer's `forward`) takes its KV cache, read from
    its signature: the parameter annotated with a cache class, else one with a known cache name; None when it
    takes none."""
    parameters = inspect.signature(function).parameters
    named = [name for name, parameter in parameters.items()
             if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    for name in named:
        annotation = parameters[name].annotation
        # A string under `from __future__ import annotations`, else a type whose str() names its classes.
        if annotation is not inspect.Parameter.empty and _CACHE_ANNOTATION.search(str(annotation)):
            return name
    return next((name for name in reversed(KV_CACHE_NAMES) if name in named), None)


@dataclass
class LayerCall:
    """The inputs of one call of layer L as the heads replay it: the hidden state z and every other argument by
    name, with no KV cache among them."""

    hidden_states: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def head_call(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> LayerCall:
    """Turn one call of `layer` (its positional and keyword arguments) into the call the heads replay.

    The arguments are bound to the layer's signature, so that a cache passed positionally (GPT-2 passed it
    second) is found too. Dropped: every argument whose value is a cache object (`is_cache_object`) and every
    argument named as a cache (`CACHE_ARGUMENT_NAMES`); `use_cache` is set to False where the layer takes it.
    """
    signature = inspect.signature(layer.forward)
    bound = signature.bind(*args, **kwargs)
    named = dict(bound.arguments)
    hidden = named.pop(next(iter(signature.parameters)))
    extra: dict[str, Any] = {}
    for name, value in named.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            extra.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(f"{type(layer).__name__}.forward takes *args; caftkit cannot replay its calls")
        else:
            extra[name] = value
    kept = {name: value for name, value in extra.items()
            if name not in CACHE_ARGUMENT_NAMES and not is_cache_object(value)}
    if "use_cache" in signature.parameters or "use_cache" in kept:
        kept["use_cache"] = False
    return LayerCall(hidden, (), kept)


@dataclass
class Capture:
    """What one forward pass of the model handed to layer L (as the heads' call) and what its final norm
    returned."""

    layer_call: LayerCall | None = None
    final_hidden: torch.Tensor | None = None


@contextlib.contextmanager
def capture_layer_inputs(parts: ModelParts):
    """Record the first call of layer L (as `head_call` makes it) and the first output of the final norm during
    the forward passes run inside the block."""
    capture = Capture()

    def before_last_layer(module, args, kwargs):
        if capture.layer_call is None:
            capture.layer_call = head_call(module, args, kwargs)

    def after_final_norm(module, args, output):
        if capture.final_hidden is None:
            capture.final_hidden = output

    handles = [
        parts.last_layer.register_forward_pre_hook(before_last_layer, with_kwargs=True),
        parts.final_norm.register_forward_hook(after_final_norm),
    ]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


class _NotRowwise(Exception):
    """An argument that cannot be cut into batch rows."""


def _rows_of(value: Any, rows: slice, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] == 1:
            return value  # the same for every row (broadcast)
        if value.shape[0] == batch_size:
            return value[rows]
        raise _NotRowwise
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(item, rows, batch_size) for item in value)
    if isinstance(value, dict):
        return {key: _rows_of(item, rows, batch_size) for key, item in value.items()}
    raise _NotRowwise  # an object (a block mask, ...) whose rows caftkit cannot cut


def call_rows(call: LayerCall, rows: slice) -> LayerCall | None:
    """The call of layer L restricted to the batch rows `rows`: every tensor argument with one entry per row is cut
    to those rows, tensors shared by all rows (first dimension 1) and plain values are kept. None when an argument
    cannot be cut that way (an object, a tensor of another leading size): the call must then run whole."""
    batch_size = call.hidden_states.shape[0]
    try:
        return LayerCall(call.hidden_states[rows], _rows_of(call.args, rows, batch_size),
                         _rows_of(call.kwargs, rows, batch_size))
    except _NotRowwise:
        return None
