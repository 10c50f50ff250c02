"""`caft compare` statistics and report: paired bootstrap intervals against a naive loop, seeds, set-level
metrics, and the Markdown and PNG written from the rows."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from caftkit.evaluation.bootstrap import (
    ComparisonRow,
    comparison_table,
    draw_resamples,
    paired_bootstrap,
    uniqueness_metric,
)
from caftkit.evaluation.comparison_report import format_difference, format_value, report_markdown, write_report


def naive_quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics at position (N - 1) q, NumPy's default rule."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def naive_paired_bootstrap(a_seeds, b_seeds, statistic, n_resamples, confidence, seed):
    """The documented draws, then one resample at a time: seeds drawn, examples drawn, per-seed statistic on the
    drawn examples averaged over the drawn seeds, difference b - a."""
    n_seeds, n_examples = len(a_seeds), len(a_seeds[0])
    rng = np.random.default_rng(seed)
    example_rows = rng.integers(0, n_examples, size=(n_resamples, n_examples), dtype=np.int32)
    seed_rows = rng.integers(0, n_seeds, size=(n_resamples, n_seeds)) if n_seeds > 1 else [[0]] * n_resamples
    differences = []
    for examples, seeds in zip(example_rows, seed_rows):
        arm_values = []
        for arm in (a_seeds, b_seeds):
            per_drawn_seed = [statistic([arm[s][i] for i in examples]) for s in seeds]
            arm_values.append(sum(per_drawn_seed) / len(per_drawn_seed))
        differences.append(arm_values[1] - arm_values[0])
    alpha = 1 - confidence
    return naive_quantile(differences, alpha / 2), naive_quantile(differences, 1 - alpha / 2)


def test_estimate_is_the_difference_of_means():
    a = [1, 0, 1, 1, 0]  # mean 0.6
    b = [1, 1, 1, 0, 1]  # mean 0.8
    result = paired_bootstrap(a, b, n_resamples=200)
    assert result.a_value == pytest.approx(0.6)
    assert result.b_value == pytest.approx(0.8)
    assert result.estimate == pytest.approx(0.2)
    assert (result.n_examples, result.n_seeds, result.n_resamples) == (5, 1, 200)


@pytest.mark.parametrize("statistic, reference", [(np.mean, statistics.fmean), (np.median, statistics.median)])
def test_interval_equals_a_naive_loop_bootstrap(statistic, reference):
    rng = np.random.default_rng(11)
    a = rng.random(23).round(3).tolist()
    b = (rng.random(23) * 0.8 + 0.1).round(3).tolist()
    result = paired_bootstrap(a, b, statistic=statistic, n_resamples=999, confidence=0.9, seed=5)
    low, high = naive_paired_bootstrap([a], [b], reference, n_resamples=999, confidence=0.9, seed=5)
    assert low < high
    assert result.low == pytest.approx(low, rel=1e-12, abs=1e-14)
    assert result.high == pytest.approx(high, rel=1e-12, abs=1e-14)
    assert result.estimate == pytest.approx(reference(b) - reference(a), rel=1e-12)


def test_draws_follow_the_documented_recipe():
    resamples = draw_resamples(n_examples=17, n_seeds=3, n_resamples=50, seed=4)
    rng = np.random.default_rng(4)
    np.testing.assert_array_equal(resamples.examples, rng.integers(0, 17, size=(50, 17), dtype=np.int32))
    np.testing.assert_array_equal(resamples.seeds, rng.integers(0, 3, size=(50, 3)))
    # one seed: no seed draw, and the example draws are those of any number of seeds
    single = draw_resamples(n_examples=17, n_seeds=1, n_resamples=50, seed=4)
    np.testing.assert_array_equal(single.examples, resamples.examples)
    assert single.seeds.shape == (50, 1) and not single.seeds.any()


def test_identical_arms_give_zero_and_a_zero_interval():
    values = [0.2, 0.9, 0.4, 0.4, 0.7, 0.1]
    result = paired_bootstrap(values, list(values), n_resamples=500)
    assert (result.estimate, result.low, result.high) == (0.0, 0.0, 0.0)
    assert not result.excludes_zero


def test_a_constant_shift_gives_the_shift_and_a_degenerate_interval():
    # 8 integer-valued examples: every resampled mean is k / 8, exact in binary, so the shift is exactly 1
    a = [0, 3, 1, 4, 1, 5, 9, 2]
    b = [value + 1 for value in a]
    result = paired_bootstrap(a, b, n_resamples=500)
    assert (result.estimate, result.low, result.high) == (1.0, 1.0, 1.0)
    assert result.excludes_zero


def test_a_clear_improvement_excludes_zero_and_pure_noise_does_not():
    rng = np.random.default_rng(2024)
    worse = (rng.random(200) < 0.3).astype(int)
    better = (rng.random(200) < 0.6).astype(int)
    clear = paired_bootstrap(worse, better, n_resamples=2000, seed=1)
    assert clear.estimate > 0.2 and clear.low > 0 and clear.excludes_zero

    noise_a, noise_b = rng.normal(0.5, 0.2, 200), rng.normal(0.5, 0.2, 200)
    noise = paired_bootstrap(noise_a, noise_b, n_resamples=2000, seed=1)
    assert noise.low < 0 < noise.high and not noise.excludes_zero


def test_several_seeds_average_the_per_seed_metric_and_resample_seeds():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 40)) < 0.4).astype(int)
    b = (rng.random((3, 40)) < 0.6).astype(int)
    result = paired_bootstrap(a, b, n_resamples=400, seed=9)
    assert result.a_per_seed == pytest.approx(tuple(a.mean(axis=1)))
    assert result.b_per_seed == pytest.approx(tuple(b.mean(axis=1)))
    assert result.estimate == pytest.approx(float(np.mean(b.mean(axis=1) - a.mean(axis=1))))
    assert result.n_seeds == 3

    low, high = naive_paired_bootstrap(a.tolist(), b.tolist(), statistics.fmean, n_resamples=400, confidence=0.95,
                                       seed=9)
    assert result.low == pytest.approx(low, rel=1e-12, abs=1e-14)
    assert result.high == pytest.approx(high, rel=1e-12, abs=1e-14)


def test_one_seed_reduces_exactly_to_the_single_seed_bootstrap():
    rng = np.random.default_rng(8)
    a, b = rng.random(30), rng.random(30)
    single = paired_bootstrap(a, b, n_resamples=300, seed=2)
    assert paired_bootstrap(a[None, :], b[None, :], n_resamples=300, seed=2) == single
    [row] = comparison_table([{"score": a.tolist()}], [{"score": b.tolist()}], n_resamples=300, seed=2)
    assert (row.ntp, row.caft, row.difference, row.low, row.high) == (
        single.a_value, single.b_value, single.estimate, single.low, single.high)


def test_table_rows_default_metrics_and_percent():
    ntp = {"answer": ["a", "b", "c", "d"], "validity": [1, 0, 1, 1], "tanimoto": [0.5, 0.0, 0.25, 0.75]}
    caft = {"answer": ["a", "b", "c", "e"], "validity": [True, True, True, True], "tanimoto": [1.0, 0.5, 0.25, 0.75]}
    rows = comparison_table(ntp, caft, n_resamples=100)
    assert [(row.metric, row.percent) for row in rows] == [("validity", True), ("tanimoto", False)]
    assert (rows[0].ntp, rows[0].caft, rows[0].difference) == (0.75, 1.0, 0.25)
    assert (rows[1].ntp, rows[1].caft, rows[1].difference) == (0.375, 0.625, 0.25)


def test_uniqueness_is_recomputed_per_resample_with_the_right_point_estimate():
    # ntp: 3 valid answers, 2 distinct -> 2/3; caft: 4 valid answers, all distinct -> 1
    ntp = {"answer": ["CCO", "CCO", "C", "xx"], "validity": [1, 1, 1, 0]}
    caft = {"answer": ["CCO", "CC", "C", "N"], "validity": [1, 1, 1, 1]}
    uniqueness = uniqueness_metric()
    assert uniqueness(np.arange(4), ntp) == pytest.approx(2 / 3)
    # a resample drawing example 0 twice and example 2 once: shares 1/2, 1/2, 1 over 3 valid draws
    assert uniqueness(np.array([0, 0, 2, 3]), ntp) == pytest.approx(2 / 3)
    assert uniqueness(np.array([3, 3]), ntp) == 0.0  # no valid answer

    rows = comparison_table(ntp, caft, metrics=[], set_metrics={"uniqueness": uniqueness}, n_resamples=200, seed=6)
    [row] = rows
    assert row.metric == "uniqueness" and row.percent
    assert row.ntp == pytest.approx(2 / 3) and row.caft == 1.0 and row.difference == pytest.approx(1 / 3)



def test_a_set_level_interval_equals_the_metric_on_each_documented_resample():
    rng = np.random.default_rng(12)
    ntp = {"answer": rng.choice(list("ABCDEF"), 25).tolist(), "validity": (rng.random(25) < 0.7).tolist()}
    caft = {"answer": rng.choice(list("ABCDEFGHIJ"), 25).tolist(), "validity": (rng.random(25) < 0.8).tolist()}
    uniqueness = uniqueness_metric()
    [row] = comparison_table(ntp, caft, metrics=[], set_metrics={"uniqueness": uniqueness}, n_resamples=300, seed=6)
    resamples = draw_resamples(25, 1, 300, seed=6)
    differences = [uniqueness(indices, caft) - uniqueness(indices, ntp) for indices in resamples.examples]
    assert row.low == pytest.approx(naive_quantile(differences, 0.025), abs=1e-14)
    assert row.high == pytest.approx(naive_quantile(differences, 0.975), abs=1e-14)
    assert row.low < row.difference < row.high


def test_uniqueness_over_several_seeds_averages_the_seeds():
    ntp = [{"answer": ["A", "A", "B", "C"], "validity": [1, 1, 1, 1]},  # 3 / 4
           {"answer": ["A", "A", "A", "A"], "validity": [1, 1, 0, 0]}]  # 1 / 2
    caft = [{"answer": ["A", "B", "C", "D"], "validity": [1, 1, 1, 1]},  # 1
            {"answer": ["A", "B", "B", "B"], "validity": [1, 1, 1, 1]}]  # 2 / 4
    [row] = comparison_table(ntp, caft, metrics=[], set_metrics={"uniqueness": uniqueness_metric()}, n_resamples=50)
    assert row.ntp == pytest.approx(0.625) and row.caft == pytest.approx(0.75)
    assert row.difference == pytest.approx(0.125) and row.n_seeds == 2


def test_unpaired_inputs_are_rejected():
    with pytest.raises(ValueError, match="not paired"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="not paired: ntp has 2 seeds, caft has 1"):
        comparison_table([{"v": [1, 0]}, {"v": [1, 1]}], [{"v": [0, 0]}])
    with pytest.raises(ValueError, match="not aligned by test example"):
        comparison_table({"v": [1, 0, 1]}, {"v": [1, 0]})
    with pytest.raises(ValueError, match="record set 1 .* no column 'tanimoto'"):
        comparison_table({"tanimoto": [0.1, 0.2]}, {"other": [0.3, 0.4]})


def test_number_formats():
    assert format_value(0.715, True) == "71.5%"
    assert format_value(0.41249, False) == "0.412"
    assert format_difference(0.035, True) == "+3.5 pp"
    assert format_difference(-0.0123, False) == "-0.012"
    assert format_difference(-0.0002, True) == "0.0 pp"  # rounds to zero: no sign
    assert format_difference(0.0, False) == "0.000"


ROWS = [
    ComparisonRow("validity", ntp=0.608, caft=0.685, difference=0.077, low=0.032, high=0.122, excludes_zero=True,
                  percent=True, confidence=0.95, n_examples=500, n_seeds=3, n_resamples=10000),
    ComparisonRow("tanimoto", ntp=0.5059, caft=0.5127, difference=0.0068, low=-0.0394, high=0.0591,
                  excludes_zero=False, percent=False, confidence=0.95, n_examples=500, n_seeds=3, n_resamples=10000),
]
CONTEXT = {"budget": "200 steps", "settings": {"learning_rate": 1e-4, "heads": 4}, "wall time ntp (s)": 61.25}


def test_markdown_report_lists_context_table_definitions_and_readings(tmp_path):
    md, png = write_report(tmp_path / "report.md", tmp_path / "figures" / "compare.png", ROWS, CONTEXT,
                           definitions={"validity": "the answer parses as a molecule"})
    text = md.read_text()
    assert text.startswith("# CAFT vs next-token fine-tuning\n")
    assert "- **budget**: 200 steps\n" in text
    assert "- **settings**: learning_rate=0.0001, heads=4\n" in text
    assert "- **wall time ntp (s)**: 61.25\n" in text
    assert "| metric | ntp | caft | caft - ntp | 95% CI low | 95% CI high | CI excludes 0 |" in text
    assert "| validity | 60.8% | 68.5% | +7.7 pp | +3.2 pp | +12.2 pp | yes |" in text
    assert "| tanimoto | 0.506 | 0.513 | +0.007 | -0.039 | +0.059 | no |" in text
    assert "500 test examples, 3 seeds per arm" in text and "10000 resamples" in text
    assert "- **validity**: the answer parses as a molecule\n" in text
    assert "- validity: the difference caft - ntp is +7.7 pp; its 95% CI [+3.2, +12.2] pp excludes zero." in text
    assert "- tanimoto: the difference caft - ntp is +0.007; its 95% CI [-0.039, +0.059] contains zero." in text
    assert "](figures/compare.png)" in text
    # deterministic: the same rows and context give the same text
    assert report_markdown(ROWS, CONTEXT, definitions={"validity": "the answer parses as a molecule"},
                           chart="figures/compare.png") == text

    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_report_of_one_metric_kind_and_no_definitions(tmp_path):
    md, png = write_report(tmp_path / "r.md", tmp_path / "r.png", ROWS[1:], {})
    text = md.read_text()
    assert "## Context" not in text and "Definitions" not in text
    assert text.count("| tanimoto |") == 1 and "| validity |" not in text
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
