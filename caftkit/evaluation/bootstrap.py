"""Paired bootstrap statistics of `caft compare`: a baseline and a CAFT arm scored on the same test examples.

Each arm brings one record set per training seed: a mapping from a column name to a sequence of per-example values,
aligned by test example (the same examples in the same order in every seed of both arms), e.g.
`{"answer": ["CCO", ...], "validity": [1, 0, ...], "exact_match": [...], "tanimoto": [0.31, ...]}`. Seed k of one
arm is paired with seed k of the other.

- A per-example metric is the mean of one numeric column.
- A set-level metric (uniqueness, novelty, ...) is not a mean of per-example values, so it is recomputed on every
  resample by a `SetMetric`: `metric(indices, records) -> float`, where `indices` is a 1-D integer array of example
  positions (repeats allowed: a bootstrap resample) and `records` is one arm-seed's record set.

The difference of every metric gets a paired percentile bootstrap confidence interval (`paired_bootstrap`), over the
test examples and the seeds; `comparison_table` gives one `ComparisonRow` per metric (`comparison_report` writes
them out).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SetMetric = Callable[[np.ndarray, Mapping[str, Sequence]], float]
"""A metric of a set of examples: `(indices, records) -> float`, `indices` a 1-D array of example positions."""

Records = Mapping[str, Sequence]
"""One arm-seed's per-example columns: `{column: [value of example 0, value of example 1, ...]}`."""

# Rows of the index matrix evaluated at once: bounds the float temporaries of a vectorised statistic to
# about _CHUNK_ROWS x n_examples values whatever the number of resamples.
_CHUNK_ROWS = 512


@dataclass(frozen=True)
class Resamples:
    """Bootstrap draws shared by both arms (and by every metric of one comparison).

    `examples[r]` holds the test-example positions of resample r, `(n_resamples, n_examples)`; `seeds[r]` the seed
    positions of resample r, `(n_resamples, n_seeds)`."""

    examples: np.ndarray
    seeds: np.ndarray

    @property
    def n_resamples(self) -> int:
        return int(self.examples.shape[0])

    @property
    def n_examples(self) -> int:
        return int(self.examples.shape[1])

    @property
    def n_seeds(self) -> int:
        return int(self.seeds.shape[1])


def draw_resamples(n_examples: int, n_seeds: int = 1, n_resamples: int = 10000, seed: int = 0) -> Resamples:
    """The bootstrap draws of `paired_bootstrap`, deterministic given `seed`.

    With `rng = numpy.random.default_rng(seed)`: first the example matrix
    `rng.integers(0, n_examples, size=(n_resamples, n_examples), dtype=numpy.int32)`, then, only when
    `n_seeds > 1`, the seed matrix `rng.integers(0, n_seeds, size=(n_resamples, n_seeds))`; with one seed the seed
    matrix is all zeros and nothing more is drawn, so the example draws do not depend on the number of seeds.
    The example matrix takes 4 x n_resamples x n_examples bytes."""
    if n_examples < 1:
        raise ValueError(f"a bootstrap needs at least one test example, got {n_examples}")
    if n_seeds < 1:
        raise ValueError(f"a bootstrap needs at least one seed per arm, got {n_seeds}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    dtype = np.int32 if n_examples < 2**31 else np.int64
    examples = rng.integers(0, n_examples, size=(n_resamples, n_examples), dtype=dtype)
    if n_seeds > 1:
        seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    else:
        seeds = np.zeros((n_resamples, 1), dtype=np.int64)
    return Resamples(examples, seeds)


@dataclass(frozen=True)
class BootstrapResult:
    """A difference b - a with its paired percentile bootstrap confidence interval.

    `a_value` and `b_value` are each arm's metric (mean over seeds of the per-seed metric), `estimate` is
    `b_value - a_value`, `[low, high]` the interval at level `confidence`; `a_per_seed` / `b_per_seed` hold the
    per-seed metrics."""

    estimate: float
    low: float
    high: float
    a_value: float
    b_value: float
    a_per_seed: tuple[float, ...]
    b_per_seed: tuple[float, ...]
    confidence: float
    n_resamples: int
    n_examples: int
    n_seeds: int

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside the interval."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(a: Sequence | np.ndarray, b: Sequence | np.ndarray, statistic: Callable = np.mean,
                     n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
                     resamples: Resamples | None = None) -> BootstrapResult:
    """`statistic(b) - statistic(a)` with a paired percentile bootstrap confidence interval.

    `a` and `b` are per-example values aligned by test example: shape `(n_examples,)` for one seed, or
    `(n_seeds, n_examples)` for several seeds (row k of `a` paired with row k of `b`). `statistic` is a NumPy-style
    reduction called as `statistic(values, axis=-1)` (`numpy.mean`, `numpy.median`, ...).

    Point estimate: each arm's value is the mean over seeds of `statistic` of that seed's examples; the estimate
    is the difference of the two arms' values.

    Interval: resample r draws test examples with replacement (`resamples.examples[r]`) and seeds with replacement
    (`resamples.seeds[r]`); the same example positions are used for both arms and every seed, and the same seed
    positions for both arms, so both sources of variation -- which test examples, which training seeds -- are
    resampled while the pairing is kept. The arm's value on resample r is the mean over the drawn seeds of
    `statistic` on the drawn examples; `[low, high]` are the `(1 - confidence) / 2` and `(1 + confidence) / 2`
    quantiles (NumPy's default linear interpolation) of the resampled differences. With one seed the seed draw is
    the identity, and the result is exactly the single-seed paired bootstrap.

    The draws come from `draw_resamples(n_examples, n_seeds, n_resamples, seed)` unless `resamples` is given
    (then `n_resamples` and `seed` are not used)."""
    a_values, b_values = _seed_matrix(a, "a"), _seed_matrix(b, "b")
    if a_values.shape != b_values.shape:
        raise ValueError(f"the arms are not paired: a has shape {a_values.shape} (seeds, examples), "
                         f"b has shape {b_values.shape}")

    def per_seed(values: np.ndarray) -> list[Callable[[np.ndarray], np.ndarray]]:
        return [lambda rows, row_values=row_values: np.asarray(statistic(row_values[rows], axis=-1), dtype=float)
                for row_values in values]

    return _bootstrap(per_seed(a_values), per_seed(b_values), a_values.shape[1], n_resamples=n_resamples,
                      confidence=confidence, seed=seed, resamples=resamples)


def _seed_matrix(values: Sequence | np.ndarray, name: str) -> np.ndarray:
    """`values` as a float array of shape (n_seeds, n_examples)."""
    matrix = np.asarray(values, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"{name} must hold per-example values, shape (n_examples,) or (n_seeds, n_examples); "
                         f"got shape {np.shape(values)}")
    return matrix


def _bootstrap(a_seeds: Sequence[Callable[[np.ndarray], np.ndarray]],
               b_seeds: Sequence[Callable[[np.ndarray], np.ndarray]], n_examples: int, *, n_resamples: int,
               confidence: float, seed: int, resamples: Resamples | None, name: str = "the statistic"
               ) -> BootstrapResult:
    """The paired bootstrap of `paired_bootstrap` for metrics given per arm and seed as `rows -> values`: a
    function from an index matrix `(m, n_examples)` to the metric on each of its m rows."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if len(a_seeds) != len(b_seeds):
        raise ValueError(f"the arms are not paired: {len(a_seeds)} seeds against {len(b_seeds)}")
    n_seeds = len(a_seeds)
    if resamples is None:
        resamples = draw_resamples(n_examples, n_seeds, n_resamples, seed)
    elif resamples.n_examples != n_examples or resamples.n_seeds != n_seeds:
        raise ValueError(f"the resamples are drawn for {resamples.n_examples} examples and {resamples.n_seeds} "
                         f"seeds, the data has {n_examples} examples and {n_seeds} seeds")

    everything = np.arange(n_examples)[None, :]
    a_per_seed = [float(metric(everything)[0]) for metric in a_seeds]
    b_per_seed = [float(metric(everything)[0]) for metric in b_seeds]
    a_value, b_value = float(np.mean(a_per_seed)), float(np.mean(b_per_seed))

    differences = _arm_on_resamples(b_seeds, resamples) - _arm_on_resamples(a_seeds, resamples)
    if not np.all(np.isfinite(differences)):
        raise ValueError(f"{name} is not finite on some bootstrap resamples")
    alpha = 1.0 - confidence
    low, high = np.quantile(differences, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(estimate=b_value - a_value, low=float(low), high=float(high), a_value=a_value,
                           b_value=b_value, a_per_seed=tuple(a_per_seed), b_per_seed=tuple(b_per_seed),
                           confidence=confidence, n_resamples=resamples.n_resamples, n_examples=n_examples,
                           n_seeds=n_seeds)


def _arm_on_resamples(per_seed: Sequence[Callable[[np.ndarray], np.ndarray]], resamples: Resamples) -> np.ndarray:
    """One arm's value on every resample: the mean over the drawn seeds of the metric on the drawn examples."""
    # every seed on every example resample, (n_resamples, n_seeds); the seed draw then picks columns per row
    on_examples = np.stack([in_chunks(metric, resamples.examples) for metric in per_seed], axis=1)
    return np.take_along_axis(on_examples, resamples.seeds, axis=1).mean(axis=1)


def in_chunks(metric: Callable[[np.ndarray], np.ndarray], examples: np.ndarray) -> np.ndarray:
    """`metric` (index rows -> one value per row) on every row of `examples`, the resampled example indices,
    a bounded number of rows at a time."""
    return np.concatenate([metric(examples[start: start + _CHUNK_ROWS])
                           for start in range(0, len(examples), _CHUNK_ROWS)])


def uniqueness_metric(answer_column: str = "answer", valid_column: str = "validity") -> SetMetric:
    """A `SetMetric`: distinct valid answers / valid answers (0 when no answer is valid).

    On the whole test set this is exactly the number of distinct valid answers over the number of valid answers.
    It is computed as the mean, over the selected valid examples, of 1 / (how many valid examples of the whole test
    set share that answer): the sum of these weights over the test set is the number of distinct valid answers.
    Written so, an example drawn twice in a bootstrap resample counts as two examples each carrying its own share,
    not as a repeated answer; counting repeats as duplicates would pull the resampled uniqueness far below the
    observed one (about a third of a resample's draws are repeats), and counting only the distinct draws would
    measure a smaller test set with fewer chances of collision."""

    # per record set: each example's weight (0 for an invalid answer) and validity, computed on the first call
    # since a bootstrap calls the metric thousands of times on the same records; the records object is kept
    # referenced so that its id cannot be reused by another object
    prepared: dict[int, tuple[Records, np.ndarray, np.ndarray]] = {}

    def uniqueness(indices: np.ndarray, records: Records) -> float:
        if id(records) not in prepared:
            answers, valid = records[answer_column], [bool(v) for v in records[valid_column]]
            shares: dict = {}
            for answer, is_valid in zip(answers, valid):
                if is_valid:
                    shares[answer] = shares.get(answer, 0) + 1
            weights = np.array([1.0 / shares[a] if v else 0.0 for a, v in zip(answers, valid)])
            prepared[id(records)] = (records, weights, np.array(valid, dtype=float))
        _, weights, valid = prepared[id(records)]
        n_valid = valid[indices].sum()
        return float(weights[indices].sum() / n_valid) if n_valid else 0.0

    return uniqueness


def subset_mean_metric(column: str, where_column: str, value) -> SetMetric:
    """A `SetMetric`: the mean of `column` over the examples whose `where_column` equals `value` (a breakdown, such
    as exact match on the answers of four digits); nan on a resample that draws none of them."""

    # per record set: the column as floats and the subset's mask, computed on the first call (see uniqueness)
    prepared: dict[int, tuple[Records, np.ndarray, np.ndarray]] = {}

    def subset_mean(indices: np.ndarray, records: Records) -> float:
        if id(records) not in prepared:
            values = np.array([float(v) for v in records[column]])
            inside = np.array([v == value for v in records[where_column]], dtype=float)
            prepared[id(records)] = (records, values * inside, inside)
        _, masked, inside = prepared[id(records)]
        count = inside[indices].sum()
        return float(masked[indices].sum() / count) if count else float("nan")

    return subset_mean


@dataclass(frozen=True)
class ComparisonRow:
    """One metric of the comparison: each arm's value, the difference caft - ntp and its confidence interval.

    `percent` says the metric is a rate shown in percent (its difference in percentage points); `ntp_per_seed` and
    `caft_per_seed` hold each arm's metric per seed (their means are `ntp` and `caft`)."""

    metric: str
    ntp: float
    caft: float
    difference: float
    low: float
    high: float
    excludes_zero: bool
    percent: bool
    confidence: float
    n_examples: int
    n_seeds: int
    n_resamples: int
    ntp_per_seed: tuple[float, ...] = ()
    caft_per_seed: tuple[float, ...] = ()


def comparison_table(ntp: Records | Sequence[Records], caft: Records | Sequence[Records], *,
                     metrics: Sequence[str] | None = None, set_metrics: Mapping[str, SetMetric] | None = None,
                     percent: Collection[str] | None = None, n_resamples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> list[ComparisonRow]:
    """One `ComparisonRow` per metric: per-example metrics (`metrics`) first, then set-level ones (`set_metrics`).

    `ntp` and `caft` are each a list of record sets, one per seed (a single record set stands for one seed); seed
    k of one arm is paired with seed k of the other and every column is aligned by test example.
    `metrics` defaults to every column of ntp's first seed whose values are all numbers (booleans included) and
    that is not the name of a set-level metric. `percent` names the metrics shown as percentages; by default the
    per-example metrics whose values are all 0 or 1, and every set-level metric (a fraction of the examples).

    Every metric is resampled with the same draws (`draw_resamples(n_examples, n_seeds, n_resamples, seed)`), and
    each row's interval is the one of `paired_bootstrap` (for a set-level metric, the metric is recomputed on each
    resample of each seed instead of a mean)."""
    ntp_seeds, caft_seeds = _seed_list(ntp, "ntp"), _seed_list(caft, "caft")
    if len(ntp_seeds) != len(caft_seeds):
        raise ValueError(f"the arms are not paired: ntp has {len(ntp_seeds)} seeds, caft has {len(caft_seeds)}")
    set_metrics = dict(set_metrics or {})
    if metrics is None:
        metrics = [name for name, values in ntp_seeds[0].items()
                   if name not in set_metrics and len(values) and all(_is_number(v) for v in values)]
    metrics = list(metrics)
    both = sorted(set(metrics) & set(set_metrics))
    if both:
        raise ValueError(f"metrics {both} are named both as per-example and as set-level metrics")
    if not metrics and not set_metrics:
        raise ValueError("nothing to compare: no numeric per-example column and no set-level metric")
    n_examples = _common_length(ntp_seeds + caft_seeds, metrics)
    if percent is None:
        percent = {name for name in metrics if _is_rate(ntp_seeds + caft_seeds, name)} | set(set_metrics)
    resamples = draw_resamples(n_examples, len(ntp_seeds), n_resamples, seed)

    rows = []
    for name in metrics:
        result = paired_bootstrap([records[name] for records in ntp_seeds], [records[name] for records in caft_seeds],
                                  confidence=confidence, resamples=resamples)
        rows.append(_row(name, result, name in percent))
    for name, metric in set_metrics.items():
        result = _bootstrap(_set_metric_per_seed(metric, ntp_seeds), _set_metric_per_seed(metric, caft_seeds),
                            n_examples, n_resamples=n_resamples, confidence=confidence, seed=seed,
                            resamples=resamples, name=f"metric {name!r}")
        rows.append(_row(name, result, name in percent))
    return rows


def _set_metric_per_seed(metric: SetMetric, arm: list[Records]) -> list[Callable[[np.ndarray], np.ndarray]]:
    """A set-level metric as `rows -> values` for each seed of an arm: one call per resample, since an arbitrary
    function of a set of examples cannot be vectorised."""
    return [lambda index_rows, records=records: np.array([metric(row, records) for row in index_rows], dtype=float)
            for records in arm]


def _seed_list(arm: Records | Sequence[Records], name: str) -> list[Records]:
    seeds = [arm] if isinstance(arm, Mapping) else list(arm)
    if not seeds:
        raise ValueError(f"arm {name!r} has no seeds")
    return seeds


def _common_length(arm_seeds: list[Records], metrics: list[str]) -> int:
    """The number of test examples, checking that every column of every record set has that length and that every
    per-example metric is present in each."""
    for position, records in enumerate(arm_seeds):
        for name in metrics:
            if name not in records:
                raise ValueError(f"record set {position} (ntp seeds first, then caft) has no column {name!r}")
    lengths = {len(values) for records in arm_seeds for values in records.values()}
    if len(lengths) != 1:
        raise ValueError(f"the records are not aligned by test example: column lengths {sorted(lengths)}")
    n_examples = lengths.pop()
    if n_examples < 1:
        raise ValueError("the records hold no test examples")
    return n_examples


def _is_number(value) -> bool:
    return isinstance(value, (bool, np.bool_, numbers.Real))


def _is_rate(arm_seeds: list[Records], name: str) -> bool:
    return all(float(v) in (0.0, 1.0) for records in arm_seeds for v in records[name])


def _row(name: str, result: BootstrapResult, percent: bool) -> ComparisonRow:
    return ComparisonRow(metric=name, ntp=result.a_value, caft=result.b_value, difference=result.estimate,
                         low=result.low, high=result.high, excludes_zero=result.excludes_zero, percent=percent,
                         confidence=result.confidence, n_examples=result.n_examples, n_seeds=result.n_seeds,
                         n_resamples=result.n_resamples, ntp_per_seed=result.a_per_seed,
                         caft_per_seed=result.b_per_seed)


__all__ = ["BootstrapResult", "ComparisonRow", "Records", "Resamples", "SetMetric", "comparison_table",
           "draw_resamples", "paired_bootstrap", "subset_mean_metric", "uniqueness_metric"]
