"""The captured call of layer L: it reproduces layer L exactly, and the heads replaying it never touch the model's
KV cache, whatever the installed transformers release calls the cache argument."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from tiny_models import ARCHITECTURES, random_batch, tiny_model
from torch import nn
from transformers import Cache, DynamicCache

from caftkit.core.architecture import find_model_parts
from caftkit.core.heads import AuxiliaryHeads, attach_heads, detach_heads, get_heads
from caftkit.core.layer_call import cache_parameter, capture_layer_inputs, head_call, is_cache_object
from caftkit.decoding.speculative import generate

# Tiny models: one thread each (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def _model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def _replay(layer, call):
    out = layer(call.hidden_states, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _values(args, kwargs):
    """Every argument of a call, tuples and lists opened."""
    pending = list(args) + list(kwargs.values())
    while pending:
        value = pending.pop()
        if isinstance(value, (tuple, list)):
            pending.extend(value)
        else:
            yield value


def _output_cache(out) -> Cache:
    # transformers 5.24 names the output field `cache`; earlier releases `past_key_values`.
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_state(cache: Cache) -> list[torch.Tensor]:
    """Copies of every key and value tensor the cache holds."""
    return [tensor.clone() for layer in cache.layers if getattr(layer, "is_initialized", True)
            for tensor in (layer.keys, layer.values)]


class HeadCallRecorder:
    """Forward hooks on every head layer: each call's cache objects, and the model's cache length before and after
    the call (`watched`, the cache the model is decoding with)."""

    def __init__(self, heads: AuxiliaryHeads):
        self.watched: Cache | None = None
        self.calls: list[dict] = []
        self.handles = []
        for layer in heads.layers:
            self.handles.append(layer.register_forward_pre_hook(self._before, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._after))

    def _length(self) -> int | None:
        return None if self.watched is None else self.watched.get_seq_length()

    def _before(self, module, args, kwargs):
        caches = [value for value in _values(args, kwargs) if isinstance(value, Cache)]
        self.calls.append({"caches": caches, "model_cache_before": self._length()})

    def _after(self, module, args, output):
        self.calls[-1]["model_cache_after"] = self._length()

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_captured_call_reproduces_last_layer(arch, use_cache):
    model = tiny_model(arch)
    parts = find_model_parts(model)
    batch = _model_inputs(random_batch(batch_size=2, seq_len=12, pad_last=3))
    with torch.no_grad():
        with capture_layer_inputs(parts) as capture:
            out = model(**batch, use_cache=use_cache, output_hidden_states=True)
        call = capture.layer_call
        assert call is not None and capture.final_hidden is not None
        # z is the state entering layer L.
        assert torch.equal(call.hidden_states, out.hidden_states[-2])
        assert not any(isinstance(value, Cache) for value in _values(call.args, call.kwargs))
        assert not {"cache", "past_key_values", "past_key_value", "layer_past", "cache_position"} & set(call.kwargs)
        assert call.kwargs.get("use_cache") in (None, False)

        replayed = parts.final_norm(_replay(parts.last_layer, call))
        assert replayed.shape == capture.final_hidden.shape
        assert torch.allclose(replayed, capture.final_hidden, atol=1e-6, rtol=0)
        # The model's last hidden state is the final norm's output as well.
        assert torch.allclose(out.hidden_states[-1], capture.final_hidden, atol=1e-6, rtol=0)

        # The same call through AuxiliaryHeads (heads initialised from layer L) gives the same result.
        heads = AuxiliaryHeads(parts.last_layer, 2)
        for head_out in heads(call):
            assert torch.allclose(parts.final_norm(head_out), capture.final_hidden, atol=1e-6, rtol=0)

    # Hooks are removed after the block: a second forward does not update the capture.
    first = capture.layer_call
    with torch.no_grad():
        model(**batch)
    assert capture.layer_call is first
    assert not parts.last_layer._forward_pre_hooks and not parts.final_norm._forward_hooks


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_leave_the_models_cache_alone_after_a_cached_forward(arch):
    """A forward with a real KV cache, then the heads on its captured call: no head call holds a cache object, and
    the model's cache keeps its length and its contents."""
    model = attach_heads(tiny_model(arch), 3)
    parts = find_model_parts(model)
    recorder = HeadCallRecorder(get_heads(model))
    batch = _model_inputs(random_batch(batch_size=2, seq_len=12, pad_last=3))
    with torch.no_grad():
        with capture_layer_inputs(parts) as capture:
            out = model(**batch, use_cache=True)
        cache = recorder.watched = _output_cache(out)
        assert isinstance(cache, Cache) and cache.get_seq_length() == 12
        before = _cache_state(cache)
        get_heads(model)(capture.layer_call)
    recorder.remove()
    assert len(recorder.calls) == 3
    for call in recorder.calls:
        assert call["caches"] == []
        assert call["model_cache_before"] == call["model_cache_after"] == 12
    after = _cache_state(cache)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_leave_the_models_cache_alone_in_generation(arch):
    """`generate()` with heads attached is plain generation (the heads never run); speculative decoding gives the
    same tokens, its heads only ever hold their own caches, and no head call changes the model's cache."""
    model = attach_heads(tiny_model(arch, seed=3), 3)
    heads = get_heads(model)
    prompt = torch.tensor([[1, 17, 23, 9, 40, 41, 12]])
    recorder = HeadCallRecorder(heads)
    model_caches: list[Cache] = []

    def watch_model_cache(module, args, kwargs):
        caches = [value for value in _values(args, kwargs) if isinstance(value, Cache)]
        model_caches.extend(cache for cache in caches if all(cache is not seen for seen in model_caches))
        recorder.watched = caches[0] if caches else None

    handle = model.register_forward_pre_hook(watch_model_cache, with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                   do_sample=False, eos_token_id=[], pad_token_id=0)[0, prompt.shape[1]:].tolist()
            assert recorder.calls == []  # the heads take no part in the model's own generation
            assert len(model_caches) == 1  # generate() decoded with a real cache
            model_caches.clear()
            # Fixed drafting: every head drafts after every pass (adaptive drafting may stop early on random heads).
            speculative = generate(model, input_ids=prompt, max_new_tokens=12, eos_token_id=[], adaptive=False)
    finally:
        handle.remove()
        recorder.remove()
    detached = detach_heads(model)
    with torch.no_grad():
        unheaded = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                  do_sample=False, eos_token_id=[], pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert detached is heads
    assert plain == unheaded and speculative.sequences == [plain]

    assert len(model_caches) == 1  # one cache for the whole speculative generation
    model_cache = model_caches[0]
    assert len(recorder.calls) == 3 * speculative.forward_passes  # every head drafts after every pass
    head_caches = [call["caches"] for call in recorder.calls]
    assert all(len(caches) == 1 and caches[0] is not model_cache for caches in head_caches)
    # Each head keeps one cache of its own for the whole generation.
    assert len({id(caches[0]) for caches in head_caches}) == 3
    for call in recorder.calls:
        assert call["model_cache_before"] == call["model_cache_after"]
        assert call["model_cache_before"] > 0


# --- the pieces of the capture ---------------------------------------------------------------------------------


class MambaStyleCache:
    """A model-specific cache that does not derive from `transformers.Cache` (as mamba's `cache_params` was)."""


class StyleOfNewRelease(nn.Module):
    """A layer whose cache argument has a name no release has used yet, taken positionally."""

    def forward(self, hidden_states, attention_mask=None, kv_store: Cache | None = None, use_cache=False, **kwargs):
        return hidden_states


def test_head_call_drops_every_cache_by_type_and_by_name():
    layer = StyleOfNewRelease()
    hidden, mask = torch.ones(1, 2, 4), torch.zeros(1, 1, 2, 2)
    call = head_call(layer, (hidden, mask, DynamicCache(), True),
                     {"cache_params": MambaStyleCache(), "cache_position": torch.arange(2), "layer_past": (1, 2),
                      "position_ids": torch.arange(2)[None]})
    assert call.hidden_states is hidden
    assert set(call.kwargs) == {"attention_mask", "use_cache", "position_ids"}
    assert call.kwargs["attention_mask"] is mask and call.kwargs["use_cache"] is False
    # A layer that does not declare `use_cache` does not receive it.
    plain = head_call(nn.Linear(4, 4), (hidden,), {})
    assert plain.kwargs == {}


def test_is_cache_object():
    assert is_cache_object(DynamicCache())
    assert is_cache_object(MambaStyleCache())
    assert not is_cache_object(torch.zeros(2))
    assert not is_cache_object((torch.zeros(2), torch.zeros(2)))
    assert not is_cache_object(None)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_parameter_is_read_from_the_signature(arch):
    model = tiny_model(arch)
    layer = find_model_parts(model).last_layer
    for function in (model.forward, layer.forward):
        name = cache_parameter(function)
        assert name is not None and name in inspect.signature(function).parameters
    assert cache_parameter(StyleOfNewRelease().forward) == "kv_store"

    def evaluated(hidden_states, position_ids=None, state=None):  # annotations as objects, not strings
        return hidden_states

    # typing.Optional on purpose: its __name__ is "Optional", which once hid the cache class
    evaluated.__annotations__ = {"position_ids": torch.LongTensor,
                                 "state": typing.Optional[MambaStyleCache]}  # noqa: UP045
    assert cache_parameter(evaluated) == "state"
    assert cache_parameter(nn.Linear(2, 2).forward) is None
