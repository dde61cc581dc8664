"""Learning-rate searches as Optuna studies (fgtutor.sweep): trials are runs of the store,
workers share a study without training a configuration twice, a killed worker's trial is
retried, pruning stops runs and says what it saved, and bad storage fails before training.

The worker tests start real processes (``python -m fgtutor.sweep``) on an SQLite file and,
where PostgreSQL's server binaries and the psycopg2 driver are installed, on a throw-away
PostgreSQL cluster the test starts."""
from __future__ import annotations

import glob
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from fgtutor import store, sweep
from fgtutor.models import LogisticRegression
from fgtutor.store import run_config, run_path, train_runs
from fgtutor.train import train_model

ROOT = Path(__file__).resolve().parents[1]
# tiny but real: logistic regression on 64 MNIST images, scored on 64 validation images
BASE = dict(model="logreg", method="backprop", epochs=2, n_train=64, n_val=64, batch_size=16, eval_sets=["val"])
LRS = [0.01, 0.1, 1.0, 3.0]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A private results store and cache for this test, in this process and its workers."""
    env = {"FGTUTOR_RESULTS": str(tmp_path / "results"), "FGTUTOR_CACHE": str(tmp_path / "cache"),
           "FGTUTOR_STORE": "train"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return tmp_path


def sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("this test must not train")
    monkeypatch.setattr(sweep, "train_model", refuse)


class PruneAt(optuna.pruners.BasePruner):
    """Prunes the trials whose lr is in ``lrs`` at report ``step``: a decision known in advance."""

    def __init__(self, lrs, step=1):
        self.lrs, self.step = set(lrs), step

    def prune(self, study, trial):
        return trial.last_step == self.step and trial.params.get("lr") in self.lrs


# -- fit's on_epoch --------------------------------------------------------------------

def tiny_fit(**kwargs):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    return train_model(LogisticRegression, "forward", (X, Y), {"val": (X[:32], Y[:32])}, lr=1e-3, epochs=3,
                       batch_size=32, progress=False, **kwargs)[1]


def test_on_epoch_sees_every_row_changes_nothing_and_can_stop(tmp_path):
    seen = []
    plain, watched = tiny_fit(), tiny_fit(on_epoch=lambda row: seen.append(row["epoch"]) and False)
    assert seen == [0, 1, 2, 3]
    assert watched.step_loss == plain.step_loss
    assert [r["val_loss"] for r in watched.epochs] == [r["val_loss"] for r in plain.epochs]
    assert "stopped_after_epoch" not in watched.meta

    checkpoint = tmp_path / "run.pt"
    stopped = tiny_fit(on_epoch=lambda row: row["epoch"] == 1, checkpoint=checkpoint)
    assert stopped.meta["stopped_after_epoch"] == 1 and [r["epoch"] for r in stopped.epochs] == [0, 1]
    assert checkpoint.exists()  # kept, so that the run can be continued ...
    resumed = tiny_fit(checkpoint=checkpoint)  # ... into exactly the uninterrupted run
    assert resumed.step_loss == plain.step_loss and not checkpoint.exists()


# -- trials are runs of the store ----------------------------------------------------------

def test_a_study_over_stored_runs_trains_nothing_and_shows_what_pruning_saves(dirs, monkeypatch):
    histories = train_runs([dict(BASE, lr=lr) for lr in LRS], progress=False)
    no_training(monkeypatch)
    study = sweep.search_study(BASE, LRS, storage=sqlite(dirs), study="stored", pruner=PruneAt([LRS[-1]]),
                               log=None)
    table = sweep.study_table(study)
    assert table["lr"].tolist() == LRS and (table["source"] == "stored").all()
    assert table["pruned"].tolist() == [False, False, False, True]
    stored = dict(zip(LRS, histories))
    assert table["full_train_seconds"].tolist() == [stored[lr].epochs[-1]["train_seconds"] for lr in LRS]
    assert table["train_seconds"].iloc[-1] == stored[LRS[-1]].epochs[1]["train_seconds"]
    assert math.isnan(table["val_loss"].iloc[-1])
    assert table["val_loss"].iloc[0] == stored[LRS[0]].epochs[-1]["val_loss"]

    saving = sweep.pruning_saving(study)
    assert saving["pruned"] == 1 and not saving["estimated"]
    assert saving["saved_seconds"] == pytest.approx(saving["full_seconds"] - saving["spent_seconds"])
    assert saving["saved_seconds"] == pytest.approx(stored[LRS[-1]].epochs[-1]["train_seconds"]
                                                    - stored[LRS[-1]].epochs[1]["train_seconds"])
    full_best = min(LRS, key=lambda lr: stored[lr].epochs[-1]["val_loss"])
    assert saving["best_lr_full"] == full_best
    assert saving["changed"] == (saving["best_lr"] != full_best)

    # rerunning continues the study: nothing left to do
    assert sweep.run_worker(sweep.open_study(sqlite(dirs), "stored", pruner=PruneAt([])), log=None)["ran"] == 0


def test_a_diverged_run_stops_and_is_stored_a_pruned_one_is_not(dirs):
    base = dict(BASE, epochs=3)
    study = sweep.search_study(base, [0.1, 1e38], storage=sqlite(dirs), study="d", pruner=PruneAt([0.1]), log=None)
    trials = {t.params["lr"]: t for t in study.trials}
    diverged, pruned = trials[1e38], trials[0.1]
    assert diverged.state == TrialState.PRUNED and diverged.user_attrs["diverged"]  # out of the pruner's medians
    assert "pruned_epoch" not in diverged.user_attrs
    assert run_path(run_config(**base, lr=1e38), store.cache_root()).exists()  # a diverged run is a result
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["pruned_epoch"] == 1
    assert list(pruned.intermediate_values) == [1]  # reported epoch 1, then stopped
    config = run_config(**base, lr=0.1)
    assert not run_path(config, store.cache_root()).exists()  # not a finished run: not stored ...
    assert store.checkpoint_path(config, store.cache_root()).exists()  # ... but it can be continued
    assert pruned.user_attrs["full_estimated"]
    assert pruned.user_attrs["full_train_seconds"] == pytest.approx(3 * pruned.user_attrs["train_seconds"])
    table = sweep.study_table(study)
    assert table["diverged"].tolist() == [False, True] and table["pruned"].tolist() == [True, False]


def test_an_interrupted_worker_queues_its_trial_again_and_a_rerun_finishes_the_grid(dirs, monkeypatch):
    real = sweep.train_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "train_model", interrupted)
    study = sweep.open_study(sqlite(dirs), "ctrl-c", LRS[:2], BASE, pruner="none")
    with pytest.raises(KeyboardInterrupt):
        sweep.run_worker(study, log=None)
    [failed, queued] = study.trials
    assert failed.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.params == failed.params
    monkeypatch.setattr(sweep, "train_model", real)
    assert sweep.run_worker(study, log=None)["done"] == 2
    assert sorted(t.params["lr"] for t in finished(study)) == LRS[:2]


def test_tpe_searches_the_grid_range_within_a_budget(dirs):
    study = sweep.search_study(BASE, [0.01, 1.0], storage=sqlite(dirs), sampler="tpe", pruner="none",
                               n_trials=2, log=None)
    lrs = [t.params["lr"] for t in study.trials]
    assert len(lrs) == 2 and all(0.01 <= lr <= 1.0 for lr in lrs)
    with pytest.raises(ValueError, match="budget"):
        sweep.run_worker(study, log=None)


def test_a_study_holds_one_search(dirs):
    sweep.open_study(sqlite(dirs), "one", LRS, BASE)
    with pytest.raises(ValueError, match="grid="):
        sweep.open_study(sqlite(dirs), "one", LRS[:2], BASE)
    with pytest.raises(ValueError, match="epochs"):
        sweep.open_study(sqlite(dirs), "one", LRS, dict(BASE, epochs=5))
    with pytest.raises(ValueError, match="no study 'two'"):
        sweep.open_study(sqlite(dirs), "two")
    with pytest.raises(ValueError, match="lr"):
        sweep.open_study(sqlite(dirs), "three", LRS, dict(BASE, lr=0.1))
    assert sweep.open_study(sqlite(dirs), "one").user_attrs["grid"] == LRS  # joining needs only the name


def test_a_scratch_storage_holds_studies_until_exit_and_then_is_gone(dirs):
    with sweep.scratch_storage() as url, sweep.scratch_storage() as other:
        folder = Path(url.removeprefix("sqlite:///")).parent
        assert url != other and folder.is_dir()
        sweep.open_study(url, "kept", LRS, BASE)
        assert sweep.open_study(url, "kept").user_attrs["grid"] == LRS  # a second open finds it
        assert optuna.study.get_all_study_names(sweep.connect(other)) == []  # a new one starts empty
    assert not folder.exists()
    with pytest.raises(KeyError), sweep.scratch_storage() as url:
        raise KeyError("a failing chapter cell")
    assert not Path(url.removeprefix("sqlite:///")).parent.exists()


def test_a_readonly_build_names_missing_runs_before_any_trial(dirs, monkeypatch):
    monkeypatch.setenv("FGTUTOR_STORE", "readonly")
    study = sweep.open_study(sqlite(dirs), "ro", LRS, BASE)
    with pytest.raises(store.MissingRunsError, match="make results"):
        sweep.run_worker(study, log=None)
    assert study.trials == []


# -- bad storage: a clear error before any training ------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, message", [
    ("not a url", "is not a database URL"),
    ("nosuchdb://host/db", "unknown database 'nosuchdb'"),
    ("sqlite://", "in memory"),
    ("sqlite:////dev/null/studies.db", "cannot be made"),
])
def test_a_malformed_storage_url_is_refused(dirs, monkeypatch, capsys, url, message):
    no_training(monkeypatch)
    with pytest.raises(ValueError, match=message):
        sweep.open_study(url, "s", LRS, BASE)
    assert sweep.main(["--storage", url, "--study", "s", "--model", "logreg", "--lrs", "0.1"]) == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_database_is_named_before_any_training(dirs, monkeypatch, capsys):
    no_training(monkeypatch)
    url = f"postgresql://fgtutor:secret@127.0.0.1:{free_port()}/studies"
    start = time.perf_counter()
    assert sweep.main(["--storage", url, "--study", "s", "--model", "logreg", "--lrs", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1" in err and "secret" not in err  # the URL is named, its password is not
    assert "cannot be opened" in err or "driver" in err
    assert time.perf_counter() - start < 60
    assert not Path(os.environ["FGTUTOR_CACHE"]).exists()


# -- several workers ----------------------------------------------------------------------

def worker(storage: str, study: str, lrs, *extra: str, settings: dict = BASE) -> subprocess.Popen:
    """``python -m fgtutor.sweep`` as its own process, with this test's store."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items() if k != "eval_sets"]
    cmd = [sys.executable, "-m", "fgtutor.sweep", "--storage", storage, "--study", study, *args,
           "--heartbeat", "1", "--grace", "3", "--lrs", *map(str, lrs), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finished(study) -> list:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def two_workers_complete_the_grid(url: str) -> None:
    procs = [worker(url, "shared", LRS, "--pruner", "none") for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=url)
    done = finished(study)
    assert sorted(t.params["lr"] for t in done) == LRS, outputs  # every point once: no duplicated trial
    assert [t.user_attrs["source"] for t in done] == ["trained"] * len(LRS)  # each run trained once
    others = [t for t in study.get_trials() if t not in done]
    assert all("surplus_of" in t.user_attrs for t in others), outputs  # only untrained stand-asides
    assert len(list(Path(os.environ["FGTUTOR_CACHE"]).glob("logreg/*.json.gz"))) == len(LRS)


def test_two_workers_share_an_sqlite_study_without_duplicating_a_trial(dirs):
    two_workers_complete_the_grid(sqlite(dirs))


def test_a_worker_killed_mid_trial_leaves_a_study_another_worker_completes(dirs):
    url, settings = sqlite(dirs), dict(BASE, method="forward", epochs=60, n_train=64, batch_size=64)
    lrs = [1e-3, 1e-2]
    victim = worker(url, "killed", lrs, "--pruner", "none", settings=settings)
    checkpoints = Path(os.environ["FGTUTOR_CACHE"]) / ".checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*.pt")):  # mid-trial: at least one epoch done, more to come
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[0]
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    study = optuna.load_study(study_name="killed", storage=url)
    [killed] = study.get_trials()
    assert killed.state == TrialState.RUNNING and not finished(study)  # killed mid-way: nothing stored
    assert not list(Path(os.environ["FGTUTOR_CACHE"]).glob("logreg/*.json.gz"))

    rescuer = worker(url, "killed", lrs, "--pruner", "none", settings=settings)
    output = rescuer.communicate(timeout=600)[0]
    assert rescuer.returncode == 0, output
    study = optuna.load_study(study_name="killed", storage=url)
    assert sorted(t.params["lr"] for t in finished(study)) == lrs, output
    assert study.trials[killed.number].state == TrialState.FAIL  # its worker died ...
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params  # ... and it was retried,
    assert retry.user_attrs.get("resumed")  # from the run's last finished epoch
    assert len(retry.intermediate_values) == settings["epochs"]


# -- PostgreSQL ---------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("pg_ctl")).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL cluster on a free port, in a temporary folder (as the user
    ``postgres`` when the tests run as root: the server refuses root)."""
    pytest.importorskip("psycopg2", reason="no PostgreSQL driver: pip install psycopg2-binary (requirements.txt)")
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql to run this test")
    as_user, owner = [], None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("the tests run as root and there is no user 'postgres' to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="fgtutor-pg-"))
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()

    def pg(*args):
        return subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=300)

    made = pg(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    started = made.returncode == 0 and pg(bindir / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "-t", "120",
                                          "-o", f"-p {port} -k {folder} -h 127.0.0.1", "start")
    if made.returncode != 0 or started.returncode != 0:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"PostgreSQL is installed but did not start:\n{made.stderr}\n{started and started.stderr}\n{log}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study_without_duplicating_a_trial(dirs, postgres_url):
    two_workers_complete_the_grid(postgres_url)
    assert sweep.run_worker(sweep.open_study(postgres_url, "shared"), log=None)["ran"] == 0  # rerun: complete


# -- search_inside: grids that grow past an edge ---------------------------------------------

def test_a_grid_whose_best_rate_is_at_an_edge_grows_past_it_until_the_best_is_inside(dirs):
    with sweep.scratch_storage() as storage:
        tables = sweep.search_inside({"tiny": BASE}, {"tiny": [1e-4, 1e-3]}, storage=storage, log=None)
    table = tables["tiny"]
    lrs = table["lr"].tolist()
    assert lrs[:2] == [1e-4, 1e-3] and len(lrs) > 2, "both rates are far too small: the grid must grow upwards"
    for lower, upper, grown in zip(lrs, lrs[1:], lrs[2:]):  # each new rate is one grid step past the old edge
        assert grown == pytest.approx(upper ** 2 / lower, rel=5e-3)
    best = table.loc[table["best"], "lr"].item()
    assert best == store.run_config(**dict(BASE, lr=best))["lr"] and lrs[0] < best < lrs[-1]
    assert not table.attrs["at_edge"] and table["best"].sum() == 1


def test_a_grid_stops_growing_at_max_rates_and_says_its_best_is_at_the_edge(dirs):
    with sweep.scratch_storage() as storage:
        table = sweep.search_inside({"tiny": BASE}, {"tiny": [1e-4, 1e-3]}, storage=storage, max_rates=2,
                                    log=None)["tiny"]
    assert table["lr"].tolist() == [1e-4, 1e-3] and table.attrs["at_edge"]
    assert table.loc[table["best"], "lr"].item() == 1e-3


@pytest.mark.parametrize("grids, message", [({"other": [1e-4, 1e-3]}, "differ"), ({"tiny": [1e-3]}, "at least two")])
def test_search_inside_refuses_grids_that_do_not_match_or_have_no_step(dirs, grids, message):
    with pytest.raises(ValueError, match=message):
        sweep.search_inside({"tiny": BASE}, grids, storage="sqlite://", log=None)


def test_step_past_edge_is_one_grid_step_beyond_the_edge_where_the_best_lies():
    assert sweep.step_past_edge([1e-4, 1e-3, 1e-2], 1e-4) == pytest.approx(1e-5)
    assert sweep.step_past_edge([1e-4, 1e-3, 1e-2], 1e-2) == pytest.approx(1e-1)
    assert sweep.step_past_edge([2e-4, 0.02, 0.063, 0.2], 0.2) == 0.635, "the ratio at that edge, 3 digits"
    assert sweep.step_past_edge([1e-4, 1e-3, 1e-2], 1e-3) is None
    assert sweep.step_past_edge([1e-4, 1e-3], None) == pytest.approx(1e-5), "all diverged: smaller"
    with pytest.raises(ValueError, match="at least two"):
        sweep.step_past_edge([1e-3], 1e-3)
