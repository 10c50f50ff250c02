"""Adaptive drafting: each pass drafts through every head, as far as the heads are confident, or not at all, by the
tokens per second each way gave so far; calls decode plainly once the heads were measured slower; the tokens never
change."""

from __future__ import annotations

import pytest
import torch
from test_speculative import PROMPTS, reference, repetitive_model

from caftkit.core.architecture import find_model_parts
from caftkit.core.heads import get_heads
from caftkit.decoding.draft_policy import (
    FIRST_PLAIN_SPELL,
    FIRST_TRY_INTERVAL,
    LEAD_MARGIN,
    PLAIN_WAIT,
    RATE_WINDOW,
    TRIAL_PASSES,
    TRY_PASSES,
    ConfidentShadow,
    DraftingMemory,
    DraftPolicy,
    drafting_memory,
)
from caftkit.decoding.draft_tree import DraftTree
from caftkit.decoding.settings import Sampling, default_tree_size
from caftkit.decoding.speculative import generate


def measured(full: float, confident: float, plain: float, passes: int = TRIAL_PASSES) -> DraftingMemory:
    """A memory whose ways measured these tokens per second, over `passes` passes of one token each."""
    memory = DraftingMemory()
    for way, rate in (("full", full), ("confident", confident), ("plain", plain)):
        for _ in range(passes):
            memory.record(way, seconds=1.0 / rate, tokens=1)
    return memory


def test_each_way_drafts_as_deep_as_it_says():
    memory = DraftingMemory(threshold=0.5)
    policy = DraftPolicy(4, memory)
    confidence = torch.tensor([[0.9, 0.6, 0.4, 0.9],    # 2: the third head breaks the run
                               [0.9, 0.8, 0.7, 0.1]])   # 3
    assert policy.depth("confident", confidence) == 3  # the longest over the rows
    assert policy.depth("confident", torch.tensor([[0.3, 0.9, 0.9, 0.9]])) == 0  # zero drafts is allowed
    assert policy.depth("full", torch.tensor([[0.0] * 4])) == 4
    assert policy.depth("plain", torch.tensor([[1.0] * 4])) == 0
    assert DraftPolicy(4).way() == "full"  # fixed drafting: every head, every pass
    assert DraftPolicy(0, memory).way() == "plain"  # no heads


def test_the_threshold_follows_what_held_on_confident_passes():
    memory = DraftingMemory(threshold=0.5)
    policy = DraftPolicy(4, memory, step=0.1)
    policy.record("confident", 2, torch.tensor([3]), seconds=0.1, tokens=3)  # both drafts held: draft more
    assert memory.threshold == pytest.approx(0.4)
    policy.record("confident", 3, torch.tensor([2]), seconds=0.1, tokens=2)  # one held of three: draft less
    assert memory.threshold == pytest.approx(0.5)
    policy.record("confident", 0, torch.tensor([1]), seconds=0.1, tokens=1)  # nothing drafted: lower the bar a little
    assert memory.threshold == pytest.approx(0.48)
    # a full pass moves it as the confident pass on its text would have: the heads at or above 0.48 reach depth 2
    assert policy.depth("full", torch.tensor([[0.9, 0.5, 0.2, 0.9]])) == 4 and policy.confident_depth == 2
    policy.record("full", 4, torch.tensor([4]), seconds=0.1, tokens=4)  # 3 drafts held: those 2 would have
    assert memory.threshold == pytest.approx(0.38)
    policy.depth("full", torch.tensor([[0.9, 0.5, 0.2, 0.9]]))
    policy.record("full", 4, torch.tensor([2]), seconds=0.1, tokens=2)  # 1 held: the second would have failed
    assert memory.threshold == pytest.approx(0.48)
    assert [len(memory.passes[way]) for way in ("full", "confident", "plain")] == [2, 3, 0]


def run_passes(policy: DraftPolicy, passes: int, outcome: dict) -> list[str]:
    """The ways of `passes` passes of `policy`, each given what `outcome[way]` says a pass of that way gives:
    (seconds, tokens, heads' seconds, each head's top probability before it)."""
    ways = []
    for _ in range(passes):
        way = policy.way(torch.tensor([outcome["full"][3]]))
        seconds, tokens, heads_seconds, confidence = outcome[way]
        drafted = policy.depth(way, torch.tensor([confidence]))
        policy.record(way, drafted, torch.tensor([tokens]), seconds, tokens, heads_seconds)
        ways.append(way)
    return ways


# Four heads in a chain: full passes keep 3 tokens in 0.1 s (the heads 0.02 s of it), plain passes 1 in 0.04 s
# (25 tokens/s); the heads' confidence reaches depth 1 or 2 at the threshold of 0.3.
DEPTH_1, DEPTH_2 = [0.9, 0.1, 0.9, 0.9], [0.9, 0.8, 0.1, 0.9]


def test_full_drafts_then_plain_passes_have_their_trials_and_the_confident_way_only_if_its_estimate_beats_them():
    """At depth 1 the confident way would keep 2 of the 3 tokens in 0.04 + 0.02 + 1/4 * 0.04 s: 28.6 tokens/s, under
    full drafts' 30; it never runs. At depth 2 it would keep all 3 in 0.08 s: 37.5 tokens/s, over 1.1 * 30; it has
    its trial."""
    for confidence, confident_runs in ((DEPTH_1, False), (DEPTH_2, True)):
        memory = DraftingMemory()
        policy = DraftPolicy(4, memory, step=0.0)  # the threshold stays at 0.3
        # a plain pass here runs the heads too (0.02 s), for the next pass: it is priced without them
        outcome = {"full": (0.1, 3, 0.02, confidence), "plain": (0.06, 1, 0.02, confidence),
                   "confident": (0.05, 3, 0.02, confidence)}
        ways = run_passes(policy, TRIAL_PASSES + PLAIN_WAIT + TRY_PASSES + TRIAL_PASSES + 40, outcome)
        # a head is confident at every pass: plain passes' trial waits for none, then runs
        assert ways[: TRIAL_PASSES + PLAIN_WAIT + TRY_PASSES] == ["full"] * (TRIAL_PASSES + PLAIN_WAIT) + \
            ["plain"] * TRY_PASSES
        ways = ways[PLAIN_WAIT:]
        expected_estimate = 2 / (0.04 + 0.02 + 0.25 * 0.04) if confidence is DEPTH_1 else 3 / 0.08
        assert memory.confident_estimate() == pytest.approx(expected_estimate)
        assert memory.rate("plain") == pytest.approx(25.0) and memory.rate("full") == pytest.approx(30.0)
        rest = ways[TRIAL_PASSES + TRY_PASSES:]
        if confident_runs:
            # its trial; it measures 60 tokens/s and leads; full drafts are tried after 16 passes, then 32 later
            assert rest == (["confident"] * TRIAL_PASSES + ["confident"] * (FIRST_TRY_INTERVAL - 1) +
                            ["full"] * TRY_PASSES + ["confident"] * (40 - FIRST_TRY_INTERVAL + 1 - TRY_PASSES))
            assert memory.leader() == "confident" and memory.try_interval == 2 * FIRST_TRY_INTERVAL
        else:
            assert rest == ["full"] * len(rest)  # no trial, no try: plain passes are not tried again either
            assert memory.rate("confident") is None and memory.leader() == "full"


def test_full_drafts_trial_ends_after_four_passes_that_kept_no_draft():
    """Full passes that kept no draft in any row gave a plain pass's one token per row at a higher price: after 4 of
    them plain passes have their trial at once, confident heads or not (there is nothing to wait for), which they
    lead; one kept draft and full drafts have their 16 passes."""
    unconfident = torch.tensor([[0.01] * 4, [0.02] * 4])  # under the threshold, however low it is tuned
    confident = torch.tensor([[0.9] * 4, [0.95] * 4])
    for kept, confidence, full_trial in ((torch.tensor([1, 1]), unconfident, TRY_PASSES),
                                         (torch.tensor([1, 1]), confident, TRY_PASSES),
                                         (torch.tensor([1, 2]), unconfident, TRIAL_PASSES)):
        memory = DraftingMemory()
        policy = DraftPolicy(4, memory)
        ways = []
        for _ in range(TRIAL_PASSES + TRY_PASSES):
            way = policy.way(confidence)
            ways.append(way)
            drafted = policy.depth(way, confidence)
            if way == "full":
                accepted = kept if len(ways) == 1 else torch.tensor([1, 1])
                policy.record(way, drafted, accepted, seconds=0.1, tokens=int(accepted.sum()), heads_seconds=0.02)
            else:
                policy.record(way, drafted, torch.tensor([1, 1]), seconds=0.05, tokens=2, heads_seconds=0.01)
        assert ways[: full_trial + TRY_PASSES] == ["full"] * full_trial + ["plain"] * TRY_PASSES
        if full_trial == TRY_PASSES:
            assert memory.leader() == "plain" and policy.way(confidence) == "plain" and policy.heads_stopped


def test_a_tree_prices_the_confident_way_by_its_narrower_block_and_counts_what_the_full_tree_kept_so_deep():
    """A tree of 2 heads x 3 candidates, 8 nodes: drafted to depth 1 its block has 4 nodes, so a confident pass keeps
    3 of the 8 extra nodes' cost; it keeps what the full tree kept down to depth 1: 2 tokens where the full tree kept
    3, 1 where it kept 1."""
    tree = DraftTree(2, 3)
    widths = [tree.block_width(8, depth) for depth in range(3)]
    assert widths == [1, 4, 9]
    memory = DraftingMemory()
    policy = DraftPolicy(2, memory, block_widths=widths, chain=False)
    for _ in range(TRY_PASSES):
        memory.record("plain", seconds=0.04, tokens=1)
    for kept in (3, 1):
        policy.depth("full", torch.tensor([[0.9, 0.1]]))  # depth 1
        policy.record("full", 2, torch.tensor([kept]), seconds=0.12, tokens=kept, heads_seconds=0.03)
        assert memory.shadows[-1] == ConfidentShadow(tokens=min(kept, 2), seconds=0.12, heads_seconds=0.03,
                                                     verify_share=3 / 8)
    assert memory.threshold == 0.3  # what a depth-limited tree would have held, a full tree does not say
    assert memory.confident_estimate() == pytest.approx(3 / (2 * (0.04 + 0.03 + 3 / 8 * 0.05)))


def test_the_confident_way_is_in_reach_only_when_its_estimate_could_take_the_lead():
    """It takes the lead only when 10% faster than the leading way: an estimate 5% above full drafts' rate is not
    worth its trial; 15% above is."""
    for above, in_reach in ((1.05, False), (1.15, True)):
        memory = DraftingMemory()
        for _ in range(TRIAL_PASSES):
            memory.record("full", seconds=0.1, tokens=3)  # 30 tokens/s
        for _ in range(TRY_PASSES):
            memory.record("plain", seconds=0.05, tokens=1)  # 20 tokens/s
        # a pass of the confident way priced as the plain pass, the heads (0.05 s) and nothing of the rest
        memory.add_shadow(ConfidentShadow(tokens=30 * above * 0.1, seconds=0.1, heads_seconds=0.05,
                                          verify_share=0.0))
        assert memory.confident_estimate() == pytest.approx(30 * above)
        assert memory.confident_in_reach() is in_reach
        assert memory.due_trial() == ("confident" if in_reach else None)
        for _ in range(TRY_PASSES):  # faster plain passes: a plain pass now costs 0.03 s on average
            memory.record("plain", seconds=0.01, tokens=1)
        assert memory.confident_estimate() == pytest.approx(30 * above * 0.1 / (0.03 + 0.05))


def test_a_way_of_the_heads_takes_the_lead_from_the_other_only_when_faster_by_the_margin():
    assert LEAD_MARGIN == pytest.approx(1.1)
    assert measured(full=30.0, confident=32.0, plain=10.0).leader() == "full"  # drafting fully leads at first
    faster = measured(full=30.0, confident=34.0, plain=10.0)
    assert faster.leader() == "confident"  # 34 > 1.1 * 30
    for _ in range(RATE_WINDOW):
        faster.record("full", seconds=1.0 / 37.0, tokens=1)
    assert faster.leader() == "confident"  # 37 < 1.1 * 34


def test_between_plain_passes_and_the_heads_the_faster_leads():
    """Plain decoding is what the heads must beat: plain passes take the lead when faster at all, and the heads take
    it back the same way."""
    memory = measured(full=10.0, confident=10.5, plain=10.9)
    assert memory.leader() == "plain"
    for _ in range(RATE_WINDOW):
        memory.record("full", seconds=1.0 / 11.0, tokens=1)
    assert memory.leader() == "full"  # 11 > 10.9
    assert measured(full=10.0, confident=9.0, plain=9.9).leader() == "full"


def test_a_try_that_finds_a_faster_way_switches_to_it_and_tries_as_often_as_at_first():
    memory = measured(full=20.0, confident=30.0, plain=10.0)
    assert memory.leader() == "confident"
    memory.try_interval = 2 * FIRST_TRY_INTERVAL
    policy = DraftPolicy(4, memory)
    for _ in range(2 * FIRST_TRY_INTERVAL - 1):
        assert policy.way() == "confident"
        policy.record("confident", 4, torch.tensor([5]), seconds=1.0 / 30, tokens=1)
    for _ in range(TRY_PASSES):  # the try: full drafts, now 10 tokens in 0.01 s
        way = policy.way()
        assert way == "full"
        policy.record(way, 4, torch.tensor([5] * 10), seconds=0.01, tokens=10)
    assert memory.leader() == "full" and memory.try_interval == FIRST_TRY_INTERVAL


def test_rates_are_taken_over_the_last_passes():
    memory = DraftingMemory()
    for _ in range(RATE_WINDOW):
        memory.record("plain", seconds=1.0, tokens=1)
    assert memory.rate("plain") == pytest.approx(1.0)
    for _ in range(RATE_WINDOW):
        memory.record("plain", seconds=0.5, tokens=1)
    assert memory.rate("plain") == pytest.approx(2.0)  # the older passes left the window
    assert len(memory.passes["plain"]) == RATE_WINDOW
    assert DraftingMemory().rate("full") is None and DraftingMemory().leader() is None


def test_plain_passes_trial_waits_for_a_pass_where_no_head_is_confident_and_prices_it_without_the_heads():
    """After full drafts' trial, plain passes are taken only where the confident way would draft nothing (head 2
    under the threshold), there giving up little; a plain pass that still ran the heads for the next pass is
    recorded at its seconds less theirs."""
    memory = DraftingMemory()  # threshold 0.3
    policy = DraftPolicy(4, memory)
    # head 2 under any threshold the passes can tune (it never goes below the step, 0.05), and well above it
    confident, unconfident = torch.tensor([[0.9, 0.9, 0.01, 0.01]]), torch.tensor([[0.01, 0.9, 0.9, 0.9]])
    for _ in range(TRIAL_PASSES):
        assert policy.way(unconfident) == "full"  # full drafts' trial comes first, confident or not
        policy.record("full", 4, torch.tensor([2]), seconds=0.1, tokens=2, heads_seconds=0.02)
    assert memory.due_trial() == "plain"
    ways = []
    for confidence in (confident, confident, unconfident, confident, unconfident, unconfident, unconfident):
        way = policy.way(confidence)
        ways.append(way)
        policy.record(way, policy.depth(way, confidence), torch.tensor([1]), seconds=0.05, tokens=1,
                      heads_seconds=0.01)
    assert ways == ["full", "full", "plain", "full", "plain", "plain", "plain"]
    assert list(memory.passes["plain"]) == [(pytest.approx(0.04), 1)] * TRY_PASSES
    assert memory.rate("plain") == pytest.approx(25.0) and memory.due_trial() is None
    # where the heads stay confident, the trial waits PLAIN_WAIT full passes at most
    memory, waited = DraftingMemory(), 0
    policy = DraftPolicy(4, memory)
    while (way := policy.way(confident)) == "full":
        policy.record(way, 4, torch.tensor([5]), seconds=0.1, tokens=5)
        waited += 1
    assert way == "plain" and waited == TRIAL_PASSES + PLAIN_WAIT


def test_the_memory_judges_calls_from_the_rates_and_tries_the_heads_again_later():
    memory = measured(full=6.0, confident=8.0, plain=10.0)
    assert memory.start_call()
    memory.end_call()
    assert memory.heads_pay is False
    spells = []
    for _ in range(3):
        plain = 0
        while not memory.start_call():
            plain += 1
        spells.append(plain)
        # the trial measures the heads' ways anew, a few passes each; they are still slower than plain passes
        assert [len(memory.passes[way]) for way in ("full", "confident", "plain")] == [0, 0, TRIAL_PASSES]
        assert memory.trial_passes == TRY_PASSES
        for way in ("full", "confident"):
            for _ in range(TRY_PASSES):
                memory.record(way, seconds=1.0 / 6.0, tokens=1)
        memory.end_call()
    assert spells == [4, 8, 16]
    while not memory.start_call():  # the next trial finds the heads faster: they pay now
        pass
    for _ in range(TRY_PASSES):
        memory.record("confident", seconds=1.0 / 40.0, tokens=1)
        memory.record("full", seconds=1.0 / 6.0, tokens=1)
    memory.end_call()
    assert memory.heads_pay is True and memory.start_call() and memory.plain_spell == FIRST_PLAIN_SPELL
    short = DraftingMemory()
    short.record("full", seconds=1.0, tokens=3)
    short.end_call()  # a call too short for every trial: no verdict yet
    assert short.heads_pay is None and short.start_call()


def measured_fastest(heads, shape: tuple, way: str, ways=("full", "confident", "plain")) -> DraftingMemory:
    """The memory of `heads` in `shape`, made to say that `way` is far faster than the other `ways` measured."""
    memory = drafting_memory(heads, shape)
    for each in ways:
        for _ in range(RATE_WINDOW):
            memory.record(each, seconds=1e-9 if each == way else 10.0, tokens=10**6 if each == way else 1)
    return memory


def generate_watching_the_blocks(model, **generation):
    """`generate(model, **generation)` and the widths of the blocks read by the model's last layer, and by the first
    head with the number of model blocks read by then."""
    parts, fed = find_model_parts(model), {"model": [], "head": []}

    def model_block(module, args, kwargs):
        fed["model"].append((args[0] if args else kwargs["hidden_states"]).shape[1])

    def head_block(module, args, kwargs):
        fed["head"].append((len(fed["model"]), args[0].shape[1]))

    hooks = [parts.layers[-1].register_forward_pre_hook(model_block, with_kwargs=True),
             get_heads(model).layers[0].register_forward_pre_hook(head_block, with_kwargs=True)]
    try:
        return generate(model, **generation), fed
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("candidates, tree_size", [(1, None), (3, 8)], ids=["chain", "tree"])
def test_plain_passes_amid_drafting_keep_the_tokens_and_the_heads_read_every_block(candidates, tree_size):
    """Where full drafts were measured and plain passes not yet, plain passes have their trial, 4 one-token blocks,
    at passes where no head is confident (or after the wait): the heads read each block right after the model, so
    the next pass may draft; greedy tokens are greedy `generate()`'s and a seeded sample is the no-heads sample of
    that seed."""
    prompt = torch.tensor([PROMPTS[0]])
    sampling = Sampling(temperature=1.0, seed=3)
    for name, chosen in (("greedy", Sampling()), ("sampled", sampling)):
        model = repetitive_model("llama")  # heads of their own: a memory of their own
        expected = [reference(model, PROMPTS[0], 80)] if name == "greedy" else generate(
            model, input_ids=prompt, max_new_tokens=80, eos_token_id=[], num_aux_heads=0, sampling=sampling).sequences
        size = tree_size or default_tree_size(3, candidates)
        memory = measured_fastest(get_heads(model), (3, candidates, size, "None", 1, chosen.temperature), "full",
                                  ("full",))
        out, fed = generate_watching_the_blocks(model, input_ids=prompt, max_new_tokens=80, eos_token_id=[],
                                                candidates=candidates, tree_size=tree_size, sampling=chosen)
        assert out.sequences == expected, name
        # the head read the prompt, then every block the model read, each right after it
        assert fed["head"] == [(moment + 1, width) for moment, width in enumerate(fed["model"])], name
        assert len(memory.passes["plain"]) == TRY_PASSES, name
        # full drafts have had their trial and their wait: the plain passes come first, one-token blocks
        assert fed["model"][1: TRY_PASSES + 1] == [1] * TRY_PASSES, name


def test_once_plain_passes_lead_the_heads_stop_for_the_call():
    model = repetitive_model("llama")
    measured_fastest(get_heads(model), (3, 1, default_tree_size(3, 1), "None", 1, 0.0), "plain")
    out, fed = generate_watching_the_blocks(model, input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=40,
                                            eos_token_id=[])
    assert out.sequences == [reference(model, PROMPTS[0], 40)]
    # the head read the prompt only; the model the prompt, then a pass per token
    assert len(fed["head"]) == 1 and len(fed["model"]) == 1 + 40 == out.forward_passes


def test_once_the_heads_did_not_pay_later_calls_decode_as_generate_does():
    """Once plain passes were measured faster (greedy, and at temperature 0.8: each has its memory), the next 4 calls
    of each are transformers' own `generate()`: greedy, token for token what it gives alone; sampled, token for token
    the heads' loop's sample with that seed, the caller's random state untouched. The fifth tries the heads again."""
    model = repetitive_model("llama")
    heads = get_heads(model)
    prompt = torch.tensor([PROMPTS[0]])
    sampling = Sampling(temperature=0.8, seed=5)
    sampled = generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[], num_aux_heads=0,
                       sampling=sampling).sequences
    memory = measured_fastest(heads, (3, 1, default_tree_size(3, 1), "None", 1, 0.0), "plain")
    measured_fastest(heads, (3, 1, default_tree_size(3, 1), "None", 1, 0.8), "plain").end_call()
    memory.end_call()
    assert memory.heads_pay is False and memory.plain_calls_left == FIRST_PLAIN_SPELL
    calls = []
    handle = heads.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        for call in range(2 * FIRST_PLAIN_SPELL):
            state = torch.random.get_rng_state()
            if call % 2:
                out = generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[], sampling=sampling)
                assert out.sequences == sampled
            else:
                out = generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[])
                assert out.sequences == [reference(model, PROMPTS[0], 40)]
            assert torch.equal(torch.random.get_rng_state(), state)
            assert out.forward_passes == 40 and out.accepted_per_step == [1.0] * 40
        assert calls == []  # no head ran in those calls
        generate(model, input_ids=prompt, max_new_tokens=40, eos_token_id=[])
        assert len(calls) == 1 + TRY_PASSES  # the trial: the prefill, 4 passes of full drafts; the confident way,
        # estimated from them, is out of reach of plain passes' rate; plain passes still lead, and the heads stop
    finally:
        handle.remove()
