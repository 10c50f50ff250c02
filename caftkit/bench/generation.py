"""`caft bench generate`: plain `generate()` against self-speculative decoding, on the same prompts.

Both sides run in one process on the same batches of prompts (chat template applied, left-padded, grouped by
length), after one untimed warm-up batch each; each batch is decoded plainly and then with every draft shape asked
for, each with fixed and with adaptive drafting (`decoding/draft_policy.py`), so that all are timed under the same
conditions; greedily, and sampled at each temperature asked for. Reported per temperature, batch size, draft shape
and drafting: new tokens per second of each side, their ratio, the mean tokens accepted per verification pass, and
(greedy only: samples differ by the random stream) whether every answer is token for token the same.

A shared machine's speed drifts by several percent within minutes, more than the effects adaptive drafting is tuned
by. `repeats` runs every prompt on every side that many rounds in turn and gives each round's speedup beside the
pooled one: their spread is what the noise moves a ratio by. Every round starts with the heads' drafting memory
forgotten (the warm-up's too), so each measures what a process new to the heads gets, adaptive drafting's trials
timed. An adaptive row also gives its tokens per second over fixed drafts' of the same shape (`over_fixed`,
pooled and per round): where the two are close, the rounds say whether a difference is more than the noise.

The ratio is split in two factors, so that a slow result says what to improve: `pass_reduction`, how many times
fewer forward passes speculative decoding made (what the heads' acceptance buys), and `pass_cost`, how many plain
one-token steps a speculative pass (verification of the drafted block plus drafting) costs in time (what the
device charges for a wider pass). With the same tokens on both sides, speedup = pass_reduction / pass_cost; at
batch 1 a speedup of 2 needs `mean_accepted` of about twice `pass_cost`.

A draft shape is `H` (a chain: the best candidate of each of the first H heads), `HxK` (a tree through the top K
candidates of H heads, of the default size) or `HxK:N` (the same tree cut to its N likeliest drafts).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from ..core.heads import attach_heads, check_heads_fit, get_heads
from ..data import ReadStats, iter_prompts, render_prompt
from ..decoding.draft_policy import forget_drafting
from ..decoding.greedy import stop_token_ids
from ..decoding.settings import Sampling
from ..decoding.speculative import generate
from ..models import load_model, load_tokenizer
from .settings import DraftShape, GenerationBenchSettings


@dataclass
class GenerationBenchRow:
    """One batch size and draft shape of `caft bench generate`: tokens, seconds and passes summed over the `repeats`
    rounds, answers identical to plain decoding's among the prompts' answers of every round, and each round's
    speedup."""

    batch_size: int
    draft: str
    drafting: str
    temperature: float
    prompts: int
    plain_tokens: int
    plain_seconds: float
    speculative_tokens: int
    speculative_seconds: float
    mean_accepted: float
    identical: int | None
    plain_passes: int
    speculative_passes: int
    repeats: int = 1
    speedups: list[float] = field(default_factory=list)
    # Adaptive rows: tokens per second over those of fixed drafts of the same shape, pooled and per round (None and
    # empty where fixed drafts were not measured, and on fixed rows).
    over_fixed: float | None = None
    over_fixed_rounds: list[float] = field(default_factory=list)

    @property
    def plain_tokens_per_second(self) -> float:
        return self.plain_tokens / self.plain_seconds

    @property
    def speculative_tokens_per_second(self) -> float:
        return self.speculative_tokens / self.speculative_seconds

    @property
    def speedup(self) -> float:
        """Speculative tokens/s over plain tokens/s."""
        return self.speculative_tokens_per_second / self.plain_tokens_per_second

    @property
    def pass_reduction(self) -> float:
        """Forward passes of plain decoding over those of speculative decoding (prefill included on both sides)."""
        return self.plain_passes / self.speculative_passes

    @property
    def pass_cost(self) -> float:
        """Mean time of a speculative pass (verification and drafting) over that of a plain decoding step."""
        return (self.speculative_seconds / self.speculative_passes) / (self.plain_seconds / self.plain_passes)


def bench_prompts(tokenizer, data: str, num_prompts: int, skip: int = 0, exclude: str | None = None,
                  max_prompt_tokens: int = 512) -> list[list[int]]:
    """Token ids of `num_prompts` prompts of `data` (first user turns, chat template applied): the first ones
    after skipping `skip`, leaving out ids found in the JSONL file `exclude` (e.g. the heads' training data)."""
    excluded: set[str] = set()
    if exclude:
        with open(exclude, encoding="utf-8") as handle:
            excluded = {json.loads(line).get("id") for line in handle if line.strip()}
    prompts, seen = [], 0
    for record in iter_prompts(data, ReadStats()):
        if record.id in excluded:
            continue
        ids = tokenizer(render_prompt(tokenizer, record.messages), add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            continue
        seen += 1
        if seen <= skip:
            continue
        prompts.append(ids)
        if len(prompts) == num_prompts:
            break
    if len(prompts) < num_prompts:
        raise ValueError(f"{data}: only {len(prompts)} usable prompts after skipping and excluding, {num_prompts} "
                         "asked for")
    return prompts


def _batches(prompts: list[list[int]], batch_size: int, pad_id: int, device) -> list[tuple[torch.Tensor,
                                                                                            torch.Tensor]]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        group = [prompts[i] for i in order[start: start + batch_size]]
        width = max(map(len, group))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        batches.append((ids, mask))
    return batches


def _cut(tokens: list[int], stop_ids: set[int]) -> list[int]:
    stop = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
    return tokens if stop is None else tokens[: stop + 1]


class ForwardCounter:
    """Counts the forward calls of a model (a hook on the instance; removed on exit)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.calls += 1

    def __exit__(self, *exc):
        self._handle.remove()


def _plain(model, ids, mask, max_new_tokens, stop_ids, pad_id, sampling: Sampling) -> list[list[int]]:
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         eos_token_id=sorted(stop_ids), pad_token_id=pad_id, **sampling.generate_kwargs())
    return [_cut(row, stop_ids) for row in out[:, ids.shape[1]:].tolist()]


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _speculative(model, ids, mask, max_new_tokens, stop_ids, shape: DraftShape, drafting: str, draft_dtype,
                 sampling: Sampling):
    return generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                    eos_token_id=sorted(stop_ids), num_aux_heads=shape.num_aux_heads, candidates=shape.candidates,
                    tree_size=shape.tree_size, draft_dtype=draft_dtype, sampling=sampling,
                    adaptive=drafting == "adaptive")


def _timed(device, run):
    _synchronize(device)
    started = time.perf_counter()
    result = run()
    _synchronize(device)
    return result, time.perf_counter() - started


def _round(model, batches, max_new_tokens, stop_ids, pad_id, sides, draft_dtype, sampling: Sampling) -> dict:
    """One round: each batch decoded plainly, then by every side in turn; the answers, seconds, accepted tokens per
    pass and passes of each (`"plain"` and each side)."""
    device = next(model.parameters()).device
    measured = {side: {"out": [], "seconds": 0.0, "accepted": [], "passes": 0} for side in ["plain", *sides]}
    plain = measured["plain"]
    for ids, mask in batches:
        with ForwardCounter(model) as counter:
            out, seconds = _timed(device, partial(_plain, model, ids, mask, max_new_tokens, stop_ids, pad_id,
                                                  sampling))
        plain["out"] += out
        plain["seconds"] += seconds
        plain["passes"] += counter.calls
        for shape, way in sides:
            result, seconds = _timed(device, partial(_speculative, model, ids, mask, max_new_tokens, stop_ids, shape,
                                                     way, draft_dtype, sampling))
            side = measured[shape, way]
            side["out"] += result.sequences
            side["seconds"] += seconds
            side["accepted"] += result.accepted_per_step
            side["passes"] += result.forward_passes
    return measured


def _tokens_per_second(measured: dict) -> float:
    return sum(map(len, measured["out"])) / measured["seconds"]


def _set_against_fixed(rows: list[GenerationBenchRow]) -> None:
    """Give each adaptive row of `rows` (one temperature and batch size) its speed over the fixed row of its shape:
    its speculative tokens/s over theirs, pooled, and per round the ratio of their speedups (over the same plain
    seconds, the same thing)."""
    fixed = {row.draft: row for row in rows if row.drafting == "fixed"}
    for row in rows:
        against = fixed.get(row.draft)
        if row.drafting == "adaptive" and against is not None:
            row.over_fixed = row.speculative_tokens_per_second / against.speculative_tokens_per_second
            row.over_fixed_rounds = [ours / theirs for ours, theirs in zip(row.speedups, against.speedups)]


def bench_generate(model, tokenizer, prompts: list[list[int]], batch_sizes: list[int], max_new_tokens: int,
                   shapes: list[DraftShape], draft_dtype=None, drafting: tuple[str, ...] = ("fixed", "adaptive"),
                   samplings: tuple[Sampling, ...] = (Sampling(),), repeats: int = 1) -> list[GenerationBenchRow]:
    """Time plain `generate()` and speculative decoding with each draft shape and each way of `drafting` on the
    same prompts, at each batch size and with each of `samplings` (drafting in `draft_dtype`, default the
    model's), in `repeats` rounds. Each round starts with the heads' drafting memory forgotten, so that every round
    measures what a process new to these heads gets, adaptive drafting's trials included."""
    device = next(model.parameters()).device
    stop_ids = set(stop_token_ids(model.generation_config, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    heads = get_heads(model)
    model.eval()
    sides = [(shape, way) for shape in shapes for way in drafting]
    rows = []
    for sampling in samplings:
        for batch_size in batch_sizes:
            batches = _batches(prompts, batch_size, pad_id, device)
            # Warm-up: first calls pay for allocations and lazy initialisation, on every side.
            _plain(model, *batches[0], min(8, max_new_tokens), stop_ids, pad_id, sampling)
            for shape, way in sides:
                _speculative(model, *batches[0], min(8, max_new_tokens), stop_ids, shape, way, draft_dtype, sampling)
            rounds = []
            for _ in range(repeats):
                forget_drafting(heads)
                rounds.append(_round(model, batches, max_new_tokens, stop_ids, pad_id, sides, draft_dtype, sampling))
            plain = [measured["plain"] for measured in rounds]
            plain_out = [answer for measured in plain for answer in measured["out"]]
            for shape, way in sides:
                side = [measured[shape, way] for measured in rounds]
                out = [answer for measured in side for answer in measured["out"]]
                accepted = [value for measured in side for value in measured["accepted"]]
                rows.append(GenerationBenchRow(
                    batch_size=batch_size, draft=str(shape), drafting=way, temperature=sampling.temperature,
                    prompts=len(prompts), plain_tokens=sum(map(len, plain_out)),
                    plain_seconds=sum(measured["seconds"] for measured in plain),
                    speculative_tokens=sum(map(len, out)),
                    speculative_seconds=sum(measured["seconds"] for measured in side),
                    mean_accepted=sum(accepted) / len(accepted),
                    identical=sum(a == b for a, b in zip(plain_out, out)) if sampling.greedy else None,
                    plain_passes=sum(measured["passes"] for measured in plain),
                    speculative_passes=sum(measured["passes"] for measured in side), repeats=repeats,
                    speedups=[_tokens_per_second(drafted) / _tokens_per_second(alone)
                              for drafted, alone in zip(side, plain)]))
            _set_against_fixed(rows[-len(sides):])
    return rows


def rows_as_dict(rows: list[GenerationBenchRow]) -> list[dict]:
    """Each row with its derived rates, rounded for printing and JSON."""
    return [{**asdict(row), "plain_seconds": round(row.plain_seconds, 3),
             "speculative_seconds": round(row.speculative_seconds, 3),
             "plain_tokens_per_second": round(row.plain_tokens_per_second, 2),
             "speculative_tokens_per_second": round(row.speculative_tokens_per_second, 2),
             "speedup": round(row.speedup, 3), "speedups": [round(value, 3) for value in row.speedups],
             "over_fixed": None if row.over_fixed is None else round(row.over_fixed, 3),
             "over_fixed_rounds": [round(value, 3) for value in row.over_fixed_rounds],
             "mean_accepted": round(row.mean_accepted, 3),
             "pass_reduction": round(row.pass_reduction, 3), "pass_cost": round(row.pass_cost, 3)} for row in rows]


def run_generation_bench(settings: GenerationBenchSettings) -> dict:
    """Load the model and heads, measure every batch size and draft shape, and return the result as a dict."""
    check_heads_fit(settings.heads, settings.model)
    tokenizer = load_tokenizer(settings.model, settings.chat_template)
    prompts = bench_prompts(tokenizer, settings.data, settings.num_prompts, skip=settings.skip,
                            exclude=settings.exclude)
    model = load_model(settings.model, settings.dtype).to(settings.device)
    attach_heads(model, settings.heads)
    shapes = settings.shapes or [DraftShape(get_heads(model).num_aux_heads)]
    samplings = tuple(Sampling(temperature=t, top_p=settings.top_p if t > 0 else 1.0, seed=settings.seed)
                      for t in settings.temperatures)
    rows = rows_as_dict(bench_generate(model, tokenizer, prompts, settings.batch_sizes, settings.max_new_tokens,
                                       shapes, settings.draft_dtype, tuple(settings.drafting), samplings,
                                       settings.repeats))
    return {"model": settings.model, "heads": settings.heads, "device": settings.device, "dtype": settings.dtype,
            "draft_dtype": settings.draft_dtype or settings.dtype, "max_new_tokens": settings.max_new_tokens,
            "top_p": settings.top_p, "seed": settings.seed, "repeats": settings.repeats, "rows": rows}


