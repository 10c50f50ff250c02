"""Self-speculative decoding with the auxiliary heads: the model drafts several tokens per forward pass.

At the last accepted position the main head gives the next token (chosen from the model's own distribution, so
always right) and the auxiliary heads guess the tokens after it. One forward pass of the model over the drafted
block verifies them: at each drafted position the model's own token is chosen from its logits there (the greedy
token, or a sample after the same processing as `generate()`), and drafts are accepted while each equals the token
chosen at its parent. The accepted text is therefore exactly what the model chooses, token by token: greedy
output equals plain greedy decoding, and sampled output has plain sampling's distribution, since each token is
drawn from the model's distribution given the accepted text before it (the heads' drafts are fixed candidates; they
only decide how many of the drawn tokens one pass can keep). The token chosen at the last accepted position is the
next token for free. The model's KV cache is then cut back to what was
accepted; the heads keep their own caches (each head is a copy of layer L and attends over layer L's inputs),
fed with the layer-L inputs the verification pass computed anyway.

With `candidates` above 1 the heads propose several candidates each and a pass verifies a small tree of them
(`draft_tree.py`); the cache then keeps the accepted path's slots (`draft_cache.py`).

Rows of a batch accept different numbers of tokens. The caches keep the longest acceptance of the batch, and
the rejected positions of the other rows are masked out for the rest of the generation (holes in the
attention mask, positions given explicitly), which is exact for full attention. A model with sliding-window
attention counts its window in cache slots, which holes would stretch: it keeps the shortest acceptance of
the batch instead (still lossless, fewer tokens per step).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LogitsProcessorList

from ..core.architecture import find_model_parts, unwrap_model
from ..core.heads import AuxiliaryHeads, from_former_num_heads, get_heads
from ..core.layer_call import LayerCall, cache_parameter, capture_layer_inputs
from ..models import parse_dtype
from .draft_cache import DraftCache
from .draft_policy import DraftPolicy, drafting_memory
from .draft_tree import DraftBlock, DraftTree, accept
from .sampling import SeededSampler, TokenChooser
from .settings import Sampling, default_tree_size


@dataclass
class GenerationOutput:
    """New tokens of each row (stop token included when one ended it) and how the decoding went."""

    sequences: list[list[int]]
    forward_passes: int = 0
    accepted_per_step: list[float] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Mean tokens accepted per verification pass (over rows still generating at that pass)."""
        return sum(self.accepted_per_step) / len(self.accepted_per_step) if self.accepted_per_step else 0.0


def _uses_sliding_window(config) -> bool:
    layer_types = getattr(config, "layer_types", None) or ()
    if any("sliding" in str(kind) for kind in layer_types):
        return True
    window = getattr(config, "sliding_window", None)
    return window is not None and getattr(config, "use_sliding_window", True) is not False


def _stop_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(i) for i in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}


def _copy_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `module` in `dtype`, its parameters converted straight from the originals (a plain deep copy
    would first duplicate the float32 unembedding, 113 MB for the bundled model, on every generation)."""
    converted = {id(param): nn.Parameter(param.detach().to(dtype), requires_grad=False)
                 for param in module.parameters()}
    return copy.deepcopy(module, converted).to(dtype)


def _cast(value, dtype: torch.dtype):
    """Floating tensors of a layer call (also inside tuples, like rotary cos/sin) in `dtype`, kept finite: an
    additive attention mask holds the smallest float32, which is -inf in bfloat16."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        info = torch.finfo(dtype)
        return value.to(dtype).clamp(info.min, info.max)
    if isinstance(value, tuple):
        return tuple(_cast(item, dtype) for item in value)
    return value


class HeadDrafter:
    """The auxiliary heads with one KV cache each, kept as long as the model's cache.

    With a `dtype` other than the model's, the heads draft from copies of themselves, of the final norm and of
    the unembedding in that dtype (made once per generation): cheaper guesses, while the model still verifies
    in its own dtype, so the output tokens do not change."""

    def __init__(self, model, heads: AuxiliaryHeads, num_aux_heads: int, candidates: int,
                 dtype: torch.dtype | None = None):
        parts = find_model_parts(model)
        layers, self.final_norm, self.lm_head = list(heads.layers[:num_aux_heads]), parts.final_norm, parts.lm_head
        self.dtype = dtype if dtype is not None and dtype != next(parts.lm_head.parameters()).dtype else None
        if self.dtype is not None:
            layers = [_copy_in(layer, self.dtype) for layer in layers]
            self.final_norm = _copy_in(self.final_norm, self.dtype)
            self.lm_head = _copy_in(self.lm_head, self.dtype)
        self.layers = layers
        self.caches = [DraftCache() for _ in self.layers]
        self.candidates = candidates
        # The captured call holds no cache (`head_call`); each head gets its own under the name its layer takes.
        self.cache_argument = cache_parameter(layers[0].forward)
        if self.cache_argument is None:
            raise ValueError(f"{type(layers[0]).__name__}.forward takes no KV cache argument: the heads cannot draft "
                             "incrementally; generate with num_aux_heads=0")

    def feed(self, call: LayerCall) -> list[torch.Tensor]:
        """Feed a block of layer-L inputs to every head, extending its cache; each head's output states."""
        hidden_states, args, kwargs = call.hidden_states, call.args, dict(call.kwargs)
        if self.dtype is not None:
            hidden_states, args = _cast(hidden_states, self.dtype), _cast(args, self.dtype)
            kwargs = {key: _cast(value, self.dtype) for key, value in kwargs.items()}
        outputs = []
        for layer, cache in zip(self.layers, self.caches):
            kwargs[self.cache_argument] = cache
            out = layer(hidden_states, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outputs

    def run(self, call: LayerCall, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed a block of layer-L inputs to every head (extending its cache) and return each head's `candidates`
        best tokens at `positions[row]` of the block and their log-probabilities: `[batch, num_aux_heads,
        candidates]`."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        picked = [hidden[rows, positions] for hidden in self.feed(call)]
        # One unembedding product for all heads: at batch 1 its cost is reading the vocabulary matrix, once.
        stacked = torch.stack(picked, dim=1)  # [batch, num_aux_heads, hidden]
        logits = self.lm_head(self.final_norm(stacked)).float()
        logprobs, tokens = logits.log_softmax(-1).topk(self.candidates, dim=-1)
        return tokens, logprobs

    def crop(self, tokens: int) -> None:
        for cache in self.caches:
            cache.crop(-tokens)

    def keep_block_slots(self, width: int, slots: torch.Tensor) -> None:
        for cache in self.caches:
            cache.keep_block_slots(width, slots)

    def select(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.batch_select_indices(rows)


def _forward(model, parts, input_ids, attention_mask, position_ids, cache, cache_argument, capture_call=True):
    """The model's logits over a block and, when `capture_call`, the call of its last layer (what the heads read);
    without it no hook is installed: plain decoding pays nothing for the heads."""
    if not capture_call:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_argument: cache})
        return out.logits, None
    with capture_layer_inputs(parts) as capture:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_argument: cache})
    if capture.layer_call is None:
        raise RuntimeError("the model's forward did not call its last layer; cannot draft with the heads")
    return out.logits, capture.layer_call


def _settled_clock(device: torch.device) -> float:
    """The time once the work queued on `device` is done: an accelerator runs kernels after the call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _tree_mask(mask: torch.Tensor, attends: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D additive attention mask of a tree block: each node sees the kept cache slots of its row and its own
    ancestors."""
    width = attends.shape[1]
    allowed = torch.cat([mask.bool()[:, None, :].expand(-1, width, -1), attends], dim=-1)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def generate(
    model: nn.Module,
    heads: AuxiliaryHeads | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    num_aux_heads: int | None = None,
    candidates: int = 1,
    tree_size: int | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    draft_dtype: torch.dtype | str | None = None,
    sampling: Sampling | None = None,
    adaptive: bool = True,
    num_heads: int | None = None,
) -> GenerationOutput:
    """Decoding of `input_ids` (left-padded, with `attention_mask`), sped up by the auxiliary heads.

    Greedy by default: the output tokens are those of `model.generate(do_sample=False)`. With `sampling`
    (`Sampling(temperature=0.7, top_p=0.9, seed=0)`) each token is sampled from the model's distribution after
    `generate()`'s processing, and the output has the distribution of `model.generate(do_sample=True, ...)`:
    heads only propose, the model decides.
    `heads` defaults to the heads attached to `model`; `num_aux_heads` uses only the first few of them (0 decodes
    one token per pass, plain greedy). With `candidates` 1 each pass verifies a chain of one draft per head; with
    more, a tree of the `tree_size` likeliest paths through the heads' `candidates` best tokens (full-attention models
    only; default size: `default_tree_size`). A row stops at one of `eos_token_id` (default: the model's
    generation config) or after `max_new_tokens`. `on_tokens(row, tokens)` is called with each row's newly
    accepted tokens as they come (for streaming). `draft_dtype` (e.g. `torch.bfloat16` for a float32 model) runs
    the heads and their unembedding in a cheaper dtype: the drafts may change, the output tokens do not.
    A seeded sample is the same whatever the drafts: the tokens of plain sampling with that seed.
    `adaptive` (the default) chooses at each pass between drafting through every head, only as far as the heads are
    confident, or not at all, by the tokens per second each gave in this process for these heads and this draft
    shape; once plain passes were measured faster, the next calls are transformers' own `generate()`, the heads
    tried again after 4, 8, 16, ... calls (`draft_policy.py`). `adaptive=False` always drafts through every head.
    `num_heads`, the former name of `num_aux_heads`, is refused naming it.
    """
    num_aux_heads = from_former_num_heads(num_heads, num_aux_heads, "generate")
    if input_ids is None:
        raise ValueError("input_ids are required")
    heads = heads if heads is not None else get_heads(model)
    available = heads.num_aux_heads if heads is not None else 0
    num_aux_heads = available if num_aux_heads is None else num_aux_heads
    if num_aux_heads > available:
        raise ValueError(f"{num_aux_heads} heads asked for, but {available} are available")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    sliding = _uses_sliding_window(model.config)
    if candidates > 1 and sliding:
        raise ValueError("draft trees (candidates > 1) need full attention in every layer; this model has "
                         "sliding-window layers: use candidates=1 (a chain)")
    tree = DraftTree(num_aux_heads, candidates, input_ids.device) if num_aux_heads > 0 else None
    size = tree_size if tree_size is not None else default_tree_size(num_aux_heads, candidates)
    if tree is not None and size < 1:
        raise ValueError(f"tree_size must be at least 1, got {size}")

    parts = find_model_parts(model)
    # The model takes its cache under the name of the installed transformers release (`cache` since 5.24).
    cache_argument = cache_parameter(unwrap_model(model).forward)
    if cache_argument is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__}.forward takes no KV cache argument")
    device = input_ids.device
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    stop_ids = _stop_ids(model, eos_token_id)
    keep_longest = not sliding
    if draft_dtype is not None:
        draft_dtype = parse_dtype(draft_dtype)
    sampling = sampling or Sampling()
    # Sampling accepts fewer drafts than greedy decoding, the more so the hotter: each temperature has its memory.
    memory = drafting_memory(heads, (num_aux_heads, candidates, size, str(draft_dtype), batch, sampling.temperature)) \
        if adaptive and tree is not None else None
    if memory is not None and not memory.start_call():  # the heads were measured not to pay, lately
        if on_tokens is None:
            return _decode_plainly(model, input_ids, attention_mask, max_new_tokens, stop_ids, sampling)
        tree, memory = None, None  # streaming: this loop, one token per pass, without the heads
    drafter = HeadDrafter(model, heads, num_aux_heads, candidates, draft_dtype) if tree is not None else None
    policy = DraftPolicy(num_aux_heads if drafter is not None else 0, memory, chain=candidates == 1,
                         block_widths=[tree.block_width(size, depth) for depth in range(num_aux_heads + 1)]
                         if tree is not None else None)
    choose = TokenChooser(sampling, device, batch, max_new_tokens)

    # Prefill: the prompt through the model and the heads; left padding gets position 0 like generate() does.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DraftCache()
    logits, call = _forward(model, parts, input_ids, attention_mask, position_ids, cache, cache_argument,
                            capture_call=drafter is not None)
    next_token = choose(logits[:, -1])
    last_position = torch.full((batch,), input_ids.shape[1] - 1, device=device)
    candidates = drafter.run(call, last_position) if drafter else None
    mask = attention_mask.clone()
    next_position = attention_mask.long().sum(-1)

    output = GenerationOutput([[] for _ in range(batch)], forward_passes=1)
    rows = torch.arange(batch, device=device)  # original row of each row still generating
    so_far = torch.zeros(batch, dtype=torch.long, device=device)  # tokens each row still generating has so far
    while rows.numel() > 0:
        started = time.perf_counter()
        confidence = candidates[1][:, :, 0].exp() if candidates is not None else None
        way, heads_seconds = policy.way(confidence), 0.0
        if drafter is not None and policy.heads_stopped:  # plain passes lead: decoding goes on without the heads
            drafter, tree, candidates = None, None, None
        drafted = policy.depth(way, confidence) if way != "plain" else 0
        if way == "plain":
            block = DraftBlock(tokens=next_token[:, None], parent=next_token.new_zeros(rows.numel(), 1),
                               depth=next_token.new_zeros(rows.numel(), 1), attends=None)
        else:
            block = tree.choose(next_token, *candidates, size, max_depth=drafted)
        width = block.tokens.shape[1]
        positions = next_position[:, None] + block.depth
        if tree is None or tree.is_chain or width == 1:
            # A chain is causal within the block: the plain 2D mask serves, sliding windows included.
            block_mask = torch.cat([mask, mask.new_ones(rows.numel(), width)], dim=-1)
        else:
            block_mask = _tree_mask(mask, block.attends, logits.dtype)
        logits, call = _forward(model, parts, block.tokens, block_mask, positions, cache, cache_argument,
                                capture_call=drafter is not None)
        output.forward_passes += 1
        # chosen[:, j]: the model's token after node j, the new token of index (tokens so far) + depth + 1
        chosen = choose(logits, rows, None if sampling.greedy else so_far[:, None] + block.depth + 1)
        path = accept(block, chosen)
        keep = int(path.length.max() if keep_longest else path.length.min())
        taken = path.length if keep_longest else torch.full_like(path.length, keep)
        last = path.nodes.gather(1, (taken - 1)[:, None]).squeeze(1)
        # The heads read the whole block (their caches must match the model's) and guess from the last accepted
        # node of each row.
        if drafter is not None:
            heads_started = _settled_clock(device)
            candidates = drafter.run(call, last)
            heads_seconds = _settled_clock(device) - heads_started

        finished = torch.zeros(rows.numel(), dtype=torch.bool, device=device)
        step_tokens = []
        accepted_tokens = block.tokens.gather(1, path.nodes)
        for i, row in enumerate(rows.tolist()):
            tokens = accepted_tokens[i, : taken[i]].tolist()
            room = max_new_tokens - len(output.sequences[row])
            stop = next((j for j, token in enumerate(tokens) if token in stop_ids), None)
            if stop is not None and stop < room:
                tokens, finished[i] = tokens[: stop + 1], True
            elif len(tokens) >= room:
                tokens, finished[i] = tokens[:room], True
            output.sequences[row].extend(tokens)
            step_tokens.append(len(tokens))
            if on_tokens is not None and tokens:
                on_tokens(row, tokens)
        output.accepted_per_step.append(sum(step_tokens) / len(step_tokens))

        if tree is None or tree.is_chain or width == 1:  # the accepted path is a prefix of the block
            cache.crop(-(width - keep))
            if drafter:
                drafter.crop(width - keep)
        else:
            cache.keep_block_slots(width, path.nodes[:, :keep])
            drafter.keep_block_slots(width, path.nodes[:, :keep])
        # Rows that accepted fewer than `keep` tokens mask the rest out: those slots hold rejected drafts.
        kept = (torch.arange(keep, device=device)[None, :] < taken[:, None]).to(mask.dtype)
        mask = torch.cat([mask, kept], dim=-1)
        next_position, so_far = next_position + taken, so_far + taken
        next_token = chosen.gather(1, last[:, None]).squeeze(1)
        # The tokens are on the host by now (tolist above): the pass is over.
        policy.record(way, drafted, path.length, time.perf_counter() - started, sum(step_tokens), heads_seconds)

        if finished.any():
            alive = (~finished).nonzero().squeeze(1)
            rows, mask, next_position, next_token = rows[alive], mask[alive], next_position[alive], next_token[alive]
            so_far = so_far[alive]
            cache.batch_select_indices(alive)
            if drafter is not None:
                candidates = tuple(c[alive] for c in candidates)
                drafter.select(alive)
    if memory is not None:
        memory.end_call()
    return output


def _decode_plainly(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: set[int], sampling: Sampling) -> GenerationOutput:
    """transformers' own `generate()`, for a call that does not run the heads: nothing of the heads' machinery is
    paid for. A sampled token is drawn as the heads' loop draws it (`SeededSampler`): the same tokens, seed for
    seed."""
    config = model.generation_config
    pad_id = config.pad_token_id if config.pad_token_id is not None else min(stop_ids, default=0)
    processors = LogitsProcessorList()
    if not sampling.greedy:
        chooser = TokenChooser(sampling, input_ids.device, input_ids.shape[0], max_new_tokens)
        processors.append(SeededSampler(chooser, input_ids.shape[1]))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=sorted(stop_ids) or None, pad_token_id=pad_id, logits_processor=processors,
                         **Sampling().generate_kwargs())
    sequences = []
    for row in out[:, input_ids.shape[1]:].tolist():
        stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
        sequences.append(row if stop is None else row[: stop + 1])
    steps = max(map(len, sequences), default=0)
    return GenerationOutput(sequences, forward_passes=steps, accepted_per_step=[1.0] * steps)
