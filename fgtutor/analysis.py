"""Reading several runs at once: curves over seeds, final scores as mean ± sd, and the
paper's time-to-loss measure.

A *group* is a list of Histories that differ only in their seed (one configuration,
several seeds); functions take ``{label: group}`` mappings.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .train import History
from .utils import check_number, check_pair, check_positive, check_type, short_repr

Groups = Mapping[str, Sequence[History]]


# What each function reads is checked first, so that a wrong argument is a ValueError that
# names it rather than a KeyError or AttributeError from inside pandas.

def _check_run(name: str, run) -> None:
    """A History with at least one evaluation row."""
    check_type(name, run, History, "a History (one run), e.g. from fgtutor.train.fit")
    if not run.epochs:
        raise ValueError(f"{name} has no evaluation rows: a History from fit has at least epoch 0.")


def _check_group(name: str, group) -> None:
    """A non-empty list of Histories, one per seed."""
    if not isinstance(group, (list, tuple)) or not group:
        raise ValueError(f"{name}={short_repr(group)} is not allowed: use a non-empty list of Histories, "
                         "one per seed, e.g. [history].")
    for i, run in enumerate(group):
        _check_run(f"{name}[{i}]", run)


def _check_groups(name: str, groups) -> None:
    """A mapping of label -> group."""
    if not isinstance(groups, Mapping):
        raise ValueError(f"{name}={short_repr(groups)} is not allowed: use a dict of label -> list of Histories, "
                         'e.g. {"forward": [run0, run1], "backprop": [run2, run3]}.')
    for label, group in groups.items():
        _check_group(f"{name}[{label!r}]", group)


def _check_recorded(name: str, run: History, columns: Sequence[str]) -> None:
    """Every one of ``columns`` is in the run's last evaluation row."""
    for column in columns:
        if not isinstance(column, str) or column not in run.epochs[-1]:
            raise ValueError(f"column={column!r} is not recorded in {name}; have: {', '.join(run.epochs[-1])}.")


def epoch_table(group: Sequence[History], column: str) -> pd.DataFrame:
    """One row per epoch, one column per seed, holding ``column`` (e.g. ``"test_loss"``).

    Epochs a run did not reach (it diverged) are NaN.
    """
    if not group:
        raise ValueError("group is empty: pass at least one History.")
    _check_group("group", group)
    check_type("column", column, str, 'the name of a recorded column, e.g. "test_loss"')
    table = {}
    for run in group:
        df = pd.DataFrame(run.epochs)
        if column not in df:
            raise ValueError(f"column={column!r} is not recorded; have: {', '.join(df.columns)}.")
        table[run.meta.get("seed", len(table))] = df.set_index("epoch")[column]
    return pd.DataFrame(table)


def final_scores(groups: Groups, columns: Sequence[str] = ("test_loss", "test_accuracy", "train_seconds")
                 ) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each run's last ``columns``, one row per
    group; ``runs`` counts the seeds and ``diverged`` how many of them diverged. A run that
    diverged has no final loss or accuracy (NaN, left out of the mean): its last evaluation
    is of a model that was still training."""
    _check_groups("groups", groups)
    if isinstance(columns, str) or not isinstance(columns, (list, tuple)):
        raise ValueError(f"columns={columns!r} is not allowed: use a list of column names, e.g. ['test_loss'].")
    for label, group in groups.items():
        for i, run in enumerate(group):
            _check_recorded(f"groups[{label!r}][{i}]", run, columns)
    rows = {}
    for label, group in groups.items():
        finals = pd.DataFrame([{c: np.nan if run.diverged and not c.endswith("seconds") else run.epochs[-1][c]
                                for c in columns} for run in group])
        row = {"runs": len(group), "diverged": sum(run.diverged for run in group)}
        for c in columns:
            row[f"{c} mean"] = finals[c].mean()
            row[f"{c} sd"] = finals[c].std(ddof=1) if len(group) > 1 else np.nan
        rows[label] = row
    return pd.DataFrame(rows).T


def ms_per_step(group: Sequence[History]) -> float:
    """Training milliseconds per step, the median over the runs of a group: robust to one
    run slowed down by other work on the machine."""
    _check_group("group", group)
    for i, run in enumerate(group):
        _check_recorded(f"group[{i}]", run, ("train_seconds", "step"))
    return float(np.median([1000 * run.epochs[-1]["train_seconds"] / max(1, run.epochs[-1]["step"]) for run in group]))


def time_to_loss(run: History, target: float, column: str = "test_loss", by: str = "train_seconds") -> float:
    """Training seconds (or, with ``by="step"``, steps) until ``column`` first reaches
    ``target`` (linear interpolation between evaluations); NaN if it never does."""
    _check_run("run", run)
    target = check_number("target", target)
    _check_recorded("run", run, (column, by))
    df = pd.DataFrame(run.epochs)
    return _first_crossing(df[by].to_numpy(dtype=float), df[column].to_numpy(dtype=float), target)


def time_to_accuracy(run: History, target: float, column: str = "test_accuracy", by: str = "train_seconds") -> float:
    """Training seconds (or, with ``by="epoch"`` or ``"step"``, epochs or steps) until
    ``column`` first reaches at least ``target`` (interpolated); NaN if it never does."""
    _check_run("run", run)
    target = check_number("target", target)
    _check_recorded("run", run, (column, by))
    df = pd.DataFrame(run.epochs)
    return _first_crossing(df[by].to_numpy(dtype=float), -df[column].to_numpy(dtype=float), -target)


def value_at(run: History, at: float, column: str = "test_accuracy", by: str = "train_seconds") -> float:
    """``column`` of ``run`` at ``by`` = ``at`` (training seconds, or ``"step"``,
    ``"epoch"``), interpolated linearly between the epochs' evaluations; NaN outside
    them (before the first evaluation or after the last). For comparing runs at an equal
    budget of seconds or steps."""
    _check_run("run", run)
    at = check_number("at", at)
    _check_recorded("run", run, (column, by))
    df = pd.DataFrame(run.epochs)
    x, y = df[by].to_numpy(dtype=float), df[column].to_numpy(dtype=float)
    if not x[0] <= at <= x[-1]:
        return float("nan")
    return float(np.interp(at, x, y))


def _first_crossing(times: np.ndarray, values: np.ndarray, target: float) -> float:
    """Where ``values`` first fall to ``target``, interpolated linearly between evaluations."""
    hit = np.flatnonzero(values <= target)
    if len(hit) == 0:
        return float("nan")
    i = hit[0]
    if i == 0:
        return 0.0
    t0, t1, v0, v1 = times[i - 1], times[i], values[i - 1], values[i]
    return float(t0 + (t1 - t0) * (v0 - target) / (v0 - v1))


def common_target(groups: Groups, column: str = "test_loss") -> float:
    """The highest final ``column`` among the runs that did not diverge: a loss that every
    one of them reaches, so that the time-to-loss ratio is defined for every seed."""
    _check_groups("groups", groups)
    for label, group in groups.items():
        for i, run in enumerate(group):
            if not run.diverged:
                _check_recorded(f"groups[{label!r}][{i}]", run, (column,))
    finals = [run.epochs[-1][column] for group in groups.values() for run in group if not run.diverged]
    if not finals:
        raise ValueError("every run diverged: there is no loss they all reach.")
    return float(max(finals))


def time_to_loss_ratio(numerator: Sequence[History], denominator: Sequence[History], target: float,
                       column: str = "test_loss", step_ms: Optional[tuple[float, float]] = None
                       ) -> tuple[float, float]:
    """The paper's measure: training seconds to reach ``target``, ``numerator`` over
    ``denominator``, seed by seed (runs are paired by position). Returns mean and sd of
    the ratio over the pairs where both reached it (NaN if none did).

    With ``step_ms = (numerator's, denominator's)`` milliseconds per step, the time is
    steps to ``target`` × the cost of a step instead of the runs' recorded seconds: the
    progress comes from the runs, the cost from a clean measurement on one machine."""
    _check_group("numerator", numerator)
    _check_group("denominator", denominator)
    if step_ms is not None:
        for i, ms in enumerate(check_pair("step_ms", step_ms, "None or two milliseconds per step "
                                                               "(numerator's, denominator's), e.g. (3.2, 1.1)")):
            check_positive(f"step_ms[{i}]", ms)
    by = "train_seconds" if step_ms is None else "step"
    scale = (1.0, 1.0) if step_ms is None else step_ms
    times = np.array([(scale[0] * time_to_loss(a, target, column, by), scale[1] * time_to_loss(b, target, column, by))
                      for a, b in zip(numerator, denominator)])
    ok = np.isfinite(times).all(axis=1) & (times[:, 1] > 0)  # reached by both, after some training
    ratios = times[ok, 0] / times[ok, 1]
    if len(ratios) == 0:
        return float("nan"), float("nan")
    return float(ratios.mean()), float(ratios.std(ddof=1)) if len(ratios) > 1 else float("nan")


def mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    """``"0.912 ± 0.004"``; just the mean when ``sd`` is NaN (one seed)."""
    mean, sd = check_number("mean", mean), check_number("sd", sd)
    check_positive("digits", digits, allow_zero=True, integer=True)
    return f"{mean:.{digits}f}" if not np.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def search_table(configs: Sequence[dict], histories: Sequence[History], metric: str = "val") -> pd.DataFrame:
    """One row per search run: ``method``, ``lr``, ``decay``, the final ``<metric>_loss``
    and ``<metric>_accuracy`` (NaN when the run diverged), ``diverged`` and the training
    seconds. ``configs`` are the runs' configurations (``fgtutor.store.run_config``)."""
    _check_search(configs, histories, metric)
    rows = []
    for config, run in zip(configs, histories):
        last = run.epochs[-1]
        rows.append({"method": config["method"], "lr": config["lr"], "decay": config["decay"],
                     f"{metric}_loss": np.nan if run.diverged else last[f"{metric}_loss"],
                     f"{metric}_accuracy": np.nan if run.diverged else last[f"{metric}_accuracy"],
                     "diverged": run.diverged, "train_seconds": last["train_seconds"]})
    return pd.DataFrame(rows)


def _check_search(configs: Sequence[dict], histories: Sequence[History], metric: str) -> None:
    """One configuration (with method, lr and decay) per run, and ``metric`` scored in every run."""
    for name, value in (("configs", configs), ("histories", histories)):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ValueError(f"{name}={short_repr(value)} is not allowed: use a list, one entry per search run.")
    if len(configs) != len(histories):
        raise ValueError(f"configs has {len(configs)} entries and histories {len(histories)}: "
                         "give one configuration per run, in the same order.")
    for i, (config, run) in enumerate(zip(configs, histories)):
        if not isinstance(config, Mapping) or not {"method", "lr", "decay"} <= set(config):
            raise ValueError(f"configs[{i}]={short_repr(config)} is not allowed: use a run's configuration with "
                             "method, lr and decay (fgtutor.store.run_config).")
        _check_run(f"histories[{i}]", run)
        _check_recorded(f"histories[{i}]", run, (f"{metric}_loss", f"{metric}_accuracy", "train_seconds"))
