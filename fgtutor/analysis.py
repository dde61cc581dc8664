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

Groups = Mapping[str, Sequence[History]]


def epoch_table(group: Sequence[History], column: str) -> pd.DataFrame:
    """One row per epoch, one column per seed, holding ``column`` (e.g. ``"test_loss"``).

    Epochs a run did not reach (it diverged) are NaN.
    """
    if not group:
        raise ValueError("group is empty: pass at least one History.")
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
    return float(np.median([1000 * run.epochs[-1]["train_seconds"] / max(1, run.epochs[-1]["step"]) for run in group]))


def time_to_loss(run: History, target: float, column: str = "test_loss", by: str = "train_seconds") -> float:
    """Training seconds (or, with ``by="step"``, steps) until ``column`` first reaches
    ``target`` (linear interpolation between evaluations); NaN if it never does."""
    df = pd.DataFrame(run.epochs)
    seconds, values = df[by].to_numpy(dtype=float), df[column].to_numpy()
    hit = np.flatnonzero(values <= target)
    if len(hit) == 0:
        return float("nan")
    i = hit[0]
    if i == 0:
        return 0.0
    t0, t1, v0, v1 = seconds[i - 1], seconds[i], values[i - 1], values[i]
    return float(t0 + (t1 - t0) * (v0 - target) / (v0 - v1))


def common_target(groups: Groups, column: str = "test_loss") -> float:
    """The highest final ``column`` among the runs that did not diverge: a loss that every
    one of them reaches, so that the time-to-loss ratio is defined for every seed."""
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
    return f"{mean:.{digits}f}" if not np.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def search_table(configs: Sequence[dict], histories: Sequence[History], metric: str = "val") -> pd.DataFrame:
    """One row per search run: ``method``, ``lr``, ``decay``, the final ``<metric>_loss``
    and ``<metric>_accuracy`` (NaN when the run diverged), ``diverged`` and the training
    seconds. ``configs`` are the runs' configurations (``fgtutor.store.run_config``)."""
    rows = []
    for config, run in zip(configs, histories):
        last = run.epochs[-1]
        rows.append({"method": config["method"], "lr": config["lr"], "decay": config["decay"],
                     f"{metric}_loss": np.nan if run.diverged else last[f"{metric}_loss"],
                     f"{metric}_accuracy": np.nan if run.diverged else last[f"{metric}_accuracy"],
                     "diverged": run.diverged, "train_seconds": last["train_seconds"]})
    return pd.DataFrame(rows)
