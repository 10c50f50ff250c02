"""`caft bench generate` in rounds: totals summed over the rounds, each round's speedup, the drafting memory forgotten
before each round."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

from caftkit.bench.generation import bench_generate
from caftkit.bench.settings import DraftShape, GenerationBenchSettings
from caftkit.core.heads import attach_heads, get_heads
from caftkit.decoding import draft_policy
from caftkit.decoding.draft_policy import DraftingMemory, drafting_memory, forget_drafting
from caftkit.decoding.settings import default_tree_size
from caftkit.decoding.speculative import generate

EOS = [2, 5]
PROMPTS = [[1, 17, 23, 9, 40, 41, 12], [1, 33, 8], [1, 50, 51, 52]]
MAX_NEW_TOKENS = 12


def model_with_heads():
    model = tiny_model("llama", seed=3)
    model.generation_config.eos_token_id = EOS
    attach_heads(model, 3)
    return model


def reference(model, prompt: list[int]) -> list[int]:
    """Plain greedy `generate()` of one prompt, cut after its stop token."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)[0, len(prompt):].tolist()
    stop = next((i for i, token in enumerate(out) if token in EOS), None)
    return out if stop is None else out[: stop + 1]


def test_rounds_sum_their_tokens_seconds_and_passes_and_give_each_speedup():
    model = model_with_heads()
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0, name_or_path="tiny")
    shape = DraftShape.parse("3")
    # what the heads measured before the bench is not what its rounds start from
    before = drafting_memory(get_heads(model), (3, 1, default_tree_size(3, 1), "None", 1, 0.0))
    before.record("full", seconds=1.0, tokens=3)
    rows = bench_generate(model, tokenizer, PROMPTS, [1], MAX_NEW_TOKENS, [shape], repeats=3)
    assert drafting_memory(get_heads(model), (3, 1, default_tree_size(3, 1), "None", 1, 0.0)) is not before
    answers = [reference(model, prompt) for prompt in PROMPTS]
    tokens = sum(map(len, answers))
    fixed_passes = sum(generate(model, input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS,
                                eos_token_id=EOS, adaptive=False).forward_passes for prompt in PROMPTS)
    assert [(row.draft, row.drafting) for row in rows] == [("3", "fixed"), ("3", "adaptive")]
    for row in rows:
        assert row.repeats == 3 and row.prompts == len(PROMPTS)
        assert row.plain_tokens == row.speculative_tokens == 3 * tokens
        assert row.identical == 3 * len(PROMPTS)  # every answer of every round is plain decoding's
        assert row.plain_passes == 3 * tokens  # the prefill gives the first token, one step each of the others
        assert len(row.speedups) == 3 and all(value > 0 for value in row.speedups)
        # the same tokens in every round: the pooled ratio is the rounds' seconds pooled, between the extremes
        assert min(row.speedups) - 1e-9 <= row.speedup <= max(row.speedups) + 1e-9
    assert rows[0].speculative_passes == 3 * fixed_passes
    fixed, adaptive = rows
    assert fixed.over_fixed is None and fixed.over_fixed_rounds == []
    # the same tokens on both sides: adaptive over fixed is their seconds' ratio, pooled and round by round, which
    # against the same plain seconds is the ratio of the two rows' speedups
    assert adaptive.over_fixed == pytest.approx(fixed.speculative_seconds / adaptive.speculative_seconds)
    assert adaptive.over_fixed_rounds == pytest.approx([a / f for a, f in zip(adaptive.speedups, fixed.speedups)])


def test_forgetting_the_heads_drafting_memory_starts_them_anew():
    model = model_with_heads()
    heads = get_heads(model)
    shape = (3, 1, 3, "None", 1, 0.0)
    memory = drafting_memory(heads, shape)
    memory.record("full", seconds=1.0, tokens=3)
    assert drafting_memory(heads, shape) is memory
    forget_drafting(heads)
    assert heads not in draft_policy._MEMORIES
    fresh = drafting_memory(heads, shape)
    assert fresh is not memory and fresh == DraftingMemory()
    forget_drafting(heads)
    forget_drafting(heads)  # forgetting twice is fine


@pytest.mark.parametrize("repeats", [0, -1])
def test_repeats_below_one_are_refused(repeats):
    with pytest.raises(ValueError, match="repeats"):
        GenerationBenchSettings(heads="h", repeats=repeats)
