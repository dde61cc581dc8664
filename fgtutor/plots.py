"""Plot helpers for the book. Each returns a matplotlib ``Figure`` and none calls ``plt.show()``.

Every figure is closed in ``pyplot`` as soon as it is made, so in a notebook it appears
exactly once (when it is the cell's value or is displayed), scripts can
``fig.savefig(...)`` without a window, and a loop that makes many figures leaks none.
"""
from __future__ import annotations

import numbers
from typing import Callable, Mapping, Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterMathtext, MaxNLocator

from .train import History
from .utils import check_callable, check_frame, check_number, check_pair, check_positive, check_type, short_repr

Series = Union[History, Sequence[float], np.ndarray]
# one colour per method, everywhere in the book
METHOD_COLORS = {"forward": "tab:blue", "backprop": "tab:red"}


def _figure(**kwargs) -> Figure:
    # made through pyplot so that the notebook backend (which teaches Jupyter to display a
    # returned Figure) is loaded, then closed so that it is not also shown automatically
    fig = plt.figure(layout="constrained", **kwargs)
    plt.close(fig)
    return fig


def _check_mapping(name: str, value, what: str, empty_ok: bool = True) -> None:
    """A dict of label -> what is drawn for it (checked first: a list here would fail deep inside)."""
    if not isinstance(value, Mapping) or not (empty_ok or value):
        raise ValueError(f"{name}={short_repr(value)} is not allowed: use a {'' if empty_ok else 'non-empty '}"
                         f"dict of label -> {what}.")


def _colors(labels) -> list:
    """Blue for the first label that names forward gradient, red for the first that names
    backprop, other palette colours for everything else, so that no two runs share one."""
    spare = iter(f"C{i}" for i in (2, 4, 1, 5, 6, 7, 8, 9, 0, 3) * 3)
    colors, used = [], set()
    for label in labels:
        method = next((m for m in METHOD_COLORS if m in str(label).lower()), None)
        color = METHOD_COLORS[method] if method and method not in used else next(spare)
        used.add(method)
        colors.append(color)
    return colors


def smooth_curve(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (``window <= 1`` returns the input)."""
    check_type("window", window, numbers.Integral, "a whole number of points (1 or less: no smoothing)")
    values = _as_curve("values", values)
    if window <= 1 or len(values) == 0:
        return values
    return pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()


def _as_curve(name: str, values) -> np.ndarray:
    """A sequence of numbers as a 1-d float array, else ``ValueError`` naming ``name``."""
    try:
        curve = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        curve = None
    if curve is None or curve.ndim != 1:
        raise ValueError(f"{name}={short_repr(values)} is not allowed: use a sequence of numbers, "
                         "e.g. [2.3, 1.1, 0.7].")
    return curve


def _group(run) -> list:
    """A run or a list of runs (one per seed) as a list."""
    return list(run) if isinstance(run, (list, tuple)) and run and isinstance(run[0], History) else [run]


def _step_curve(group: list, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Iterations and the per-step training loss averaged over the runs of a group (a stored
    run keeps block means of ``step_every`` steps; sequences of losses count as one run)."""
    curves = [_as_curve(name, r.step_loss if isinstance(r, History) else r) for r in group]
    every = group[0].step_every if isinstance(group[0], History) else 1
    n = min(len(c) for c in curves)
    return (np.arange(n) + 0.5) * every if every > 1 else np.arange(n), np.mean([c[:n] for c in curves], axis=0)


def plot_loss(runs: Mapping[str, Union[Series, Sequence[History]]], smooth: int = 0, log: bool = False,
              title: str = "", ylabel: str = "training loss (batch)") -> Figure:
    """Per-iteration training loss of several runs: a History, a sequence of losses, or a
    list of Histories (seeds), whose losses are averaged.

    ``smooth`` draws a moving average over that many points on top of the faint raw curve.
    """
    _check_mapping("runs", runs, "a History, a list of Histories (seeds) or a sequence of losses")
    check_positive("smooth", smooth, allow_zero=True, integer=True)
    fig = _figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for color, (label, run) in zip(_colors(runs), runs.items()):
        group = _group(run)
        steps, losses = _step_curve(group, f"runs[{label!r}]")
        label = f"{label} (mean of {len(group)} seeds)" if len(group) > 1 else label
        if smooth > 1:
            ax.plot(steps, losses, color=color, alpha=0.2, lw=0.8)
            ax.plot(steps, smooth_curve(losses, smooth), color=color, label=f"{label}, moving average of {smooth}")
        else:
            ax.plot(steps, losses, color=color, alpha=0.8, lw=0.9, label=label)
    ax.set(xlabel="iteration", ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _curve_frame(runs: Mapping[str, Union[History, Sequence[History]]], eval_set: str) -> pd.DataFrame:
    """The evaluations of every run in long form (one row per run, seed and epoch), with a
    group's training seconds averaged over its seeds so that its seeds share the x axis."""
    _check_mapping("runs", runs, "a History or a list of Histories (seeds)", empty_ok=False)
    check_type("eval_set", eval_set, str, 'the name of an evaluation set, e.g. "test"')
    frames = []
    for label, run in runs.items():
        if not all(isinstance(r, History) for r in _group(run)):
            raise ValueError(f"runs[{label!r}]={short_repr(run)} is not allowed: use a History or a non-empty "
                             "list of Histories (seeds).")
        group = [r.to_dataframe() for r in _group(run)]
        if any(f"{eval_set}_loss" not in df for df in group):
            raise ValueError(f"eval_set={eval_set!r} was not evaluated in run {label!r}.")
        n = min(len(df) for df in group)  # a diverged seed stops early: draw what all reached
        seconds = np.mean([df["train_seconds"].to_numpy()[:n] for df in group], axis=0)
        name = f"{label} ({len(group)} seeds)" if len(group) > 1 else label
        frames += [pd.DataFrame({"run": name, "label": label, "seed": i, "epoch": df["epoch"].to_numpy()[:n],
                                 "step": df["step"].to_numpy()[:n], "seconds": seconds,
                                 "loss": df[f"{eval_set}_loss"].to_numpy()[:n],
                                 "accuracy": df[f"{eval_set}_accuracy"].to_numpy()[:n]})
                   for i, df in enumerate(group)]
    return pd.concat(frames, ignore_index=True)


def plot_curves(runs: Mapping[str, Union[History, Sequence[History]]], eval_set: str = "test",
                title: str = "") -> Figure:
    """Loss and accuracy on ``eval_set`` against epoch (top) and training seconds (bottom).

    A value that is a list of Histories (one per seed) is drawn as its mean with a band
    from the lowest to the highest seed (seaborn's ``errorbar=("pi", 100)``); its seconds
    are the mean over seeds.
    """
    data = _curve_frame(runs, eval_set)
    colors = dict(zip(dict.fromkeys(data["run"]), _colors(runs)))
    marker = "o" if data["epoch"].nunique() <= 20 else None
    fig = _figure(figsize=(10, 7))
    axes = fig.subplots(2, 2)
    for row, (x, xlabel) in enumerate((("epoch", "epoch"), ("seconds", "training wall-clock seconds"))):
        for col, metric in enumerate(("loss", "accuracy")):
            ax = axes[row, col]
            for name, group in data.groupby("run", sort=False):
                band = ("pi", 100) if group["seed"].nunique() > 1 else None
                sns.lineplot(data=group, x=x, y=metric, color=colors[name], errorbar=band, marker=marker,
                             markersize=4, markeredgewidth=0, label=name, legend=False, ax=ax)
            ax.set(xlabel=xlabel, ylabel=f"{eval_set} {metric}")
            ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_by_passes(runs: Mapping[str, Union[History, Sequence[History]]], passes: Mapping[str, float],
                   eval_set: str = "test", title: str = "") -> Figure:
    """Loss and accuracy on ``eval_set`` against the network passes that training took:
    steps × ``passes[label]`` (e.g. 1 for a forward gradient's forward-mode pass, 2 for
    a two-point zeroth-order estimate). A list of Histories (seeds) is drawn as its mean
    with a band from the lowest to the highest seed."""
    _check_mapping("passes", passes, "passes per training step, e.g. {'MeZO': 2}", empty_ok=False)
    missing = sorted(set(runs) - set(passes))
    if missing:
        raise ValueError(f"passes has no entry for {', '.join(map(repr, missing))}: give each run's passes per step.")
    for label, value in passes.items():
        check_positive(f"passes[{label!r}]", value)
    data = _curve_frame(runs, eval_set)
    data["passes"] = data["step"] * data["label"].map(passes)
    colors = dict(zip(dict.fromkeys(data["run"]), _colors(runs)))
    fig = _figure(figsize=(10, 3.8))
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for name, group in data.groupby("run", sort=False):
            band = ("pi", 100) if group["seed"].nunique() > 1 else None
            sns.lineplot(data=group, x="passes", y=metric, color=colors[name], errorbar=band, label=name,
                         legend=metric == "loss", ax=ax)
        ax.set(xlabel="network passes (steps × passes per step)", ylabel=f"{eval_set} {metric}")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_eps_error(errors: pd.DataFrame, title: str = "") -> Figure:
    """The relative error of a central difference against the directional derivative it
    estimates, against the step ε on log–log axes: one line per ``dtype`` (columns ``eps``,
    ``dtype``, ``error``; several rows per ε, e.g. one per direction, give a band), and one
    panel per ``model`` when there is such a column. Float rounding makes the error grow
    like 1/ε on the left, the Taylor remainder like ε² on the right."""
    check_frame("errors", errors, ["eps", "dtype", "error"], "a DataFrame with eps, dtype and error columns")
    panels = list(dict.fromkeys(errors["model"])) if "model" in errors else [None]
    fig = _figure(figsize=(5 * len(panels), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, panel in zip(axes, panels):
        data = errors if panel is None else errors[errors["model"] == panel]
        sns.lineplot(data=data, x="eps", y="error", hue="dtype", errorbar=("pi", 100), marker="o", markersize=4,
                     ax=ax, legend=ax is axes[0])
        ax.set(xscale="log", yscale="log", xlabel="finite-difference step ε", title=panel or "",
               ylabel="relative error of the central difference")
        ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    return fig


def _grid(f: Callable, xlim: tuple[float, float], ylim: tuple[float, float], n: int = 200):
    """``f`` on an n × n grid over the axis ranges, which are checked here for every plot of ``f``."""
    check_callable("f", f, "a function f(x, y) of two tensors, e.g. fgtutor.testfns.beale")
    xlim, ylim = (check_pair(name, lim, "two numbers (low, high)") for name, lim in (("xlim", xlim), ("ylim", ylim)))
    xs = torch.linspace(*xlim, n, dtype=torch.float64)
    ys = torch.linspace(*ylim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    return X.numpy(), Y.numpy(), f(X, Y).numpy()


def _as_points(path) -> np.ndarray:
    points = np.asarray(path.points if hasattr(path, "points") else path, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"a trajectory must be an (n, 2) array of points with n >= 1, got shape {points.shape}.")
    return points


def plot_contour(f: Callable, trajectories: Mapping[str, object], xlim: tuple[float, float],
                 ylim: tuple[float, float], minimum: Optional[tuple[float, float]] = None,
                 arrows: int = 30, title: str = "") -> Figure:
    """Log-spaced contours of ``f(x, y)`` with each trajectory (a ``Trajectory`` or an
    (n, 2) array) drawn as a path, with up to ``arrows`` step arrows along it."""
    _check_mapping("trajectories", trajectories, "a Trajectory or an (n, 2) array of points")
    check_positive("arrows", arrows, allow_zero=True, integer=True)
    if minimum is not None:
        check_pair("minimum", minimum, "None or a point (x, y)")
    fig = _figure(figsize=(7, 5.5))
    ax = fig.subplots()
    X, Y, Z = _grid(f, xlim, ylim)
    positive = Z[Z > 0]
    if not positive.size:
        raise ValueError("f is nowhere positive on the grid: log-spaced contours need f > 0 somewhere; "
                         "widen xlim and ylim, or plot f + 1.")
    levels = np.logspace(np.log10(max(positive.min(), 1e-6)), np.log10(positive.max()), 25)
    cs = ax.contourf(X, Y, np.maximum(Z, levels[0]), levels=levels, norm=LogNorm(), cmap="viridis", alpha=0.85)
    decades = 10.0 ** np.arange(np.ceil(np.log10(levels[0])), np.floor(np.log10(levels[-1])) + 1)
    fig.colorbar(cs, ax=ax, label="f(x, y)", ticks=decades, format=LogFormatterMathtext())
    for color, (label, path) in zip(_colors(trajectories), trajectories.items()):
        p = _as_points(path)
        style = "--" if "backprop" in label.lower() else "-"
        ax.plot(p[:, 0], p[:, 1], style, color=color, lw=1.5, alpha=0.85, label=label)
        if arrows and len(p) > 1:
            idx = np.unique(np.linspace(0, len(p) - 2, min(arrows, len(p) - 1)).astype(int))
            d = p[idx + 1] - p[idx]
            ax.quiver(p[idx, 0], p[idx, 1], d[:, 0], d[:, 1], color=color, angles="xy",
                      scale_units="xy", scale=1, width=0.004)
        ax.plot(*p[0], "o", color="white", mec="black", ms=6)
    if minimum is not None:
        ax.plot(*minimum, "*", color="gold", mec="black", ms=14, label="minimum")
    ax.set(xlim=xlim, ylim=ylim, xlabel="x", ylabel="y", title=title)
    ax.legend(loc="upper left")
    return fig


def plot_surface(f: Callable, trajectories: Mapping[str, object], xlim: tuple[float, float],
                 ylim: tuple[float, float], title: str = "") -> Figure:
    """3-D surface of ``log(1 + f)`` with the trajectories drawn on it."""
    _check_mapping("trajectories", trajectories, "a Trajectory or an (n, 2) array of points")
    fig = _figure(figsize=(7, 5.5))
    ax = fig.add_subplot(projection="3d")
    X, Y, Z = _grid(f, xlim, ylim, n=120)
    ax.plot_surface(X, Y, np.log1p(Z), cmap="viridis", alpha=0.6, lw=0, antialiased=True)
    for color, (label, path) in zip(_colors(trajectories), trajectories.items()):
        p = _as_points(path)
        z = np.log1p(f(torch.as_tensor(p[:, 0]), torch.as_tensor(p[:, 1])).numpy())
        ax.plot(p[:, 0], p[:, 1], z, color=color, lw=2, label=label)
    ax.set(xlabel="x", ylabel="y", zlabel="log(1 + f)", title=title)
    ax.view_init(elev=35, azim=-120)
    ax.legend()
    return fig


def plot_estimates(f: Callable, point: tuple[float, float], true_grad: Sequence[float],
                   estimates: Sequence[Sequence[float]], xlim: tuple[float, float],
                   ylim: tuple[float, float], title: str = "") -> Figure:
    """Sampled gradient estimates drawn as arrows from ``point`` against the true gradient."""
    point, true_grad = check_pair("point", point), check_pair("true_grad", true_grad)
    est = _as_points(estimates)
    fig = _figure(figsize=(6.5, 5))
    ax = fig.subplots()
    X, Y, Z = _grid(f, xlim, ylim)
    ax.contour(X, Y, np.log1p(Z), levels=20, cmap="Greys", alpha=0.6)
    ax.quiver(np.full(len(est), point[0]), np.full(len(est), point[1]), est[:, 0], est[:, 1],
              color=METHOD_COLORS["forward"], angles="xy", scale_units="xy", scale=1, width=0.005,
              alpha=0.8, label=f"{len(est)} forward gradients")
    ax.quiver(point[0], point[1], true_grad[0], true_grad[1], color=METHOD_COLORS["backprop"], angles="xy",
              scale_units="xy", scale=1, width=0.009, label="true gradient")
    ax.plot(*point, "ko", ms=5)
    ax.set(xlim=xlim, ylim=ylim, xlabel="x", ylabel="y", title=title, aspect="equal")
    ax.legend(loc="lower right")
    return fig


def plot_bars(table: pd.DataFrame, title: str = "", ylabel: str = "milliseconds per step",
              stacked: bool = True) -> Figure:
    """Bars: one group per row of ``table``, one bar or segment per column, stacked
    (parts of a whole) or side by side (``stacked=False``, things to compare)."""
    check_frame("table", table, [], "a DataFrame: one row per group of bars, one column per bar")
    fig = _figure(figsize=(8, 4.5))
    ax = fig.subplots()
    x = np.arange(len(table))
    width = 0.8 if stacked else 0.8 / len(table.columns)
    bottom = np.zeros(len(table))
    for j, col in enumerate(table.columns):
        values = table[col].to_numpy(dtype=float)
        offset = 0 if stacked else (j - (len(table.columns) - 1) / 2) * width
        ax.bar(x + offset, values, width, bottom=bottom if stacked else None, label=col,
               color=_colors([str(col)])[0] if not stacked else None)
        if stacked:
            bottom += np.nan_to_num(values)
    ax.set_xticks(x, table.index.astype(str))
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return fig


def plot_step_costs(steps: pd.DataFrame, parts: Sequence[str] = ("sample tangents", "forward-mode pass", "update"),
                    title: str = "") -> Figure:
    """One panel per model (a row of ``fgtutor.bench.measure_steps``): milliseconds of a
    forward pass, a backprop step, a forward-gradient step split into its parts, and the
    same step through ``torch.func``."""
    if isinstance(parts, str) or not isinstance(parts, Sequence):
        raise ValueError(f"parts={parts!r} is not allowed: use a list of step parts, e.g. ['update'].")
    check_frame("steps", steps, ["batch", "forward gradient ms", *(f"{part} ms" for part in parts)],
                "fgtutor.bench.measure_steps's table, one row per model")
    if steps.empty:
        raise ValueError("steps has no rows: there is no model to draw.")
    fig = _figure(figsize=(5.5 * len(steps), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(steps)))
    for ax, (model, row) in zip(axes, steps.iterrows()):
        bars = [("forward pass", "forward ms", "tab:gray"), ("backprop step", "backprop ms", METHOD_COLORS["backprop"]),
                ("torch.func step", "torch.func ms", "tab:purple")]
        names = []
        for i, (label, col, color) in enumerate(bars):
            if col in row and pd.notna(row[col]):
                ax.bar(len(names), row[col], color=color)
                names.append(label)
        fg_x = len(names)
        bottom = 0.0
        for j, part in enumerate(parts):
            ax.bar(fg_x, row[f"{part} ms"], bottom=bottom, color=METHOD_COLORS["forward"], alpha=1 - 0.25 * j,
                   label=part)
            bottom += row[f"{part} ms"]
        rest = row["forward gradient ms"] - bottom
        if rest > 0:
            ax.bar(fg_x, rest, bottom=bottom, color="lightsteelblue", label="other")
        names.append("forward-gradient step")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set(ylabel="median milliseconds per call", title=f"{model}, batch {int(row['batch'])}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="forward-gradient step", title_fontsize=8)
    fig.suptitle(title)
    return fig


def plot_samples(samples: Mapping[str, object], true_grad: Sequence[float], title: str = "") -> Figure:
    """One panel per sampler: the cloud of gradient estimates (an (n, 2) array each), its
    mean (cross) and the true gradient (star). Axes cover the central 98 % of the points;
    when a cloud has only a few distinct points (Rademacher in 2-D), each is labelled with
    its count."""
    _check_mapping("samples", samples, "an (n, 2) array of estimates", empty_ok=False)
    true_grad = check_pair("true_grad", true_grad)
    clouds = {label: _as_points(s) for label, s in samples.items()}
    everything = np.concatenate(list(clouds.values()))
    lo, hi = np.percentile(everything, 1, axis=0), np.percentile(everything, 99, axis=0)
    lo, hi = np.minimum(lo, true_grad) - 1, np.maximum(hi, true_grad) + 1
    fig = _figure(figsize=(5 * len(clouds), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(clouds), sharex=True, sharey=True))
    for i, (ax, (label, s)) in enumerate(zip(axes, clouds.items())):
        ax.scatter(s[:, 0], s[:, 1], s=10, alpha=0.3, color=f"C{i}", label=f"{len(s)} estimates")
        values, counts = np.unique(s.round(10), axis=0, return_counts=True)
        if len(values) <= 8:
            for v, c in zip(values, counts):
                ax.annotate(f"×{c}", v, textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.plot(*s.mean(0), "X", color=f"C{i}", mec="black", ms=12, label="their mean")
        ax.plot(*true_grad, "*", color="gold", mec="black", ms=16, label="true gradient")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="∂f/∂x estimate", title=label)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("∂f/∂y estimate")
    fig.suptitle(title)
    return fig


def plot_distribution(values: Sequence[float], reference: float, xlabel: str, title: str = "",
                      label: str = "", reference_label: str = "") -> Figure:
    """Histogram of ``values`` with a vertical line at ``reference``: e.g. what a noisy
    metric reports, run after run, against the exact value it should report."""
    values = _as_curve("values", values)
    reference = check_number("reference", reference)
    fig = _figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(values, bins=30, color="tab:gray", alpha=0.8, label=label)
    ax.axvline(reference, color="black", lw=2, label=reference_label)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    if label or reference_label:
        ax.legend()
    return fig


def plot_sweep(results: pd.DataFrame, metric: str = "val_loss", title: str = "", by: str = "decay") -> Figure:
    """``metric`` against learning rate (log scale) for every method and value of ``by``
    (a column: the decay, or e.g. the search protocol) of a sweep (one row per run, as
    ``fgtutor.analysis.search_table`` makes); diverged runs are marked with an ✕ at the top."""
    check_frame("results", results, ["method", "lr", "diverged", metric, by],
                "a table of runs, one row each, as fgtutor.analysis.search_table makes it")
    fig = _figure(figsize=(8, 4.5))
    ax = fig.subplots()
    methods = list(dict.fromkeys(results["method"]))
    finite = results[metric][results[metric].notna()]
    top = finite.max() if len(finite) else 1.0
    for color, method in zip(_colors(methods), methods):
        rows = results[results["method"] == method]
        values = list(dict.fromkeys(rows[by]))
        for j, value in enumerate(values):
            r = rows[rows[by] == value].sort_values("lr")
            name = f"decay {value:.0e}" if by == "decay" else str(value)
            ax.plot(r["lr"], r[metric], "o-", color=color, ms=4,
                    alpha=0.4 + 0.6 * (j + 1) / len(values), label=method if by == "method" else f"{method}, {name}")
            bad = r[r["diverged"] | r[metric].isna()]
            ax.plot(bad["lr"], np.full(len(bad), top), "x", color=color, ms=9, mew=2)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=metric.replace("_", " "), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_cosines(measured: pd.DataFrame, title: str = "") -> Figure:
    """Cosine between estimates and the gradient (log scale), one row per estimator and a
    colour per ``stage``: one dot per draw, the mean as a bar; a black tick where
    ``measured`` has a ``theory`` value for that estimator (columns ``estimator``,
    ``stage``, ``cosine`` and optionally ``theory``)."""
    check_frame("measured", measured, ["estimator", "stage", "cosine"], "a DataFrame of cosines, one row per draw")
    if measured.empty:
        raise ValueError("measured has no rows: there is no cosine to draw.")
    estimators = list(dict.fromkeys(measured["estimator"]))
    fig = _figure(figsize=(8, 0.55 * len(estimators) + 1.8))
    ax = fig.subplots()
    data = measured.assign(cosine=measured["cosine"].abs().clip(lower=1e-6))  # a log axis needs > 0
    sns.stripplot(data=data, x="cosine", y="estimator", hue="stage", dodge=True, alpha=0.5, size=4, ax=ax,
                  order=estimators, log_scale=True)
    sns.pointplot(data=data, x="cosine", y="estimator", hue="stage", dodge=0.4, errorbar=None, markers="|",
                  markersize=14, linestyles="none", ax=ax, order=estimators, legend=False)
    if "theory" in measured:
        theory = measured.dropna(subset=["theory"]).groupby("estimator", sort=False)["theory"].first()
        ys = [estimators.index(e) for e in theory.index]
        ax.scatter(theory.to_numpy(), ys, marker="|", s=400, color="black", zorder=5, label="theory (FG-W)")
    ax.set(xlabel="|cosine| with the gradient (log scale)", ylabel="", title=title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_ablation(table: pd.DataFrame, column: str = "test_accuracy", baseline: Optional[float] = None,
                  xlabel: str = "test accuracy", title: str = "") -> Figure:
    """One dot per variant of an ablation (``table``: columns ``ingredient``, ``variant``
    and ``column``), grouped and coloured by ingredient, with the baseline's value as a
    vertical line: which ingredient moves the result, and which way."""
    check_frame("table", table, ["ingredient", "variant", column], "a DataFrame with one row per variant")
    frame = table.assign(label=table["ingredient"] + ": " + table["variant"].astype(str))
    fig = _figure(figsize=(8, 0.38 * len(frame) + 1.2))
    ax = fig.subplots()
    sns.scatterplot(frame, x=column, y="label", hue="ingredient", s=80, ax=ax, legend=False)
    if baseline is not None:
        ax.axvline(baseline, color="black", lw=1, ls="--", label="baseline")
        ax.legend(loc="best")
    ax.set(xlabel=xlabel, ylabel="", title=title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_ablation_curves(groups: Mapping[str, Mapping[str, History]], baseline: History,
                         column: str = "val_accuracy", ylabel: str = "validation accuracy") -> Figure:
    """Small multiples, one panel per ingredient of an ablation: ``column`` against epochs
    for each of its variants (``groups[ingredient][variant]``, a History) and, dashed in
    every panel, for the ``baseline``, so that each change is read against the same curve."""
    _check_mapping("groups", groups, "a dict of ingredient -> {variant: History}", empty_ok=False)
    check_type("baseline", baseline, History, "the baseline run's History")
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig = _figure(figsize=(3.2 * cols, 2.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()

    def curve(run: History) -> tuple[list, list]:
        kept = [row for row in run.epochs if column in row]
        return [row["epoch"] for row in kept], [row[column] for row in kept]

    for ax, (ingredient, variants) in zip(axes, groups.items()):
        _check_mapping(f"groups[{ingredient!r}]", variants, "a dict of variant -> History", empty_ok=False)
        ax.plot(*curve(baseline), color="black", ls="--", lw=1.2, label="baseline")
        for variant, run in variants.items():
            check_type(f"groups[{ingredient!r}][{variant!r}]", run, History, "a History")
            ax.plot(*curve(run), lw=1.6, label=str(variant))
        ax.set_title(str(ingredient), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel)
    for ax in axes[-cols:]:
        ax.set_xlabel("epoch")
    return fig


def plot_against_references(groups: Mapping[str, Sequence[History]], references: Mapping[str, Mapping[str, float]],
                            column: str = "test_accuracy", xlabel: str = "test accuracy") -> Figure:
    """One panel per estimator: each seed's final ``column`` (dots), their mean (a bar)
    and the numbers to beat (``references[label][name]``, e.g. a target and a published
    number) as labelled vertical lines. Panels have their own scales, so that a spread of
    0.002 stays visible beside estimators 0.07 apart."""
    _check_mapping("groups", groups, "a list of Histories, one per seed", empty_ok=False)
    _check_mapping("references", references, "a dict of reference name -> value")
    fig = _figure(figsize=(8, 1.1 * len(groups) + 0.8))
    axes = np.atleast_1d(fig.subplots(len(groups), 1))
    styles = {}
    for ax, (label, group) in zip(axes, groups.items()):
        if isinstance(group, History) or not group or not all(isinstance(r, History) for r in group):
            raise ValueError(f"groups[{label!r}]={short_repr(group)} is not allowed: use a non-empty list of "
                             "Histories, one per seed.")
        finals = [np.nan if run.diverged else run.epochs[-1][column] for run in group]
        ax.scatter(finals, np.zeros(len(finals)), color="tab:blue", s=40, zorder=3, label="a seed")
        ax.plot([np.nanmean(finals)] * 2, [-0.3, 0.3], color="tab:blue", lw=3, label="mean of the seeds")
        for name, value in references.get(label, {}).items():
            style = styles.setdefault(name, dict(color=f"C{len(styles) + 1}", ls=("--", ":", "-.")[len(styles) % 3]))
            ax.axvline(check_number(f"references[{label!r}][{name!r}]", value), lw=1.5, label=name, **style)
        values = [v for v in (*finals, *references.get(label, {}).values()) if np.isfinite(v)]
        pad = max(0.002, 0.15 * (max(values) - min(values)))
        ax.set(xlim=(min(values) - pad, max(values) + pad), ylim=(-1, 1), yticks=[])
        ax.set_ylabel(str(label), rotation=0, ha="right", va="center")
        ax.grid(axis="x", alpha=0.3)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="outside upper center", ncols=len(handles), fontsize=9)
    axes[-1].set_xlabel(xlabel)
    return fig
