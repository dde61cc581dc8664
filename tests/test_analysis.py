"""Reading groups of runs: tables over seeds, mean ± sd, and the paper's time-to-loss."""
import math

import numpy as np
import pytest

from fgtutor.analysis import (common_target, epoch_table, final_scores, mean_sd, ms_per_step, search_table, time_to_accuracy,
                              time_to_loss,
                              time_to_loss_ratio)
from fgtutor.train import History


def run(losses, seconds, seed=0, diverged=False, accuracy=None) -> History:
    rows = [{"epoch": e, "step": 10 * e, "test_loss": loss, "train_seconds": t,
             "test_accuracy": (accuracy or [0.5] * len(losses))[e], "val_loss": loss, "val_accuracy": 0.5}
            for e, (loss, t) in enumerate(zip(losses, seconds))]
    return History(meta={"seed": seed}, epochs=rows, diverged=diverged)


def test_epoch_table_has_a_column_per_seed_and_nan_where_a_run_stopped():
    table = epoch_table([run([2.0, 1.0, 0.5], [0, 1, 2], seed=0), run([2.0, 1.5], [0, 1], seed=1)], "test_loss")
    assert list(table.columns) == [0, 1] and list(table.index) == [0, 1, 2]
    assert table.loc[2, 0] == 0.5 and math.isnan(table.loc[2, 1])
    with pytest.raises(ValueError, match="column='nope' is not recorded"):
        epoch_table([run([1.0], [0])], "nope")


def test_final_scores_are_mean_and_sample_sd_over_seeds():
    groups = {"a": [run([2.0, 1.0], [0, 10]), run([2.0, 3.0], [0, 20])]}
    row = final_scores(groups).loc["a"]
    assert row["test_loss mean"] == 2.0 and row["test_loss sd"] == pytest.approx(math.sqrt(2))
    assert row["train_seconds mean"] == 15 and row["runs"] == 2 and row["diverged"] == 0


def test_a_diverged_run_has_no_final_score_but_counts():
    groups = {"a": [run([2.0, 1.0], [0, 10]), run([2.0, 3.0], [0, 20], diverged=True)]}
    row = final_scores(groups).loc["a"]
    assert row["test_loss mean"] == 1.0 and math.isnan(row["test_loss sd"])
    assert row["train_seconds mean"] == 15 and row["diverged"] == 1


def test_time_to_accuracy_is_when_accuracy_first_reaches_the_target_interpolated():
    r = run([2.0, 1.0, 0.5], [0, 10, 20], accuracy=[0.1, 0.5, 0.9])
    assert time_to_accuracy(r, 0.5) == 10 and time_to_accuracy(r, 0.7) == pytest.approx(15)
    assert time_to_accuracy(r, 0.3, by="epoch") == pytest.approx(0.5)
    assert math.isnan(time_to_accuracy(r, 0.95))


def test_time_to_loss_interpolates_between_evaluations():
    r = run([2.0, 1.0, 0.5], [0, 10, 20])
    assert time_to_loss(r, 1.0) == 10
    assert time_to_loss(r, 1.5) == 5
    assert time_to_loss(r, 0.75) == 15
    assert time_to_loss(r, 2.5) == 0.0
    assert math.isnan(time_to_loss(r, 0.1))


def test_time_to_loss_ratio_pairs_seeds_and_skips_pairs_that_never_got_there():
    fast = [run([2.0, 1.0], [0, 5]), run([2.0, 1.0], [0, 15]), run([2.0, 1.9], [0, 5])]
    slow = [run([2.0, 1.0], [0, 10]), run([2.0, 1.0], [0, 10]), run([2.0, 1.0], [0, 10])]
    mean, sd = time_to_loss_ratio(fast, slow, 1.0)
    assert mean == pytest.approx(1.0) and sd == pytest.approx(np.std([0.5, 1.5], ddof=1))
    assert all(map(math.isnan, time_to_loss_ratio(fast[2:], slow[2:], 1.0)))


def test_ms_per_step_and_mean_sd_formatting():
    assert ms_per_step([run([2.0, 1.0], [0, 1.0]), run([2.0, 1.0], [0, 2.0])]) == pytest.approx(150.0)
    assert mean_sd(0.91234, 0.00456) == "0.912 ± 0.005"
    assert mean_sd(0.91234, float("nan")) == "0.912"


def test_search_table_blanks_the_scores_of_diverged_runs():
    configs = [{"method": "forward", "lr": 0.1, "decay": 1e-4}, {"method": "forward", "lr": 1.0, "decay": 1e-4}]
    table = search_table(configs, [run([2.0, 1.0], [0, 1]), run([2.0, 9.0], [0, 1], diverged=True)])
    assert table["val_loss"].tolist()[0] == 1.0 and math.isnan(table["val_loss"].tolist()[1])
    assert table["diverged"].tolist() == [False, True]


def test_the_common_target_is_the_worst_final_loss_of_the_runs_that_finished():
    groups = {"a": [run([2.0, 1.0], [0, 1]), run([2.0, 1.5], [0, 1])], "b": [run([2.0, 9.0], [0, 1], diverged=True)]}
    assert common_target(groups) == 1.5
    with pytest.raises(ValueError, match="every run diverged"):
        common_target({"b": groups["b"]})


def test_time_to_loss_counts_steps_with_by_step():
    run = History(epochs=[{"epoch": 0, "step": 0, "train_seconds": 0.0, "test_loss": 2.0},
                          {"epoch": 1, "step": 100, "train_seconds": 10.0, "test_loss": 1.0}])
    assert time_to_loss(run, 1.5, by="step") == pytest.approx(50.0)
    assert time_to_loss(run, 1.5) == pytest.approx(5.0)


def test_time_to_loss_ratio_from_steps_times_a_measured_step_cost():
    fast = History(epochs=[{"epoch": 0, "step": 0, "train_seconds": 0.0, "test_loss": 2.0},
                           {"epoch": 1, "step": 100, "train_seconds": 99.0, "test_loss": 1.0}])
    slow = History(epochs=[{"epoch": 0, "step": 0, "train_seconds": 0.0, "test_loss": 2.0},
                           {"epoch": 1, "step": 200, "train_seconds": 1.0, "test_loss": 1.0}])
    # half the steps at three times the cost per step: 1.5 times the time, whatever the recorded seconds
    ratio, _ = time_to_loss_ratio([fast], [slow], 1.0, step_ms=(3.0, 1.0))
    assert ratio == pytest.approx(1.5)


def test_ms_per_step_is_the_median_so_one_slowed_run_does_not_move_it():
    group = [run([2.0, 1.0], [0, 1.0]), run([2.0, 1.0], [0, 1.1]), run([2.0, 1.0], [0, 9.0])]
    assert ms_per_step(group) == pytest.approx(110.0)  # 1.1 s over 10 steps, not the mean


def test_value_at_interpolates_between_evaluations_and_is_nan_outside_them():
    from fgtutor.analysis import value_at
    r = run([2.0, 1.0, 0.5], [0, 10, 20], accuracy=[0.1, 0.5, 0.9])
    assert value_at(r, 15) == pytest.approx(0.7) and value_at(r, 10) == 0.5
    assert value_at(r, 5, column="test_loss") == pytest.approx(1.5)
    assert value_at(r, 15, by="step") == pytest.approx(0.7), "steps are 0, 10, 20 here too"
    assert math.isnan(value_at(r, 25)) and math.isnan(value_at(r, -1))
