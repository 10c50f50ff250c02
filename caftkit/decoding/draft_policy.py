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
- `plain`: no drafts and the heads not run; the model's inputs to their layer are kept, and fed to the heads when a
  later pass drafts again (their caches then stand where they would have; the feeding is charged to that pass's
  way). Once plain passes lead, the heads stop for the rest of the call.

`DraftingMemory` keeps, for each set of heads and draft shape, the tokens per second of each way over its last
passes in this process. After each way has had its trial passes, the passes follow the leading way: at first
drafting through every head, as fixed drafts do; another way takes the lead only when it is faster by a margin,
since a pass's tokens vary a lot and passes of different ways read different stretches of text. While a way of the
heads leads, a few passes now and then try another way, less often while the lead holds. Once plain passes lead,
the heads stop for the rest of the call, and the next calls decode plainly from the start, as `generate()` does;
the heads are tried again after 4, then 8, 16, ... calls (at most 64), for a few passes of each of their ways.

Which tokens come out never depends on the policy (the model chooses every token, and a sampled token depends only
on the seed: `sampling.py`); only how many passes they take.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from ..core.heads import AuxiliaryHeads

# The ways a pass can draft, in the order their trials run.
WAYS = ("full", "confident", "plain")
# Passes each way runs before the rates are compared; the passes each way's rate is taken over.
TRIAL_PASSES, RATE_WINDOW = 16, 64
# How much faster than the leading way another must be to take the lead.
LEAD_MARGIN = 1.1
# Passes between tries of another way than the leading one, doubled after each try that leaves the lead where it
# was; passes of each try.
FIRST_TRY_INTERVAL, LONGEST_TRY_INTERVAL, TRY_PASSES = 16, 256, 4
# Calls decoded plainly before the heads are tried again, after a verdict against them; doubled after each trial that
# confirms it.
FIRST_PLAIN_SPELL, LONGEST_PLAIN_SPELL = 4, 64


@dataclass
class DraftingMemory:
    """How fast one set of heads with one draft shape decoded in this process: the seconds and tokens of the last
    passes of each way of drafting, the confidence threshold reached, and the verdicts drawn from them."""

    passes: dict = field(default_factory=lambda: {way: deque(maxlen=RATE_WINDOW) for way in WAYS})
    leading: str = "full"
    trial_passes: int = TRIAL_PASSES
    threshold: float = 0.3
    try_interval: int = FIRST_TRY_INTERVAL
    tries: int = 0
    heads_pay: bool | None = None
    plain_calls_left: int = 0
    plain_spell: int = FIRST_PLAIN_SPELL

    def record(self, way: str, seconds: float, tokens: float) -> None:
        """One pass of `way` (or, with no tokens, time spent for it, as feeding the heads what plain passes
        skipped) and the tokens it gave."""
        if tokens == 0 and self.passes[way]:  # added to the way's last pass, not counted as one
            last_seconds, last_tokens = self.passes[way][-1]
            self.passes[way][-1] = (last_seconds + seconds, last_tokens)
            return
        self.passes[way].append((seconds, tokens))

    def rate(self, way: str) -> float | None:
        """Tokens per second of `way` over its last passes; None until it has had its trial."""
        passes = self.passes[way]
        if len(passes) < self.trial_passes:
            return None
        return sum(tokens for _, tokens in passes) / max(sum(seconds for seconds, _ in passes), 1e-9)

    def leader(self) -> str | None:
        """The way the passes follow once every way has had its trial (None before): drafting through every head
        until another way is faster by `LEAD_MARGIN`, then that way until another is faster than it by as much."""
        rates = {way: self.rate(way) for way in WAYS}
        if any(rate is None for rate in rates.values()):
            return None
        fastest = max(WAYS, key=rates.__getitem__)
        if rates[fastest] > LEAD_MARGIN * rates[self.leading]:
            self.leading = fastest
        return self.leading

    def tried(self, leader_before: str | None) -> None:
        """After a try of another way than the leading one: try less often if the lead stayed, as often as at first
        if it changed."""
        if self.leader() == leader_before:
            self.try_interval = min(2 * self.try_interval, LONGEST_TRY_INTERVAL)
        else:
            self.try_interval = FIRST_TRY_INTERVAL

    def start_call(self) -> bool:
        """Whether this call may run the heads: always, unless plain passes were measured faster than theirs and
        their next trial is still some calls away. A trial measures the heads' ways anew, over a few passes
        each: what they are worth may have changed with the prompts."""
        if self.heads_pay is not False:
            return True
        if self.plain_calls_left > 0:
            self.plain_calls_left -= 1
            return False
        for way in WAYS[:-1]:
            self.passes[way].clear()
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
    heads: plain). Adaptive: as the module docstring says, from `memory`, the threshold moved by `step`."""

    def __init__(self, num_aux_heads: int, memory: DraftingMemory | None = None, *, step: float = 0.05):
        self.num_aux_heads, self.memory, self.step = num_aux_heads, memory, step
        self.since_try = 0
        self.trying: str | None = None  # the way tried now
        self.try_passes_left = 0
        self.leader_before_try: str | None = None

    def way(self) -> str:
        """The way the next pass drafts."""
        if self.num_aux_heads == 0:
            return "plain"
        memory = self.memory
        if memory is None:
            return "full"
        untried = [way for way in WAYS if len(memory.passes[way]) < memory.trial_passes]
        if untried:
            return untried[0]
        if self.trying is not None:
            return self.trying
        leader = memory.leader()
        if leader == "plain":  # the heads stop for the rest of the call: nothing to feed them, nothing to try
            self.num_aux_heads = 0
            return "plain"
        self.since_try += 1
        if self.since_try < memory.try_interval:
            return leader
        others = [way for way in WAYS if way != leader]
        memory.tries += 1
        self.since_try, self.leader_before_try = 0, leader
        self.trying, self.try_passes_left = others[memory.tries % len(others)], TRY_PASSES
        return self.trying

    def depth(self, way: str, confidence: torch.Tensor) -> int:
        """Drafts to verify this pass, given each head's top probability `[rows, num_aux_heads]`: every head for
        `full`, none for `plain`; for `confident`, the longest run of leading heads at or above the threshold,
        over the rows (zero allowed)."""
        if way == "full":
            return self.num_aux_heads
        if way == "plain":
            return 0
        confident = (confidence >= self.memory.threshold).long().cumprod(dim=-1)
        return int(confident.sum(-1).max())

    @property
    def heads_stopped(self) -> bool:
        """Whether the heads run no more in this call."""
        return self.num_aux_heads == 0

    def charge(self, way: str, seconds: float) -> None:
        """Time spent for `way` outside its passes (feeding the heads, when it drafts again, what plain passes
        skipped)."""
        if self.memory is not None:
            self.memory.record(way, seconds, 0)

    def record(self, way: str, drafted: int, accepted: torch.Tensor, seconds: float, tokens: int) -> None:
        """What one pass gave: `drafted` drafts verified, `accepted[row]` tokens accepted (the model's own next token
        and the drafts that held), `tokens` kept in `seconds`."""
        memory = self.memory
        if memory is None:
            return
        if way == "confident":
            held = accepted - 1
            if drafted > 0 and bool((held >= drafted).all()):
                memory.threshold = max(self.step, memory.threshold - self.step)
            elif drafted > 0:
                memory.threshold = min(1.0 - self.step, memory.threshold + self.step)
            else:  # nothing was confident enough: lower the bar a little, to try again
                memory.threshold = max(self.step, memory.threshold - self.step / 5)
        memory.record(way, seconds, tokens)
        if self.trying is not None and way == self.trying:
            self.try_passes_left -= 1
            if self.try_passes_left == 0:
                memory.tried(self.leader_before_try)
                self.trying = None


_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def drafting_memory(heads: AuxiliaryHeads, shape: tuple) -> DraftingMemory:
    """The memory of `heads` drafting in `shape` (heads used, candidates, tree size, draft dtype, batch size,
    temperature) in this process; forgotten with the heads."""
    return _MEMORIES.setdefault(heads, {}).setdefault(shape, DraftingMemory())
