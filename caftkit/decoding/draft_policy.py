"""How far to draft at each verification pass: fixed, or adaptive so that drafting is never much slower than not.

Drafting has a price at every pass: the heads (copies of the last layer) run over the verified block and the
unembedding runs once over their states. At batch 1 a pass costs about the weights it reads, so the price of
drafting relative to a plain decoding step is about `drafting_cost`: the heads' and the unembedding's parameters
over the model's layers' and unembedding's. A pass that drafts is worth it only when it yields more than `1 +
drafting_cost` tokens on average.

The adaptive policy (on by default):

- drafts, at each pass, only the leading heads whose top probability reaches a threshold (zero drafts allowed: the
  pass then verifies the model's own next token alone), and tunes the threshold from what was accepted: down a step
  when every draft held (draft more), up a step when one was rejected (draft less), as transformers'
  `assistant_confidence_threshold` and SpecDec++ stop drafting where acceptance becomes unlikely;
- stops running the heads for the rest of the generation once the tokens per pass of its last passes fall below
  the break-even `1 + drafting_cost`: decoding goes on one token per pass, as plain decoding does, without the
  heads' price.

What a pass really costs is the machine's to say: on a CPU, verifying a block of drafts costs far more than the
weights it reads (a pass drafting with one head of the bundled model took 1.9 plain steps, against the 1.2 the weights
imply). So the policy also remembers, for each set of heads and draft shape, how fast decoding went in this process
with the heads running and without them (`DraftingMemory`), and judges from those rates:

- once the heads have been measured slower than plain decoding, the next calls decode plainly from the start, as
  `generate()` does, and the heads are tried again after 4, then 8, 16, ... calls (at most 64);
- within a call, the break-even is the measured cost of a pass that runs the heads, once it is known.

Which tokens come out never depends on the policy (the model chooses every token); only how many passes they take.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import torch

from ..core.architecture import find_model_parts
from ..core.heads import AuxiliaryHeads


def drafting_cost(model, heads: AuxiliaryHeads, num_aux_heads: int) -> float:
    """The weights drafting reads at each pass (the first `num_aux_heads` heads and the unembedding) over those a
    plain decoding step reads (every decoder layer and the unembedding)."""
    parts = find_model_parts(model)

    def size(modules) -> int:
        return sum(param.numel() for module in modules for param in module.parameters())

    unembedding = parts.lm_head.weight.numel()
    return (size(heads.layers[:num_aux_heads]) + unembedding) / (size(parts.layers) + unembedding)


class DraftPolicy:
    """How many drafts each pass verifies. Fixed (`adaptive=False`): always `num_aux_heads`. Adaptive: as the module
    docstring says, from a starting `threshold` moved by `step`, judged over the last `window` passes once
    `trial_passes` have run."""

    def __init__(self, num_aux_heads: int, cost: float, *, adaptive: bool = True, threshold: float = 0.3,
                 step: float = 0.05, trial_passes: int = 8, window: int = 16):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the drafting threshold must be in [0, 1], got {threshold}")
        self.num_aux_heads, self.cost, self.adaptive = num_aux_heads, cost, adaptive
        self.threshold, self.step, self.trial_passes = threshold, step, trial_passes
        self.tokens_per_pass: deque[float] = deque(maxlen=window)
        self.passes = 0
        self.active = num_aux_heads > 0

    def depth(self, confidence: torch.Tensor) -> int:
        """Drafts to verify this pass, given each head's top probability `[rows, num_aux_heads]`: every head when
        fixed; else the longest run of leading heads at or above the threshold, over the rows."""
        if not self.active:
            return 0
        if not self.adaptive:
            return self.num_aux_heads
        confident = (confidence >= self.threshold).long().cumprod(dim=-1)
        return int(confident.sum(-1).max())

    def record(self, drafted: int, accepted: torch.Tensor) -> None:
        """What one pass gave: `drafted` drafts verified, `accepted[row]` tokens accepted (the model's own next token
        and the drafts that held)."""
        self.passes += 1
        if not self.adaptive or not self.active:
            return
        held = accepted - 1
        if drafted > 0 and bool((held >= drafted).all()):
            self.threshold = max(self.step, self.threshold - self.step)
        elif drafted > 0 and bool((held < drafted).any()):
            self.threshold = min(1.0 - self.step, self.threshold + self.step)
        elif drafted == 0:  # nothing was confident enough: lower the bar a little, to try again
            self.threshold = max(self.step, self.threshold - self.step / 5)
        self.tokens_per_pass.append(float(accepted.float().mean()))
        recent = sum(self.tokens_per_pass) / len(self.tokens_per_pass)
        if self.passes >= self.trial_passes and recent < 1.0 + self.cost:
            self.active = False


# Calls decoded plainly before the heads are tried again, after a first verdict against them; doubled after each
# trial that confirms it, up to the most.
FIRST_PLAIN_SPELL, LONGEST_PLAIN_SPELL = 4, 64


@dataclass
class DraftingMemory:
    """How fast one set of heads with one draft shape decoded in this process: seconds and tokens of the passes
    that ran the heads and of those that did not, and the verdict drawn from them."""

    heads_seconds: float = 0.0
    heads_tokens: float = 0.0
    heads_passes: int = 0
    plain_seconds: float = 0.0
    plain_tokens: float = 0.0
    plain_passes: int = 0
    heads_pay: bool | None = None
    plain_calls_left: int = 0
    plain_spell: int = FIRST_PLAIN_SPELL

    def record(self, heads_ran: bool, seconds: float, tokens: float, passes: int = 1) -> None:
        """A stretch of decoding (one pass, or a plain call of `passes` steps) and the tokens it gave."""
        if heads_ran:
            self.heads_seconds, self.heads_tokens = self.heads_seconds + seconds, self.heads_tokens + tokens
            self.heads_passes += passes
        else:
            self.plain_seconds, self.plain_tokens = self.plain_seconds + seconds, self.plain_tokens + tokens
            self.plain_passes += passes

    def measured_cost(self) -> float | None:
        """What a pass running the heads costs beyond a plain step (0.9: 1.9 plain steps), once both were timed."""
        if not (self.heads_passes and self.plain_passes):
            return None
        return max(0.0, (self.heads_seconds / self.heads_passes) / (self.plain_seconds / self.plain_passes) - 1.0)

    def start_call(self) -> bool:
        """Whether this call may run the heads: always, unless they were measured slower than plain decoding and
        their next trial is still some calls away."""
        if self.heads_pay is not False:
            return True
        if self.plain_calls_left > 0:
            self.plain_calls_left -= 1
            return False
        return True  # a trial: what the heads are worth may have changed with the prompts

    def end_call(self) -> None:
        """Draw the verdict from the rates measured so far: the heads pay when decoding with them gave more tokens
        per second than without them."""
        if not (self.heads_tokens and self.plain_tokens):
            if self.heads_tokens and self.heads_pay is None:
                self.heads_pay = True  # the heads ran the whole call: the policy found them paying
            return
        pays = self.heads_tokens / self.heads_seconds > self.plain_tokens / self.plain_seconds
        if not pays:
            self.plain_calls_left = self.plain_spell
            self.plain_spell = min(2 * self.plain_spell, LONGEST_PLAIN_SPELL)
        else:
            self.plain_spell = FIRST_PLAIN_SPELL
        self.heads_pay = pays


_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def drafting_memory(heads: AuxiliaryHeads, shape: tuple) -> DraftingMemory:
    """The memory of `heads` drafting in `shape` (heads used, candidates, tree size, draft dtype, batch size) in
    this process; forgotten with the heads."""
    return _MEMORIES.setdefault(heads, {}).setdefault(shape, DraftingMemory())
