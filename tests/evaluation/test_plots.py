"""Per-head loss curves: the series read from a Trainer log, and the PNG written from them."""

from __future__ import annotations

import pytest

from caftkit.evaluation.charts import head_loss_series, head_losses_figure, plot_head_losses, schedule_series

LOG = [
    {"eval_loss_head_1": 2.0, "eval_loss_head_2": 6.0, "eval_accuracy_head_2": 0.1, "step": 0},
    {"loss": 7.0, "loss_head_1": 2.1, "loss_head_2": 5.0, "accuracy_head_2": 0.2, "learning_rate": 1e-3,
     "caft_gamma": 1.0, "step": 5},
    {"loss": 6.0, "loss_head_1": 2.0, "loss_head_2": 4.0, "learning_rate": 5e-4, "caft_gamma": 0.5, "step": 10},
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


def test_one_panel_per_head_and_one_for_the_schedules_with_the_legend_outside():
    import matplotlib.pyplot as plt

    assert schedule_series(LOG) == {"learning_rate": [(5, 1e-3), (10, 5e-4)], "caft_gamma": [(5, 1.0), (10, 0.5)]}
    figure = head_losses_figure(LOG, "run")
    visible = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in visible[:3]] == ["main head (t+1)", "head 2 (t+2)", "schedules"]
    head_2 = visible[1]
    training, held_out = head_2.get_lines()
    assert list(training.get_xdata()) == [5, 10] and list(training.get_ydata()) == [5.0, 4.0]
    assert list(held_out.get_xdata()) == [0, 10] and list(held_out.get_ydata()) == [6.0, 3.5]
    # two points: markers, so that a series logged once or twice is seen; held-out always has them
    assert training.get_marker() == "o" and held_out.get_marker() == "o" and held_out.get_linestyle() == "--"
    gamma_axes = next(axes for axes in visible if axes.get_ylabel() == "gamma")
    assert list(gamma_axes.get_lines()[0].get_ydata()) == [1.0, 0.5]
    # one legend, the figure's, below the panels; none inside them
    assert not any(axes.get_legend() for axes in figure.axes)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["training", "held-out", "learning rate",
                                                                "gamma (auxiliary-loss weight)"]
    plt.close(figure)


def test_many_points_are_drawn_as_a_line_without_markers():
    import matplotlib.pyplot as plt

    log = [{"loss_head_1": 1.0 / step, "step": step} for step in range(1, 40)]
    figure = head_losses_figure(log)
    (line,) = figure.axes[0].get_lines()
    assert line.get_marker() in ("None", None, "") and len(line.get_xdata()) == 39
    plt.close(figure)
