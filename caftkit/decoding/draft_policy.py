"""How far to draft at each verification pass: fixed, or chosen from what each way of drafting measured.

Drafting has a price at every pass: the heads (copies of the last layer) run over the verified block and the
unembedding runs once over their states, and the pass verifies a longer block. What that costs is the machine's to
say: on a CPU a pass drafting with one head of the bundled model took 1.9 plain steps, against the 1.2 the weights it
reads imply. So the adaptive policy (on by default) does not predict the price; it measures it. Each pass is one of
three ways of drafting (`WAYS`):

- `full`: every head drafts (what `adaptive=False` always does);
- `confident`: only the leading heads whose top probability reaches a threshold, tuned from what was accepted (down
  a step when every draft held, up a step when one was rejected), as transformers' `assistant_confidence_threshold`
  and SpecDec++ stop drafting where acceptance becomes unlikely;
- `plain`: no drafts; the pass verifies the model's own next token alone. While the heads are measured, they still
  run after it (the next pass may draft), and the pass is priced without their run: what a pass of plain decoding
  costs. Once plain passes lead, the heads stop for the rest of the call.

`DraftingMemory` keeps, for each set of heads and draft shape, the tokens per second of each way over its last passes in
this process. Passes draft through every head first (as fixed drafts do), then a few plain passes measure the model
alone: they give one token per row at a steady price, so 4 of them say what plain decoding is worth. Where the first 4
full passes kept no draft in any row, full drafts' trial ends there: such passes gave what plain passes give at a higher
price, so they cannot be the faster way (the heads that guess that badly cost most per trial pass). Plain passes are
taken where no head is confident (the confident way would draft nothing there), where drafts would likely have been
rejected anyway, so that measuring plain decoding gives up few tokens where the heads are good; where no such pass comes
within 32 passes, at the next; and at once where full passes kept no draft, since the wait then saves nothing (poor
heads, confident but wrong, kept plain passes waiting for 25 full passes of a tree, each the price of 3.7 plain steps).
The confident way is judged on the full passes' own text before it runs at all: at each full pass the policy works out
how deep the confident way would have drafted there and what it would have kept (exactly, for a chain; for a tree, what
the full tree kept down to that depth, which a tree drafted only so deep keeps too), and prices such a pass from what
was measured: a plain pass, the heads' run, and the share of the verification's extra cost that its shorter block would
keep. The confident way gets trial passes, and later tries, only while that estimate beats the measured ways by the
margin a way needs to take the lead; with a chain, full passes also tune the threshold, from what their drafts show
would have held. Then the passes follow the leading way. Between the heads' two ways, the other takes the lead only when
faster by a margin, since a pass's tokens vary a lot and passes of different ways read different stretches of text;
between plain passes and the heads, the faster leads, since plain decoding is what the heads must beat (a tie is not
worth running them: sampled from a tree, where the good heads' full drafts ran at 0.87x plain, just past the margin,
adaptive drafting ran at 0.82-0.98x plain). While the confident way leads, a few full passes now and then measure full
drafting again, less often while the lead holds. Once plain passes lead, the heads stop for the rest of the call, and
the next calls decode plainly from the start, as `generate()` does; the heads are tried again after 4, then 8, 16, ...
calls (at most 64), for a few passes of full drafts (and of the confident way, if in reach).

Which tokens come out never depends on the policy (the model chooses every token, and a sampled token depends only
on the seed: `sampling.py`); only how many passes they take.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from ..core.heads import AuxiliaryHeads

# The ways a pass can draft, in the order their trials run (the confident way's only while it is estimated to pay).
WAYS = ("full", "plain", "confident")
# Passes each way of the heads runs before the rates are compared; the passes each way's rate is taken over.
TRIAL_PASSES, RATE_WINDOW = 16, 64
# How much faster than the leading way of the heads their other way must be to take the lead. Between plain passes
# and the heads the faster leads: plain decoding is what the heads must beat, and a tie is not worth their cost.
LEAD_MARGIN = 1.1
# Passes between tries of another way than the leading one, doubled after each try that leaves the lead where it
# was; passes of each try, and of plain passes' trial.
FIRST_TRY_INTERVAL, LONGEST_TRY_INTERVAL, TRY_PASSES = 16, 256, 4
# Full passes after full drafts' trial that plain passes' trial waits at most for a pass where no head is confident.
PLAIN_WAIT = 32
# Calls decoded plainly before the heads are tried again, after a verdict against them; doubled after each trial that
# confirms it.
FIRST_PLAIN_SPELL, LONGEST_PLAIN_SPELL = 4, 64


@dataclass
class ConfidentShadow:
    """What one full pass says of the confident way on the same text: the tokens it would have kept, and what the
    pass measured (its seconds, the heads' share of them) with the share of its extra verification cost that the
    confident way's block would have kept."""

    tokens: float
    seconds: float
    heads_seconds: float
    verify_share: float


@dataclass
class DraftingMemory:
    """How fast one set of heads with one draft shape decoded in this process: the seconds and tokens of the last
    passes of each way of drafting, what the full passes say of the confident way, the confidence threshold reached,
    and the verdicts drawn from them."""

    passes: dict = field(default_factory=lambda: {way: deque(maxlen=RATE_WINDOW) for way in WAYS})
    shadows: deque = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    leading: str = "full"
    trial_passes: int = TRIAL_PASSES
    # Whether a full pass of the heads' current trial kept a draft in some row.
    full_kept_a_draft: bool = False
    threshold: float = 0.3
    try_interval: int = FIRST_TRY_INTERVAL
    heads_pay: bool | None = None
    plain_calls_left: int = 0
    plain_spell: int = FIRST_PLAIN_SPELL
    # The confident way's estimate as last worked out, until a pass or a shadow changes what it is made of: a pass
    # asks for it two or three times.
    estimate: float | None = None
    estimate_stale: bool = True

    def record(self, way: str, seconds: float, tokens: float) -> None:
        """One pass of `way`: its seconds and the tokens it gave."""
        self.estimate_stale = True
        self.passes[way].append((seconds, tokens))

    def trial_length(self, way: str) -> int:
        """Passes of `way` before its rate counts: a plain pass gives one token per row at a steady price, so a few
        say what plain decoding is worth; a pass of the heads gives 1 to n tokens, so theirs need more, unless full
        passes kept no draft so far: then they gave one token per row at more than a plain pass's price."""
        if way == "plain" or (way == "full" and not self.full_kept_a_draft):
            return min(TRY_PASSES, self.trial_passes)
        return self.trial_passes

    def rate(self, way: str) -> float | None:
        """Tokens per second of `way` over its last passes; None until it has had its trial."""
        passes = self.passes[way]
        if len(passes) < self.trial_length(way):
            return None
        return sum(tokens for _, tokens in passes) / max(sum(seconds for seconds, _ in passes), 1e-9)

    def add_shadow(self, shadow: ConfidentShadow) -> None:
        """What one full pass says of the confident way."""
        self.shadows.append(shadow)
        self.estimate_stale = True

    def confident_estimate(self) -> float | None:
        """Tokens per second the confident way would have given on the full passes' text (None before plain passes
        were measured): each such pass priced as a plain pass, the heads' run, and its share of the rest."""
        if self.estimate_stale:
            self.estimate, self.estimate_stale = self._work_out_estimate(), False
        return self.estimate

    def _work_out_estimate(self) -> float | None:
        plain = self.passes["plain"]
        if not self.shadows or len(plain) < self.trial_length("plain"):
            return None
        plain_pass = sum(seconds for seconds, _ in plain) / len(plain)
        seconds = sum(plain_pass + shadow.heads_seconds
                      + shadow.verify_share * max(0.0, shadow.seconds - plain_pass - shadow.heads_seconds)
                      for shadow in self.shadows)
        return sum(shadow.tokens for shadow in self.shadows) / max(seconds, 1e-9)

    def confident_in_reach(self) -> bool:
        """Whether the confident way may take the lead: its estimate beats the measured ways' rates by the lead's
        margin (or there is no estimate yet). Below that, its passes could not win the lead, only cost the tries."""
        estimate = self.confident_estimate()
        measured = [rate for rate in (self.rate("full"), self.rate("plain")) if rate is not None]
        return estimate is None or not measured or estimate > LEAD_MARGIN * max(measured)

    def waits_for_plain(self) -> bool:
        """Whether plain passes' trial, due now, may still wait for a pass where no head is confident: only where
        full passes kept a draft (otherwise there is nothing the wait would save, and every full pass it takes costs
        more than the plain pass it puts off)."""
        return self.full_kept_a_draft and len(self.passes["full"]) < self.trial_length("full") + PLAIN_WAIT

    def due_trial(self) -> str | None:
        """The way whose trial passes run now: full drafts, then plain passes, then the confident way if in
        reach."""
        for way in ("full", "plain"):
            if len(self.passes[way]) < self.trial_length(way):
                return way
        if len(self.passes["confident"]) < self.trial_length("confident") and self.confident_in_reach():
            return "confident"
        return None

    def leader(self) -> str | None:
        """The way the passes follow once the trials are over (None before): drafting through every head until
        another measured way is faster (the confident way by `LEAD_MARGIN`, plain passes by any margin), then that
        way until another is faster than it in the same way."""
        if self.due_trial() is not None:
            return None
        rates = {way: rate for way in WAYS if (rate := self.rate(way)) is not None}
        if self.leading not in rates:  # a lead measured before the heads' ways were measured anew
            self.leading = "full"
        fastest = max(rates, key=rates.__getitem__)
        margin = 1.0 if "plain" in (fastest, self.leading) else LEAD_MARGIN
        if rates[fastest] > margin * rates[self.leading]:
            self.leading = fastest
        return self.leading

    def contender(self, leader: str) -> str | None:
        """The way worth a try while `leader` leads: full drafts while the confident way leads (their rate is
        measured only by running them); the confident way while full drafts lead, if in reach. Plain passes are
        not tried again: their rate holds."""
        if leader == "confident":
            return "full"
        if leader == "full" and self.confident_in_reach():
            return "confident"
        return None

    def tried(self, leader_before: str | None) -> None:
        """After a try of another way than the leading one: try less often if the lead stayed, as often as at first
        if it changed."""
        if self.leader() == leader_before:
            self.try_interval = min(2 * self.try_interval, LONGEST_TRY_INTERVAL)
        else:
            self.try_interval = FIRST_TRY_INTERVAL

    def tune(self, drafted: int, all_held: bool, step: float) -> None:
        """Move the threshold after a confident pass (or what a full pass says one would have done): down a step
        when every draft held, up a step when one was rejected, down a little when nothing was drafted."""
        if drafted > 0 and all_held:
            self.threshold = max(step, self.threshold - step)
        elif drafted > 0:
            self.threshold = min(1.0 - step, self.threshold + step)
        else:  # nothing was confident enough: lower the bar a little, to try again
            self.threshold = max(step, self.threshold - step / 5)

    def start_call(self) -> bool:
        """Whether this call may run the heads: always, unless plain passes were measured faster than theirs and
        their next trial is still some calls away. A trial measures the heads' ways anew, over a few passes
        each: what they are worth may have changed with the prompts."""
        if self.heads_pay is not False:
            return True
        if self.plain_calls_left > 0:
            self.plain_calls_left -= 1
            return False
        for way in ("full", "confident"):
            self.passes[way].clear()
        self.shadows.clear()
        self.full_kept_a_draft = False
        self.estimate_stale = True
        self.trial_passes = TRY_PASSES  # a short trial: most calls that try the heads again find them not paying
        return True

    def end_call(self) -> None:
        """Draw the verdict from the rates measured so far: the heads pay unless plain passes lead."""
        leader = self.leader()
        if leader is None:
            return
        pays = leader != "plain"
        if not pays:
            self.plain_calls_left = self.plain_spell
            self.plain_spell = min(2 * self.plain_spell, LONGEST_PLAIN_SPELL)
        else:
            self.plain_spell = FIRST_PLAIN_SPELL
        self.heads_pay = pays


class DraftPolicy:
    """The way each pass of one call drafts, and how deep. Fixed (`memory` None): every head, at every pass (no
    heads: plain). Adaptive: as the module docstring says, from `memory`, the threshold moved by `step`.
    `block_widths[d]` is the width of a block drafted through the first d heads (d + 1 for a chain); `chain` says
    whether the drafts are a chain, for which a full pass tells exactly what a confident one would have kept."""

    def __init__(self, num_aux_heads: int, memory: DraftingMemory | None = None, *, step: float = 0.05,
                 block_widths: list[int] | None = None, chain: bool = True):
        self.num_aux_heads, self.memory, self.step = num_aux_heads, memory, step
        self.block_widths = block_widths or list(range(1, num_aux_heads + 2))
        self.chain = chain
        self.since_try = 0
        self.trying: str | None = None  # the way tried now
        self.try_passes_left = 0
        self.leader_before_try: str | None = None
        self.confident_depth = 0  # how deep the confident way would have drafted at this full pass

    def way(self, confidence: torch.Tensor | None = None) -> str:
        """The way the next pass drafts, given each head's top probability for it `[rows, num_aux_heads]` (None:
        not known)."""
        if self.num_aux_heads == 0:
            return "plain"
        memory = self.memory
        if memory is None:
            return "full"
        due = memory.due_trial()
        if due == "plain" and confidence is not None and memory.waits_for_plain() and \
                self._confident_depth(confidence) > 0:
            return "full"  # a head is confident here: its drafts are worth more than measuring plain decoding
        if due is not None:
            return due
        if self.trying is not None:
            return self.trying
        leader = memory.leader()
        if leader == "plain":  # the heads stop for the rest of the call: nothing to try
            self.num_aux_heads = 0
            return "plain"
        self.since_try += 1
        if self.since_try < memory.try_interval:
            return leader
        self.since_try = 0
        contender = memory.contender(leader)
        if contender is None:
            return leader
        self.leader_before_try, self.trying, self.try_passes_left = leader, contender, TRY_PASSES
        return contender

    def depth(self, way: str, confidence: torch.Tensor) -> int:
        """Drafts to verify this pass, given each head's top probability `[rows, num_aux_heads]`: every head for
        `full`, none for `plain`; for `confident`, the longest run of leading heads at or above the threshold,
        over the rows (zero allowed)."""
        if way == "plain":
            return 0
        if self.memory is None:
            return self.num_aux_heads
        self._confident_depth(confidence)
        return self.num_aux_heads if way == "full" else self.confident_depth

    def _confident_depth(self, confidence: torch.Tensor) -> int:
        """The longest run of leading heads at or above the threshold, over the rows; kept for the pass."""
        confident = (confidence >= self.memory.threshold).long().cumprod(dim=-1)
        self.confident_depth = int(confident.sum(-1).max())
        return self.confident_depth

    @property
    def heads_stopped(self) -> bool:
        """Whether the heads run no more in this call."""
        return self.num_aux_heads == 0

    def record(self, way: str, drafted: int, accepted: torch.Tensor, seconds: float, tokens: int,
               heads_seconds: float = 0.0) -> None:
        """What one pass gave: `drafted` drafts verified, `accepted[row]` tokens accepted (the model's own next token
        and the drafts that held), `tokens` kept in `seconds`, of which the heads' run took `heads_seconds` (a plain
        pass is priced without it: plain decoding runs no heads)."""
        memory = self.memory
        if memory is None:
            return
        if way == "confident":
            memory.tune(drafted, bool((accepted - 1 >= drafted).all()), self.step)
        elif way == "full":
            memory.full_kept_a_draft = memory.full_kept_a_draft or bool((accepted > 1).any())
            self._shadow(accepted, seconds, tokens, heads_seconds)
        memory.record(way, seconds - heads_seconds if way == "plain" else seconds, tokens)
        if self.trying is not None and way == self.trying:
            self.try_passes_left -= 1
            if self.try_passes_left == 0:
                memory.tried(self.leader_before_try)
                self.trying = None

    def _shadow(self, accepted: torch.Tensor, seconds: float, tokens: int, heads_seconds: float) -> None:
        """What this full pass says of the confident way on its text: the drafts up to the confident depth that
        held. A chain drafted so deep keeps exactly those. A tree drafted so deep holds the full tree's nodes down to
        that depth (the likeliest paths among fewer) and maybe other ones: it keeps at least as many, so where the
        full tree held less deep the pass says nothing of the threshold."""
        depth = self.confident_depth
        kept = min(float(accepted.clamp(max=depth + 1).sum()), float(tokens))
        extra = self.block_widths[self.num_aux_heads] - 1
        share = (self.block_widths[depth] - 1) / extra if extra > 0 else 0.0
        self.memory.add_shadow(ConfidentShadow(tokens=kept, seconds=seconds, heads_seconds=heads_seconds,
                                               verify_share=share))
        if self.chain:
            self.memory.tune(depth, bool((accepted - 1 >= depth).all()), self.step)


_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def drafting_memory(heads: AuxiliaryHeads, shape: tuple) -> DraftingMemory:
    """The memory of `heads` drafting in `shape` (heads used, candidates, tree size, draft dtype, batch size,
    temperature) in this process; forgotten with the heads."""
    return _MEMORIES.setdefault(heads, {}).setdefault(shape, DraftingMemory())


def forget_drafting(heads: AuxiliaryHeads) -> None:
    """Forget what `heads` measured in this process, in every shape: their next call starts as the first did."""
    _MEMORIES.pop(heads, None)
