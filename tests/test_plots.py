"""Tests for fgtutor.plots: every helper returns a Figure of the expected shape and none
touches pyplot (no registered figures, no plt.show())."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fgtutor import plots  # noqa: E402
from fgtutor.testfns import BEALE_MINIMUM, ROSENBROCK_MINIMUM, beale, optimize, rosenbrock  # noqa: E402
from fgtutor.train import History  # noqa: E402



@pytest.fixture(autouse=True)
def no_pyplot_figures(monkeypatch):
    """Every test starts and must end with no pyplot figure open, and must not call plt.show()."""
    plt.close("all")

    def forbidden_show(*args, **kwargs):
        raise AssertionError("plt.show() was called")

    monkeypatch.setattr(plt, "show", forbidden_show)
    yield
    assert plt.get_fignums() == []


def renders(fig: Figure) -> None:
    """Draw the figure for real (catches errors matplotlib only raises at draw time)."""
    fig.savefig(io.BytesIO(), format="png", dpi=30)


def history(method: str, n_steps: int = 30, n_epochs: int = 3, sets=("test",)) -> History:
    rng = np.random.default_rng(0)
    steps = list(np.linspace(2.3, 0.5, n_steps) + 0.05 * rng.random(n_steps))
    rows = []
    for e in range(n_epochs + 1):
        row = {"epoch": e, "step": e * 10, "lr": 0.1, "train_seconds": 1.5 * e, "eval_seconds": 0.1 * (e + 1)}
        for s in sets:
            row[f"{s}_loss"] = 2.3 / (e + 1)
            row[f"{s}_accuracy"] = 0.1 + 0.2 * e
        rows.append(row)
    return History(meta={"method": method, "model": "MLP"}, step_loss=steps, epochs=rows)


@pytest.fixture
def histories():
    return {"forward": history("forward"), "backprop": history("backprop")}


# ---------------------------------------------------------------------------
# smooth_curve
# ---------------------------------------------------------------------------


class TestSmoothCurve:
    def test_is_a_trailing_moving_average(self):
        out = plots.smooth_curve([1, 2, 3, 4, 5], 2)
        np.testing.assert_allclose(out, [1.0, 1.5, 2.5, 3.5, 4.5])

    def test_averages_the_available_points_at_the_start(self):
        out = plots.smooth_curve([3, 6, 9, 0], 3)
        np.testing.assert_allclose(out, [3.0, 4.5, 6.0, 5.0])

    @pytest.mark.parametrize("window", [0, 1, -3])
    def test_a_window_of_one_or_less_returns_the_input(self, window):
        out = plots.smooth_curve([1, 5, 2], window)
        np.testing.assert_array_equal(out, [1.0, 5.0, 2.0])
        assert out.dtype == float

    def test_keeps_the_length_and_accepts_empty_input(self):
        assert len(plots.smooth_curve(np.arange(10.0), 4)) == 10
        assert len(plots.smooth_curve([], 4)) == 0


# ---------------------------------------------------------------------------
# plot_loss and plot_curves
# ---------------------------------------------------------------------------


class TestPlotLoss:
    def test_one_line_per_history(self, histories):
        fig = plots.plot_loss(histories)
        assert isinstance(fig, Figure)
        (ax,) = fig.axes
        assert len(ax.lines) == 2
        np.testing.assert_allclose(ax.lines[0].get_ydata(), histories["forward"].step_loss)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["forward", "backprop"]
        renders(fig)

    def test_methods_get_their_book_colours(self, histories):
        ax = plots.plot_loss(histories).axes[0]
        assert to_rgba(ax.lines[0].get_color()) == to_rgba(plots.METHOD_COLORS["forward"])
        assert to_rgba(ax.lines[1].get_color()) == to_rgba(plots.METHOD_COLORS["backprop"])

    def test_accepts_plain_lists_and_arrays(self):
        fig = plots.plot_loss({"a": [3.0, 2.0, 1.0], "b": np.array([2.0, 1.0]), "c": torch.tensor([1.0, 0.5]).tolist()})
        ax = fig.axes[0]
        assert len(ax.lines) == 3
        np.testing.assert_allclose(ax.lines[0].get_ydata(), [3.0, 2.0, 1.0])
        renders(fig)

    def test_smooth_draws_the_raw_curve_and_its_moving_average(self, histories):
        fig = plots.plot_loss(histories, smooth=5)
        ax = fig.axes[0]
        assert len(ax.lines) == 4  # raw + smoothed for each run
        raw, smoothed = ax.lines[0], ax.lines[1]
        np.testing.assert_allclose(raw.get_ydata(), histories["forward"].step_loss)
        np.testing.assert_allclose(smoothed.get_ydata(), plots.smooth_curve(histories["forward"].step_loss, 5))
        assert "5" in smoothed.get_label()
        renders(fig)

    def test_log_sets_a_log_y_axis(self, histories):
        assert plots.plot_loss(histories, log=True).axes[0].get_yscale() == "log"
        assert plots.plot_loss(histories).axes[0].get_yscale() == "linear"

    def test_title(self, histories):
        assert plots.plot_loss(histories, title="hello").axes[0].get_title() == "hello"

    def test_a_list_of_seeds_is_drawn_as_its_mean(self):
        a, b = history("forward"), history("forward")
        b.step_loss = [v + 1.0 for v in b.step_loss]
        ax = plots.plot_loss({"forward": [a, b]}).axes[0]
        np.testing.assert_allclose(ax.lines[0].get_ydata(), np.array(a.step_loss) + 0.5)
        assert "2 seeds" in ax.get_legend().get_texts()[0].get_text()

    def test_stored_block_means_sit_at_the_middle_of_their_block(self):
        run = history("forward", n_steps=4)
        run.step_every = 10
        ax = plots.plot_loss({"forward": run}).axes[0]
        np.testing.assert_allclose(ax.lines[0].get_xdata(), [5, 15, 25, 35])


class TestPlotCurves:
    def test_two_by_two_axes_with_one_line_per_run(self, histories):
        fig = plots.plot_curves(histories)
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 4
        for ax in fig.axes:
            assert len(ax.lines) == 2
        renders(fig)

    def test_top_row_against_epoch_bottom_row_against_training_seconds(self, histories):
        axes = plots.plot_curves(histories).axes
        df = histories["forward"].to_dataframe()
        top_loss, top_acc, bottom_loss, bottom_acc = axes
        np.testing.assert_allclose(top_loss.lines[0].get_xdata(), df["epoch"])
        np.testing.assert_allclose(top_loss.lines[0].get_ydata(), df["test_loss"])
        np.testing.assert_allclose(top_acc.lines[0].get_ydata(), df["test_accuracy"])
        np.testing.assert_allclose(bottom_loss.lines[0].get_xdata(), df["train_seconds"])
        np.testing.assert_allclose(bottom_acc.lines[0].get_ydata(), df["test_accuracy"])

    def test_other_eval_set(self):
        runs = {"forward": history("forward", sets=("test", "val"))}
        fig = plots.plot_curves(runs, eval_set="val")
        assert "val" in fig.axes[0].get_ylabel()

    def test_seeds_are_drawn_as_a_mean_line_and_a_min_max_band(self):
        a, b = history("forward"), history("forward")
        for row in b.epochs:
            row["test_loss"] += 0.2
            row["train_seconds"] += 1.0
        fig = plots.plot_curves({"forward": [a, b]})
        top_loss, _, bottom_loss, _ = fig.axes
        np.testing.assert_allclose(top_loss.lines[0].get_ydata(), [r["test_loss"] - 0.1 for r in b.epochs])
        np.testing.assert_allclose(bottom_loss.lines[0].get_xdata(), [r["train_seconds"] - 0.5 for r in b.epochs])
        assert len(top_loss.collections) == 1, "one band per group"
        renders(fig)

    def test_a_seed_that_stopped_early_cuts_the_group_at_its_last_epoch(self):
        a, b = history("forward"), history("forward", n_epochs=1)
        assert len(plots.plot_curves({"forward": [a, b]}).axes[0].lines[0].get_xdata()) == 2

    def test_unknown_eval_set_raises_value_error(self, histories):
        with pytest.raises(ValueError, match="val"):
            plots.plot_curves(histories, eval_set="val")


# ---------------------------------------------------------------------------
# 2-D test functions
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trajectories():
    return {
        "forward": optimize(beale, (1.0, 1.0), steps=20, lr=0.01, method="forward"),
        "backprop": np.array([[1.0, 1.0], [1.5, 0.8], [2.0, 0.7], [2.5, 0.6]]),
    }


class TestPlotContour:
    def test_contours_paths_arrows_and_minimum(self, trajectories):
        fig = plots.plot_contour(beale, trajectories, (-1, 4), (-1, 2), minimum=BEALE_MINIMUM, title="Beale")
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 2  # the plot and its colour bar
        ax = fig.axes[0]
        # per trajectory a path and a start marker, plus the minimum star
        assert len(ax.lines) == 2 * len(trajectories) + 1
        # the filled contours and one quiver per trajectory
        assert len(ax.collections) == 1 + len(trajectories)
        assert ax.get_title() == "Beale"
        np.testing.assert_allclose(ax.lines[0].get_xdata(), trajectories["forward"].points[:, 0].numpy())
        renders(fig)

    def test_without_arrows_or_minimum(self, trajectories):
        fig = plots.plot_contour(rosenbrock, {"backprop": trajectories["backprop"]}, (-2, 3), (-1, 3), arrows=0)
        ax = fig.axes[0]
        assert len(ax.lines) == 2
        assert len(ax.collections) == 1
        renders(fig)

    def test_accepts_a_tensor_of_points(self):
        fig = plots.plot_contour(rosenbrock, {"p": torch.tensor([[0.0, 0.0], [0.5, 0.25]])}, (-2, 2), (-1, 3),
                                 minimum=ROSENBROCK_MINIMUM)
        assert len(fig.axes[0].lines) == 3

    @pytest.mark.parametrize("bad", [np.zeros((5, 3)), np.zeros(4), np.zeros((2, 2, 2))])
    def test_bad_trajectory_shape_raises_value_error(self, bad):
        with pytest.raises(ValueError, match=r"\(n, 2\)"):
            plots.plot_contour(beale, {"bad": bad}, (-1, 4), (-1, 2))


class TestPlotSurface:
    def test_one_3d_axes_with_surface_and_a_line_per_trajectory(self, trajectories):
        fig = plots.plot_surface(beale, trajectories, (-1, 4), (-1, 2), title="surface")
        assert isinstance(fig, Figure)
        (ax,) = fig.axes
        assert ax.name == "3d"
        assert len(ax.lines) == len(trajectories)
        assert len(ax.collections) == 1
        assert ax.get_title() == "surface"
        renders(fig)

    def test_paths_lie_on_the_log_surface(self, trajectories):
        ax = plots.plot_surface(beale, {"backprop": trajectories["backprop"]}, (-1, 4), (-1, 2)).axes[0]
        p = trajectories["backprop"]
        _, _, z = ax.lines[0].get_data_3d()
        np.testing.assert_allclose(z, np.log1p(beale(p[:, 0], p[:, 1])))

    @pytest.mark.parametrize("bad", [np.zeros((5, 3)), np.zeros(4)])
    def test_bad_trajectory_shape_raises_value_error(self, bad):
        with pytest.raises(ValueError, match=r"\(n, 2\)"):
            plots.plot_surface(beale, {"bad": bad}, (-1, 4), (-1, 2))


class TestPlotEstimates:
    def test_contours_estimate_arrows_true_gradient_and_point(self):
        point = (1.0, 1.0)
        true_grad = [2.0, -1.0]
        estimates = np.array([[1.5, -0.5], [2.5, -1.5], [0.5, 0.2], [3.0, -2.0], [1.0, -1.0]])
        fig = plots.plot_estimates(beale, point, true_grad, estimates, (-1, 4), (-1, 3), title="estimates")
        assert isinstance(fig, Figure)
        (ax,) = fig.axes
        assert len(ax.lines) == 1  # the point
        assert len(ax.collections) == 3  # contour lines, estimate quiver, true-gradient quiver
        quivers = [c for c in ax.collections if isinstance(c, matplotlib.quiver.Quiver)]
        assert [len(q.U) for q in quivers] == [5, 1]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "5 forward gradients" in labels and "true gradient" in labels
        renders(fig)

    def test_accepts_tensors(self):
        fig = plots.plot_estimates(beale, (1.0, 1.0), torch.tensor([2.0, -1.0]), torch.randn(3, 2), (-1, 4), (-1, 3))
        assert len(fig.axes[0].collections) == 3
        renders(fig)


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------


class TestPlotBars:
    def test_one_stacked_bar_per_row_and_segment_per_column(self):
        table = pd.DataFrame({"sample": [1.0, 0.5, 0.2], "jvp": [2.0, 1.0, np.nan], "update": [0.5, 0.5, 0.5]},
                             index=["logreg", "mlp", "convnet"])
        fig = plots.plot_bars(table, title="time")
        assert isinstance(fig, Figure)
        (ax,) = fig.axes
        assert len(ax.containers) == 3
        assert len(ax.patches) == 9
        update = ax.containers[2]
        # segments stack: each starts where the ones below end (NaN counted as 0)
        np.testing.assert_allclose([bar.get_y() for bar in update], [3.0, 1.5, 0.2])
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sample", "jvp", "update"]
        assert ax.get_ylabel() == "milliseconds per step"
        renders(fig)


    def test_side_by_side_bars_when_not_stacked(self):
        table = pd.DataFrame({"backprop MB": [10.0, 20.0], "forward MB": [8.0, 30.0]}, index=["a", "b"])
        ax = plots.plot_bars(table, stacked=False, ylabel="MB").axes[0]
        backprop, forward = ax.containers
        assert all(bar.get_y() == 0 for bar in forward)  # not stacked
        assert [b.get_x() < f.get_x() for b, f in zip(backprop, forward)] == [True, True]
        assert to_rgba(forward[0].get_facecolor()) == to_rgba(plots.METHOD_COLORS["forward"])


def step_table():
    row = {"batch": 64, "forward ms": 2.0, "backprop ms": 6.0, "forward gradient ms": 7.0, "torch.func ms": 11.0,
           "sample tangents ms": 1.0, "forward-mode pass ms": 5.0, "update ms": 0.5}
    return pd.DataFrame([row, {**row, "forward gradient ms": 80.0, "forward-mode pass ms": 75.0}],
                        index=pd.Index(["mlp", "convnet"], name="model"))


class TestPlotStepCosts:
    def test_one_panel_per_model_with_the_forward_gradient_step_split_into_its_parts(self):
        fig = plots.plot_step_costs(step_table())
        assert len(fig.axes) == 2
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == [
            "forward pass", "backprop step", "torch.func step", "forward-gradient step"]
        heights = [p.get_height() for p in ax.patches]
        # forward, backprop, torch.func, then the parts and the unaccounted rest (7 - 6.5)
        np.testing.assert_allclose(heights, [2.0, 6.0, 11.0, 1.0, 5.0, 0.5, 0.5])
        assert ax.get_title() == "mlp, batch 64"
        renders(fig)


class TestPlotSamples:
    def test_one_panel_per_sampler_with_cloud_mean_and_true_gradient(self):
        g = torch.Generator().manual_seed(0)
        clouds = {"gaussian": torch.randn(200, 2, generator=g), "rademacher": torch.tensor([[1.0, 1.0], [-1.0, 1.0]] * 50)}
        fig = plots.plot_samples(clouds, [0.0, 1.0], title="t")
        assert len(fig.axes) == 2
        # two distinct Rademacher points are labelled with their counts
        assert sorted(t.get_text() for t in fig.axes[1].texts) == ["×50", "×50"]
        assert not fig.axes[0].texts
        renders(fig)


class TestPlotSweep:
    def test_a_line_per_method_and_decay_and_crosses_for_diverged_runs(self):
        rows = [{"method": m, "lr": lr, "decay": d, "val_loss": np.nan if (m == "forward" and lr == 1.0) else lr,
                 "diverged": m == "forward" and lr == 1.0}
                for m in ("forward", "backprop") for d in (1e-5, 1e-4) for lr in (0.01, 0.1, 1.0)]
        ax = plots.plot_sweep(pd.DataFrame(rows)).axes[0]
        lines = [l for l in ax.lines if l.get_linestyle() == "-"]
        crosses = [l for l in ax.lines if l.get_marker() == "x" and len(l.get_xdata())]
        assert len(lines) == 4 and len(crosses) == 2
        assert ax.get_xscale() == "log"
        renders(ax.figure)


class TestPlotDistribution:
    def test_histogram_and_reference_line(self):
        ax = plots.plot_distribution([1.0, 2.0, 2.5, 3.0], 2.2, xlabel="loss", label="a", reference_label="b").axes[0]
        assert sum(p.get_height() for p in ax.patches) == 4
        assert ax.lines[0].get_xdata()[0] == 2.2
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["a", "b"]


def cosine_frame() -> pd.DataFrame:
    rows = [{"estimator": "FG-W ×1", "stage": s, "cosine": c, "theory": 1e-3} for s in ("a", "b") for c in (1e-3, -2e-3)]
    rows += [{"estimator": "FG-A", "stage": s, "cosine": c} for s in ("a", "b") for c in (0.01, 0.02)]
    return pd.DataFrame(rows)


class TestPlotCosines:
    def test_one_row_per_estimator_on_a_log_axis_with_the_theory_marked(self):
        ax = plots.plot_cosines(cosine_frame()).axes[0]
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_yticklabels()] == ["FG-W ×1", "FG-A"]
        assert "theory (FG-W)" in [t.get_text() for t in ax.get_legend().get_texts()]

    def test_negative_cosines_are_drawn_by_their_size(self):
        ax = plots.plot_cosines(cosine_frame().assign(cosine=-0.5)).axes[0]
        assert all((c.get_offsets()[:, 0] > 0).all() for c in ax.collections if len(c.get_offsets()))


def test_no_helper_opens_a_pyplot_figure(histories, trajectories):
    figs = [
        plots.plot_loss(histories, smooth=3, log=True),
        plots.plot_curves(histories),
        plots.plot_contour(beale, trajectories, (-1, 4), (-1, 2), minimum=BEALE_MINIMUM),
        plots.plot_surface(beale, trajectories, (-1, 4), (-1, 2)),
        plots.plot_estimates(beale, (1.0, 1.0), [1.0, 1.0], [[1.0, 0.0]], (-1, 4), (-1, 2)),
        plots.plot_bars(pd.DataFrame({"a": [1.0]}, index=["x"])),
        plots.plot_step_costs(step_table()),
        plots.plot_samples({"a": [[1.0, 2.0], [0.0, 1.0]]}, [0.5, 1.5]),
        plots.plot_distribution([1.0, 2.0], 1.5, xlabel="x"),
        plots.plot_cosines(cosine_frame()),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    assert plt.get_fignums() == []


def ablation_run(accuracies) -> History:
    return History(epochs=[{"epoch": e, "val_accuracy": a} for e, a in enumerate(accuracies)])


def test_plot_ablation_puts_one_dot_per_variant_and_the_baseline_as_a_line():
    table = pd.DataFrame({"ingredient": ["baseline", "inputs", "inputs"], "variant": ["b", "raw", "other"],
                          "test_accuracy": [0.6, 0.5, 0.7]})
    fig = plots.plot_ablation(table, baseline=0.6)
    ax = fig.axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["baseline: b", "inputs: raw", "inputs: other"]
    assert any(list(line.get_xdata()) == [0.6, 0.6] for line in ax.lines)
    with pytest.raises(ValueError, match="has no column 'test_accuracy'"):
        plots.plot_ablation(table.drop(columns="test_accuracy"))


def test_plot_ablation_curves_draws_a_panel_per_ingredient_with_the_baseline_in_each():
    base = ablation_run([0.1, 0.3, 0.5])
    groups = {"inputs": {"raw": ablation_run([0.1, 0.2, 0.3])},
              "batch": {"64": ablation_run([0.1, 0.5, 0.7]), "256": ablation_run([0.1, 0.4, 0.6])}}
    fig = plots.plot_ablation_curves(groups, base)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["inputs", "batch"]
    assert [len(ax.lines) for ax in panels] == [2, 3]
    assert list(panels[1].lines[0].get_ydata()) == [0.1, 0.3, 0.5]  # the baseline first, dashed
    with pytest.raises(ValueError, match="baseline"):
        plots.plot_ablation_curves(groups, None)
    with pytest.raises(ValueError, match="groups"):
        plots.plot_ablation_curves({}, base)


def final_run(accuracy: float) -> History:
    return History(epochs=[{"epoch": 1, "test_accuracy": accuracy}])


def test_plot_against_references_draws_each_seed_the_mean_and_every_reference_per_estimator():
    groups = {"FG-W": [final_run(a) for a in (0.90, 0.91, 0.92)], "FG-A": [final_run(0.97), final_run(0.98)]}
    references = {"FG-W": {"target": 0.915, "published": 0.9091}, "FG-A": {"target": 0.97}}
    fig = plots.plot_against_references(groups, references)
    panels = fig.axes
    assert [ax.get_ylabel() for ax in panels] == ["FG-W", "FG-A"]
    assert [len(ax.collections[0].get_offsets()) for ax in panels] == [3, 2]
    mean_bar = panels[0].lines[0]
    assert np.allclose(mean_bar.get_xdata(), 0.91)
    verticals = sorted(line.get_xdata()[0] for line in panels[0].lines[1:])
    assert verticals == [0.9091, 0.915]
    assert panels[0].get_xlim()[0] < 0.90 and panels[1].get_xlim()[1] > 0.98  # own scales, every dot inside
    with pytest.raises(ValueError, match=r"groups\['FG-A'\]"):
        plots.plot_against_references({"FG-A": final_run(0.97)}, references)


class TestPlotByPasses:
    def test_the_x_axis_is_steps_times_passes_per_step(self, histories):
        fig = plots.plot_by_passes(histories, {"forward": 1, "backprop": 2})
        loss_ax, acc_ax = fig.axes
        for line, label, passes in zip(loss_ax.lines, histories, (1, 2)):
            df = histories[label].to_dataframe()
            np.testing.assert_allclose(line.get_xdata(), df["step"] * passes)
            np.testing.assert_allclose(line.get_ydata(), df["test_loss"])
        renders(fig)

    def test_every_run_needs_its_passes(self, histories):
        with pytest.raises(ValueError, match="no entry for 'backprop'"):
            plots.plot_by_passes(histories, {"forward": 1})
        with pytest.raises(ValueError, match="passes\\['forward'\\]"):
            plots.plot_by_passes(histories, {"forward": 0, "backprop": 2})


def test_plot_eps_error_draws_one_line_per_dtype_and_a_panel_per_model():
    errors = pd.DataFrame([{"model": m, "dtype": d, "eps": e, "error": e ** 2 + (1e-7 if d == "float32" else 1e-16) / e}
                           for m in ("smooth", "relu") for d in ("float32", "float64") for e in (1e-6, 1e-4, 1e-2)])
    fig = plots.plot_eps_error(errors)
    assert len(fig.axes) == 2 and all(len(ax.lines) >= 2 for ax in fig.axes)
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    assert len(plots.plot_eps_error(errors.drop(columns="model")).axes) == 1
    with pytest.raises(ValueError, match="error"):
        plots.plot_eps_error(errors.drop(columns="error"))
    renders(fig)
