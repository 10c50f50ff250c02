"""Per-head loss curves: the series read from a Trainer log, and the PNG written from them."""

from __future__ import annotations

import pytest

from caftkit.evaluation.charts import head_loss_series, plot_head_losses

LOG = [
    {"eval_loss_head_1": 2.0, "eval_loss_head_2": 6.0, "eval_accuracy_head_2": 0.1, "step": 0},
    {"loss": 7.0, "loss_head_1": 2.1, "loss_head_2": 5.0, "accuracy_head_2": 0.2, "step": 5},
    {"loss": 6.0, "loss_head_1": 2.0, "loss_head_2": 4.0, "step": 10},
    {"eval_loss_head_1": 2.0, "eval_loss_head_2": 3.5, "step": 10},
    {"train_runtime": 12.0, "step": 10},
]


def test_series_split_train_and_held_out_per_head():
    series = head_loss_series(LOG)
    assert series == {
        "train": {1: [(5, 2.1), (10, 2.0)], 2: [(5, 5.0), (10, 4.0)]},
        "eval": {1: [(0, 2.0), (10, 2.0)], 2: [(0, 6.0), (10, 3.5)]},
    }


def test_png_is_written(tmp_path):
    path = plot_head_losses(LOG, tmp_path / "plots" / "curves.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_a_log_without_head_losses_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no per-head losses"):
        plot_head_losses([{"loss": 1.0, "step": 1}], tmp_path / "x.png")
