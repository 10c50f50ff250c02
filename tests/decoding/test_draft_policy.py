"""Adaptive drafting: as far as the heads are confident, the bar tuned by what held, and no drafting at all once it
does not pay for itself; the tokens never change."""

from __future__ import annotations

import pytest
import torch
from test_speculative import PROMPTS, reference, repetitive_model

from caftkit.core.heads import get_heads
from caftkit.decoding.draft_policy import (
    FIRST_PLAIN_SPELL,
    DraftingMemory,
    DraftPolicy,
    drafting_cost,
    drafting_memory,
)
from caftkit.decoding.settings import Sampling, default_tree_size
from caftkit.decoding.speculative import generate


def test_depth_is_the_run_of_confident_leading_heads():
    policy = DraftPolicy(4, cost=0.2, threshold=0.5)
    confidence = torch.tensor([[0.9, 0.6, 0.4, 0.9],    # 2: the third head breaks the run
                               [0.9, 0.8, 0.7, 0.1]])   # 3
    assert policy.depth(confidence) == 3  # the longest over the rows
    assert policy.depth(torch.tensor([[0.3, 0.9, 0.9, 0.9]])) == 0  # zero drafts is allowed
    assert DraftPolicy(4, cost=0.2, adaptive=False).depth(torch.tensor([[0.0] * 4])) == 4


def test_the_threshold_follows_what_held():
    policy = DraftPolicy(4, cost=0.0, threshold=0.5, step=0.1)
    policy.record(2, torch.tensor([3]))  # both drafts held: draft more
    assert policy.threshold == pytest.approx(0.4)
    policy.record(3, torch.tensor([2]))  # one held of three: draft less
    assert policy.threshold == pytest.approx(0.5)
    policy.record(0, torch.tensor([1]))  # nothing drafted: lower the bar a little
    assert policy.threshold == pytest.approx(0.48)


def test_drafting_stops_when_it_does_not_pay_for_itself():
    policy = DraftPolicy(4, cost=0.3, trial_passes=4, window=4)
    for _ in range(3):
        policy.record(4, torch.tensor([1]))  # nothing held
    assert policy.active  # still within its trial
    policy.record(4, torch.tensor([2]))
    assert not policy.active  # (1 + 1 + 1 + 2) / 4 = 1.25 tokens per pass < 1.3
    assert policy.depth(torch.tensor([[1.0] * 4])) == 0
    paying = DraftPolicy(4, cost=0.3, trial_passes=4, window=4)
    for accepted in (2, 1, 2, 1, 2, 1):
        paying.record(4, torch.tensor([accepted]))
    assert paying.active  # 1.5 tokens per pass > 1.3


def test_drafting_cost_counts_the_weights_read():
    model = repetitive_model("llama")
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    unembedding = model.lm_head.weight.numel()
    assert drafting_cost(model, get_heads(model), 2) == pytest.approx((2 * layer + unembedding) /
                                                                      (2 * layer + unembedding))
    assert drafting_cost(model, get_heads(model), 1) == pytest.approx((layer + unembedding) / (2 * layer + unembedding))


def test_adaptive_generation_stops_running_the_heads_and_keeps_the_tokens():
    """On a tiny model the heads cost as much as the model, so drafting cannot pay: after its trial passes the
    heads are not run again, and the tokens are plain greedy decoding's."""
    model = repetitive_model("llama")
    calls = []
    handle = get_heads(model).layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        out = generate(model, input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=40, eos_token_id=[])
    finally:
        handle.remove()
    assert out.sequences == [reference(model, PROMPTS[0], 40)]
    assert len(calls) == 1 + 8  # the prefill, then the 8 trial passes
    assert out.forward_passes == 1 + len(out.accepted_per_step)
    assert out.accepted_per_step[8:] == [1.0] * (len(out.accepted_per_step) - 8)


def test_the_memory_judges_from_the_measured_rates_and_tries_the_heads_again_later():
    memory = DraftingMemory()
    assert memory.start_call() and memory.measured_cost() is None
    memory.record(True, seconds=2.0, tokens=12, passes=10)   # 6 tokens/s with the heads, 0.2 s per pass
    memory.record(False, seconds=1.0, tokens=10, passes=10)  # 10 tokens/s without, 0.1 s per step
    assert memory.measured_cost() == pytest.approx(1.0)
    memory.end_call()
    assert memory.heads_pay is False
    spells = []
    for _ in range(3):
        plain = 0
        while not memory.start_call():
            plain += 1
        spells.append(plain)
        memory.end_call()  # the trial call measured nothing new: the verdict stands, the next spell is longer
    assert spells == [4, 8, 16]
    memory.record(True, seconds=1.0, tokens=40)  # the heads now pay: 52 tokens in 3 s beat 10 tokens in 1 s
    memory.end_call()
    assert memory.heads_pay is True and memory.start_call() and memory.plain_spell == FIRST_PLAIN_SPELL


def test_heads_that_ran_the_whole_call_are_taken_to_pay():
    memory = DraftingMemory()
    memory.record(True, seconds=1.0, tokens=30)
    memory.end_call()
    assert memory.heads_pay is True and memory.start_call()


def test_once_the_heads_did_not_pay_later_calls_decode_as_generate_does():
    """The first call tries the heads and stops them; the tiny model's heads cost as much as the model, so they
    are measured slower than plain passes: the next 4 calls are transformers' own `generate()` (greedy and sampled,
    token for token what it gives alone), and the fifth tries the heads again. The caller's random state is not
    touched."""
    model = repetitive_model("llama")
    heads = get_heads(model)
    prompt = torch.tensor([PROMPTS[0]])
    first = generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[])
    assert first.sequences == [reference(model, PROMPTS[0], 40)]
    memory = drafting_memory(heads, (3, 1, default_tree_size(3, 1), "None", 1))
    assert memory.heads_passes == 8 and memory.plain_passes == 40 - 8  # a pass per token, the trial drafting
    if memory.heads_pay is not False:  # timing: the tiny heads happened to look paying; make them look costly
        memory.record(True, seconds=100.0, tokens=1)
        memory.end_call()
    assert memory.heads_pay is False
    calls = []
    handle = heads.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        sampling = Sampling(temperature=0.8, seed=5)
        for call in range(memory.plain_calls_left):
            state = torch.random.get_rng_state()
            if call % 2:
                out = generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[], sampling=sampling)
                torch.manual_seed(5)
                expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                          eos_token_id=None, pad_token_id=0, do_sample=True, temperature=0.8,
                                          top_p=None, top_k=None)[0, prompt.shape[1]:].tolist()
                assert out.sequences == [expected]
            else:
                out = generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[])
                assert out.sequences == [reference(model, PROMPTS[0], 40)]
                assert torch.equal(torch.random.get_rng_state(), state)
            assert out.forward_passes == 40 and out.accepted_per_step == [1.0] * 40
        assert calls == []  # no head ran in those calls
        generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[])
        assert len(calls) == 1 + 8  # the trial: the prefill and the trial passes
    finally:
        handle.remove()
