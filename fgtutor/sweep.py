"""Learning-rate searches as Optuna studies, shared between processes and machines.

A *study* searches one run configuration's learning rate (``base``: every setting of
``fgtutor.store.run_config`` but ``lr``). By default it is the book's grid search
(Optuna's ``GridSampler`` over a list of rates, e.g. ``BOOK_GRIDS``); ``sampler="tpe"``
with a trial budget searches the rates' range instead. Every trial is a run of the
results store (``fgtutor.store``): a stored run is read, not trained (its epochs are still
reported to the pruner, so a study over stored runs is instant and shows what pruning
would have done), and a trained run that finished is stored like any other, under the
store's lock, so that two workers never train one configuration twice.

The study lives in a database: an SQLite file by default (``runs/studies.db`` beside
``results/``: no server needed), or any SQLAlchemy URL, e.g. PostgreSQL, that several
machines share; ``scratch_storage()`` gives a throw-away SQLite file, for a study that
lives as long as one run of a chapter. ``python -m fgtutor.sweep --storage URL --study
NAME ...`` joins a study as one worker; start as many as you like, on as many machines,
and each runs trials until the grid is complete (or the budget spent). Rerunning
continues the study.

* Fault tolerance: a running trial sends a heartbeat every ``heartbeat`` seconds. A
  worker that dies (killed, machine lost) stops sending; after ``grace`` seconds another
  worker marks its trial failed and queues a retry of it (Optuna's
  ``RetryHeartbeatStaleTrialCallback``, at most ``max_retry`` times), which resumes from
  the run's last finished epoch (``fgtutor.store.checkpoint_path``). A worker with nothing
  left to start waits for the trials still running, so that it can take over a dead one.
* Pruning: a trial reports its validation loss after every epoch. A run whose training
  loss becomes non-finite stops at once (``History.diverged``; the run is a result and is
  stored), and its trial is marked PRUNED with the user attribute ``diverged``: so that
  the pruner, which compares a trial with the COMPLETE ones at the same epoch, never
  measures runs against the fast start of one that then blew up. A pruner (``"median"``:
  Optuna's ``MedianPruner``) stops runs clearly worse than the finished ones at the same
  epoch (PRUNED, ``pruned_epoch``; the unfinished run is not stored, its checkpoint is
  kept).

``study_table`` gives one row per trial, like ``fgtutor.analysis.search_table`` (for
``fgtutor.plots.plot_sweep`` and ``fgtutor.train.best_run``), and ``pruning_saving`` the
training time pruning saved against the full grid, and whether the choice changed.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import optuna
import pandas as pd
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from . import store
from .store import (MissingRunsError, config_data, describe, load, provenance, run_config, run_key, run_path,
                    save, store_roots, train_runs)
from .train import History, best_run, train_model
from .utils import check_choice, check_positive, check_type

#: the learning-rate chapter's grids (``book/lr_search.ipynb``): half-decade steps
BOOK_GRIDS = {"forward": np.logspace(-4, -2, 5).tolist(), "backprop": np.logspace(-2, 0, 5).tolist()}
#: the chapter's two search protocols: training images and epochs per run
PROTOCOLS = {"short search": {"n_train": 10_000, "epochs": 1},
             "original search": {"n_train": 50_000, "epochs": 10}}
#: the settings every search run of the chapter shares (the worker command's defaults)
SEARCH_DEFAULTS = {"model": "mlp", "method": "forward", "decay": 1e-4, "batch_size": 64, "n_val": 10_000,
                   "seed": 0, "eval_sets": ["val"], **PROTOCOLS["original search"]}
SAMPLERS = ("grid", "tpe")
PRUNERS = ("median", "none")
#: the "median" pruner: no pruning before 2 trials finished, nor in a trial's first epoch
#: (reports are epochs 1, 2, …; pruning starts at the report numbered n_warmup_steps)
MEDIAN = {"n_startup_trials": 2, "n_warmup_steps": 2}
HEARTBEAT = 30    # seconds between a running trial's heartbeats
GRACE = 120       # a trial without a heartbeat for this long is failed, and retried
MAX_RETRY = 3     # retries of one trial whose worker died


class StorageError(RuntimeError):
    """The study's database cannot be reached or used; the message names it and says what to check."""


class SurplusTrial(RuntimeError):
    """Two workers drew the same grid point at once; the later trial steps aside untrained."""


# ---------------------------------------------------------------------------
# Storage and study
# ---------------------------------------------------------------------------

def default_storage() -> str:
    """``sqlite:///…/runs/studies.db``: an SQLite file beside ``results/`` (and the private
    run cache ``runs/store``)."""
    return f"sqlite:///{store.default_root().parent / 'runs' / 'studies.db'}"


@contextlib.contextmanager
def scratch_storage() -> Iterator[str]:
    """The URL of an SQLite file in a new temporary folder, removed with it on exit: for
    studies that live as long as one run of a chapter, so that a rebuild never continues
    (nor depends on) an earlier study. A study over stored runs is rebuilt in seconds."""
    folder = Path(tempfile.mkdtemp(prefix="fgtutor-studies-"))
    try:
        yield f"sqlite:///{folder / 'studies.db'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def check_storage(url) -> str:
    """A usable database URL, or ``ValueError`` saying what is wrong: not a URL, an
    unknown database, a missing driver, an SQLite file in memory or in a folder that
    cannot be made. An SQLite file's folder is created. Nothing is connected to yet."""
    example = "e.g. sqlite:///runs/studies.db or postgresql://user:password@host:5432/database"
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"storage={url!r} is not allowed: use a database URL, {example}.")
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise ValueError(f"storage={url!r} is not a database URL: use dialect://…, {example}.") from exc
    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError as exc:
        raise ValueError(f"storage={shown(url)!r} names an unknown database {parsed.drivername!r}: "
                         f"use sqlite, postgresql or mysql, {example}.") from exc
    dialect = parsed.get_dialect()
    try:
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()
    except ImportError as exc:
        hint = " (pip install psycopg2-binary)" if parsed.get_backend_name() == "postgresql" else ""
        raise ValueError(f"storage={shown(url)!r} needs the Python driver of {parsed.drivername!r}, which is not "
                         f"installed ({exc}): install it{hint}.") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError(f"storage={url!r} is an SQLite database in memory, which no other worker can see and "
                             "which is lost at exit: give a file, e.g. sqlite:///runs/studies.db.")
        folder = Path(parsed.database).expanduser().resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"storage={url!r}: the folder {folder} for the SQLite file cannot be made ({exc}); "
                             "give a path in a writable folder.") from exc
    return url


def connect(url: Optional[str] = None, heartbeat: int = HEARTBEAT, grace: int = GRACE,
            max_retry: int = MAX_RETRY) -> RDBStorage:
    """Open (creating its tables when new) the database at ``url`` (default
    ``default_storage()``), with heartbeats and the retry of trials whose worker died.
    ``ValueError`` for a bad URL, ``StorageError`` naming the URL when it cannot be
    reached: both before any training."""
    url = check_storage(url if url is not None else default_storage())
    check_positive("heartbeat", heartbeat, integer=True)
    check_positive("grace", grace, integer=True)
    check_positive("max_retry", max_retry, allow_zero=True, integer=True)
    if grace <= heartbeat:
        raise ValueError(f"grace={grace} is not allowed: use more seconds than heartbeat={heartbeat}, "
                         "or a live trial is taken for a dead one.")
    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    connect_args = {"timeout": 60} if backend == "sqlite" else {"connect_timeout": 10}
    for attempt in range(5):
        try:
            with _quiet():
                return RDBStorage(url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=heartbeat,
                                  grace_period=grace,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry))
        except (sqlalchemy.exc.SQLAlchemyError, OSError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            racing = isinstance(exc, sqlalchemy.exc.IntegrityError) or any(
                word in str(exc) for word in ("already exists", "database is locked"))
            if attempt < 4 and racing:  # another worker is creating the tables at this moment
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StorageError(
                f"storage {shown(url)!r} cannot be opened: {first}. Check that the database server runs and that the "
                "URL's host, port, user, password and database name are right (the database must exist: e.g. "
                "`createdb NAME`); an SQLite file must be writable.") from exc


def study_name(base: dict, grid: Optional[Sequence[float]] = None, sampler: str = "grid",
               pruner: str = "median") -> str:
    """A readable name that changes with every setting of the search, e.g.
    ``lr-mlp-forward-50000x10-grid-median-3f2a9c1e``."""
    base = complete_base(base)
    key = run_key({"base": base, "grid": _grid(grid) if grid is not None else None,
                   "sampler": sampler, "pruner": pruner})[:8]
    return f"lr-{base['model']}-{base['method']}-{base['n_train']}x{base['epochs']}-{sampler}-{pruner}-{key}"


def complete_base(base: dict) -> dict:
    """Every setting of a search's runs but the learning rate, checked (``run_config``)."""
    if not isinstance(base, dict):
        raise ValueError(f"base={base!r} is not allowed: use a dict of run settings, e.g. "
                         "{'model': 'mlp', 'method': 'forward', 'epochs': 10}.")
    if "lr" in base:
        raise ValueError(f"base sets lr={base['lr']!r}: the search chooses the learning rate; leave it out.")
    config = run_config(**base)
    if "val" not in config["eval_sets"]:
        raise ValueError(f"eval_sets={config['eval_sets']!r} is not allowed for a search: it needs 'val', "
                         "the validation loss the trials report.")
    return {k: v for k, v in config.items() if k != "lr"}


def _grid(lrs) -> list[float]:
    if isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__iter__"):
        raise ValueError(f"grid={lrs!r} is not allowed: use a list of learning rates, e.g. [1e-4, 1e-3].")
    lrs = list(lrs)
    for lr in lrs:
        check_positive("grid entry", lr)
    if not lrs or len(set(lrs)) != len(lrs):
        raise ValueError(f"grid={lrs!r} is not allowed: use a non-empty list of distinct learning rates.")
    return [float(lr) for lr in lrs]


def _sampler(sampler, grid: list[float], seed: int) -> optuna.samplers.BaseSampler:
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    check_choice("sampler", sampler, SAMPLERS)
    # every worker must shuffle the grid alike: same seed
    return (optuna.samplers.GridSampler({"lr": grid}, seed=seed) if sampler == "grid"
            else optuna.samplers.TPESampler(seed=seed))


def _pruner(pruner) -> optuna.pruners.BasePruner:
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    check_choice("pruner", pruner, PRUNERS)
    return optuna.pruners.MedianPruner(**MEDIAN) if pruner == "median" else optuna.pruners.NopPruner()


def _kind(obj, names: Sequence[str]) -> str:
    return obj if isinstance(obj, str) and obj in names else type(obj).__name__


def open_study(storage: Union[str, RDBStorage, None], study: Optional[str] = None,
               grid: Optional[Sequence[float]] = None, base: Optional[dict] = None, *,
               sampler: Union[str, optuna.samplers.BaseSampler, None] = None,
               pruner: Union[str, optuna.pruners.BasePruner, None] = None, seed: int = 0,
               heartbeat: int = HEARTBEAT, grace: int = GRACE, max_retry: int = MAX_RETRY) -> optuna.Study:
    """Create the study ``study`` in ``storage`` (a URL, default ``default_storage()``, or
    a ``connect``-ed storage), or join it when it exists.

    A new study needs ``base`` (the runs' settings but ``lr``) and ``grid`` (the learning
    rates; for ``sampler="tpe"``, their smallest and largest bound the search); both are
    kept in the study, with the sampler (``"grid"``, ``"tpe"`` or an Optuna sampler; default
    grid) and the pruner (``"median"``, ``"none"`` or an Optuna pruner; default median), and
    a worker joining with other values gets a ``ValueError`` (a study holds one search).
    Joining, all of them may be left out (the study's are used), except a sampler or pruner
    object, which must be passed again. The study minimises the validation loss.
    ``study`` defaults to ``study_name(...)``.
    """
    rdb = storage if isinstance(storage, RDBStorage) else connect(storage, heartbeat, grace, max_retry)
    url = shown(rdb.url)
    given = {"base": complete_base(base) if base is not None else None,
             "grid": _grid(grid) if grid is not None else None,
             "sampler": _kind(sampler, SAMPLERS) if sampler is not None else None,
             "pruner": _kind(pruner, PRUNERS) if pruner is not None else None}
    if study is None:
        if base is None:
            raise ValueError("study=None: give the study's name, or base and grid to name it (study_name).")
        study = study_name(base, grid, given["sampler"] or "grid", given["pruner"] or "median")
    if not isinstance(study, str) or not study.strip():
        raise ValueError(f"study={study!r} is not allowed: use a name, e.g. 'lr-mlp-forward'.")
    kept = _study_attrs(rdb, study)
    if kept is None and (given["base"] is None or given["grid"] is None):
        names = optuna.study.get_all_study_names(rdb)
        holds = f"it holds: {', '.join(names)}" if names else "it holds none"
        raise ValueError(f"there is no study {study!r} in {url!r} ({holds}); to start it, give base "
                         "(the runs' settings) and grid (the learning rates).")
    if kept is not None:
        for name, value in given.items():
            if value is not None and kept.get(name) is not None and value != kept[name]:
                raise ValueError(f"study {study!r} in {url!r} searches with {name}={kept[name]!r}, not {value!r}: "
                                 f"join it with the same {name}, or start another study (--study NEW-NAME).")
        given = {**given, **{k: v for k, v in kept.items() if v is not None}}
    given["sampler"], given["pruner"] = given["sampler"] or "grid", given["pruner"] or "median"
    for name, names, obj in (("sampler", SAMPLERS, sampler), ("pruner", PRUNERS, pruner)):
        if obj is None and given[name] not in names:
            raise ValueError(f"study {study!r} in {url!r} searches with the {name} {given[name]}, an object: "
                             f"pass it again ({name}=...) to join the study.")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))  # no "A new study created" line
    try:
        with _quiet():
            created = optuna.create_study(storage=rdb, study_name=study, direction="minimize", load_if_exists=True,
                                          sampler=_sampler(sampler or given["sampler"], given["grid"], seed),
                                          pruner=_pruner(pruner or given["pruner"]))
    finally:
        optuna.logging.set_verbosity(verbosity)
    if created.direction != optuna.study.StudyDirection.MINIMIZE:
        raise ValueError(f"study {study!r} in {url!r} maximises: it is not an fgtutor learning-rate search; "
                         "use another name.")
    if kept is None:  # new (or made by another worker a moment ago: then it must agree)
        attrs = created.user_attrs
        for name, value in given.items():
            if name in attrs and attrs[name] != value:
                raise ValueError(f"study {study!r} in {url!r} was just started by another worker with "
                                 f"{name}={attrs[name]!r}, not {value!r}: use the same settings, or another name.")
            created.set_user_attr(name, value)
    return created


def _study_attrs(rdb: RDBStorage, name: str) -> Optional[dict]:
    """The search a stored study holds (base, grid, sampler, pruner), or None if there is no such study."""
    try:
        study_id = rdb.get_study_id_from_name(name)
    except KeyError:
        return None
    attrs = rdb.get_study_user_attrs(study_id)
    return {k: attrs.get(k) for k in ("base", "grid", "sampler", "pruner")}


@contextlib.contextmanager
def _quiet():
    """Optuna's heartbeat and retry are marked experimental; the warning says nothing to a reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


# ---------------------------------------------------------------------------
# One trial: one run of the store
# ---------------------------------------------------------------------------

def objective(base: dict, grid: Sequence[float], *, root: Union[str, Path, None] = None, device: str = "auto",
              progress: bool = False) -> Callable[[optuna.Trial], float]:
    """The function a study optimises: a trial draws ``lr`` (the grid's point, or for TPE
    a log-uniform rate between the grid's smallest and largest), and its run
    ``run_config(**base, lr=lr)`` is read from the store or trained and stored.

    It reports the validation loss after every epoch and returns the final one; it raises
    ``optuna.TrialPruned`` when the pruner stops the run, and when the run diverged
    (user attribute ``diverged``: a diverged run is kept out of the pruner's medians). User attributes record
    what ``study_table`` and ``pruning_saving`` need: ``source`` ("stored" or "trained"),
    ``train_seconds`` (spent, up to the stop), ``full_train_seconds`` (of the whole run:
    exact for a stored run, extrapolated from the epochs done for a pruned trained one,
    then ``full_estimated``), ``pruned_epoch``, ``val_accuracy`` and ``full_val_loss``
    (the whole run's final validation loss, when known).
    """
    base, grid = complete_base(base), _grid(grid)
    low, high = min(grid), max(grid)

    def run_trial(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", low, high, log=True)
        config = run_config(**base, lr=lr)
        trial.set_user_attr("run_key", run_key(config))
        _check_not_surplus(trial)
        reads, write = store_roots(root)
        for folder in reads:
            history = load(config, folder)
            if history is not None:
                return _replay(trial, config, history)
        if write is None:
            raise MissingRunsError(f"the run {describe(config)} is not stored in {reads[0]}, and this build does not "
                                   "train (FGTUTOR_STORE=readonly): run `make results`, or the search with training.")
        with store.locked(run_path(config, write)):  # one worker trains a configuration, the others wait
            history = load(config, write)
            if history is not None:
                return _replay(trial, config, history)
            return _train(trial, config, write, device, progress)

    return run_trial


def _reporter(trial: optuna.Trial, config: dict) -> Callable[[dict], bool]:
    """``fit``'s ``on_epoch``: report the validation loss; True (stop) when it is not
    finite or when the pruner says so before the last epoch."""
    def on_epoch(row: dict) -> bool:
        if row["epoch"] == 0:
            return False
        value = row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf
        trial.report(value, row["epoch"])
        if not math.isfinite(value):
            return True
        return row["epoch"] < config["epochs"] and trial.should_prune()
    return on_epoch


def _replay(trial: optuna.Trial, config: dict, history: History) -> float:
    """A stored run, reported epoch by epoch as if it were training now."""
    on_epoch, stop = _reporter(trial, config), None
    for row in history.epochs:
        if on_epoch(row) and row["epoch"] < config["epochs"]:
            stop = row["epoch"]
            break
    full = history.epochs[-1]
    trial.set_user_attr("full_train_seconds", full["train_seconds"])
    trial.set_user_attr("full_val_loss", None if history.diverged or not math.isfinite(full["val_loss"])
                        else full["val_loss"])
    return _outcome(trial, config, history, stop, "stored")


def _train(trial: optuna.Trial, config: dict, root: Path, device: str, progress: bool) -> float:
    """Train the run (resuming from its checkpoint), reporting every epoch; store it when it finishes."""
    checkpoint = store.checkpoint_path(config, root)
    if checkpoint.exists():
        trial.set_user_attr("resumed", True)
    start = time.perf_counter()
    train, sets = config_data(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divergence is a result: it is in the History
        _, history = train_model(store.model_constructor(config), config["method"], train, sets, device=device,
                                 progress=progress, meta={"model_name": config["model"]}, checkpoint=checkpoint,
                                 on_epoch=_reporter(trial, config), **store.fit_kwargs(config))
    stop = history.meta.get("stopped_after_epoch")
    if stop is None:
        save(config, history, provenance(time.perf_counter() - start, history.meta["device"]), root)
        trial.set_user_attr("full_train_seconds", history.epochs[-1]["train_seconds"])
        trial.set_user_attr("full_val_loss", None if history.diverged else history.epochs[-1]["val_loss"])
    return _outcome(trial, config, history, stop, "trained")


def _outcome(trial: optuna.Trial, config: dict, history: History, stop: Optional[int], source: str) -> float:
    """Record what the trial spent and found; return its value or raise TrialPruned."""
    row = next(r for r in history.epochs if r["epoch"] == stop) if stop is not None else history.epochs[-1]
    diverged = history.diverged or not math.isfinite(row["val_loss"])
    trial.set_user_attr("source", source)
    trial.set_user_attr("train_seconds", row["train_seconds"])
    trial.set_user_attr("diverged", diverged)
    trial.set_user_attr("val_accuracy", row["val_accuracy"])
    trial.set_user_attr("epochs_done", row["epoch"])
    if stop is not None and not diverged:
        trial.set_user_attr("pruned_epoch", stop)
        if "full_train_seconds" not in trial.user_attrs:
            trial.set_user_attr("full_train_seconds", row["train_seconds"] * config["epochs"] / max(stop, 1))
            trial.set_user_attr("full_estimated", True)
        raise optuna.TrialPruned(f"pruned after epoch {stop} of {config['epochs']}: "
                                 f"validation loss {row['val_loss']:.4g}")
    if diverged:
        trial.set_user_attr("full_train_seconds", trial.user_attrs.get("full_train_seconds", row["train_seconds"]))
        raise optuna.TrialPruned(f"diverged after epoch {row['epoch']}: {history.message or 'validation loss not finite'}")
    return float(row["val_loss"])


def _check_not_surplus(trial: optuna.Trial) -> None:
    """Raise ``SurplusTrial`` when another trial holds this grid point: two workers that ask
    for a trial at the same moment when one point is left both get it (Optuna's
    GridSampler then hands out a point already running). The later trial steps aside,
    untrained, and is marked failed with ``surplus_of``."""
    trials = trial.study.get_trials(deepcopy=False)
    grid_id = next(t for t in trials if t.number == trial.number).system_attrs.get("grid_id")
    if grid_id is None:
        return
    for other in trials:
        if other.number == trial.number or other.system_attrs.get("grid_id") != grid_id:
            continue
        if other.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING) or (
                other.state == TrialState.RUNNING and other.number < trial.number):
            trial.set_user_attr("surplus_of", other.number)
            raise SurplusTrial(f"trial {trial.number} drew the grid point of trial {other.number}, "
                               "which another worker runs: it steps aside, untrained.")


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------

def grid_progress(study: optuna.Study) -> dict[str, int]:
    """How far the study is: ``done`` (complete or pruned), ``failed`` (for good),
    ``running``, ``waiting`` (retries queued) and, for a grid, ``open`` points no trial has
    taken yet. Failed trials that were retried, and surplus ones, are not counted."""
    check_type("study", study, optuna.Study, "an optuna.Study, e.g. from open_study(...) or search_study(...)")
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    live = [t for t in trials if t.number not in retried and "surplus_of" not in t.user_attrs]
    counts = {name: sum(t.state == state for t in live) for name, state in
              [("running", TrialState.RUNNING), ("waiting", TrialState.WAITING), ("failed", TrialState.FAIL)]}
    counts["done"] = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in live)
    grid = study.user_attrs.get("grid") if isinstance(study.sampler, optuna.samplers.GridSampler) else None
    counts["open"] = max(0, len(grid) - len(live)) if grid is not None else 0
    return counts


def run_worker(study: optuna.Study, *, n_trials: Optional[int] = None, root: Union[str, Path, None] = None,
               device: str = "auto", progress: bool = False, poll: Optional[float] = None,
               log: Optional[Callable[[str], None]] = print) -> dict[str, int]:
    """Work on ``study`` as one worker until it is complete: run queued retries and open
    grid points (a TPE study: until ``n_trials`` trials, the budget of all workers
    together), then wait while other workers' trials run, taking over any whose worker
    dies. Returns ``grid_progress`` at the end plus ``ran``, the trials this worker ran.
    ``log`` gets a line per trial (None: quiet)."""
    base, grid = study.user_attrs["base"], study.user_attrs["grid"]
    is_grid = isinstance(study.sampler, optuna.samplers.GridSampler)
    if n_trials is None and not is_grid:
        raise ValueError("n_trials=None is not allowed for a search that is not a grid: give the trial budget, "
                         "e.g. --n-trials 20.")
    if n_trials is not None:
        check_positive("n_trials", n_trials, integer=True)
    budget = min(n_trials or len(grid), len(grid)) if is_grid else n_trials
    _check_stored(base, grid, root, is_grid)
    rdb = getattr(study._storage, "_backend", study._storage)
    poll = poll if poll is not None else float(getattr(rdb, "heartbeat_interval", None) or HEARTBEAT)
    run, current = objective(base, grid, root=root, device=device, progress=progress), []

    def tracked(trial: optuna.Trial) -> float:
        current[:] = [trial.number]
        return run(trial)

    say = log or (lambda line: None)
    ran, waited = 0, False
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a line per trial comes from log
    try:
        while True:
            with _quiet():
                optuna.storages.fail_stale_trials(study)
            p = grid_progress(study)
            taken = p["done"] + p["failed"] + p["running"] + p["waiting"]
            if p["waiting"] or (taken < budget and (p["open"] or not is_grid)):
                current.clear()
                try:
                    with _quiet():
                        study.optimize(tracked, n_trials=1, catch=(SurplusTrial,), callbacks=[_line(say)])
                except BaseException:  # Ctrl-C, or an error: the trial is failed; queue its retry
                    _requeue(study, current)
                    raise
                ran, waited = ran + 1, False
            elif p["running"]:
                if not waited:
                    say(f"waiting for {p['running']} trial(s) of other workers (a dead worker's trial is retried "
                        f"after {getattr(rdb, 'grace_period', None) or GRACE:.0f} s without a heartbeat)")
                waited = True
                time.sleep(poll)
            else:
                break
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {**grid_progress(study), "ran": ran}


def _requeue(study: optuna.Study, current: list[int]) -> None:
    """Queue a retry of the trial this worker was running when it stopped (Optuna marks it
    failed), as for a worker that died, so that rerunning the study finishes its grid."""
    trial = next((t for t in study.get_trials(deepcopy=False) if current and t.number == current[0]), None)
    retry = getattr(study._storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    if trial is not None and trial.state == TrialState.FAIL and "surplus_of" not in trial.user_attrs and retry:
        with _quiet():
            retry(study, trial)


def _check_stored(base: dict, grid: list[float], root, is_grid: bool) -> None:
    """Under ``FGTUTOR_STORE=readonly``, every run of a grid must be stored: say which are not, before any trial."""
    reads, write = store_roots(root)
    if write is not None or not is_grid:
        return
    missing = [run_config(**base, lr=lr) for lr in grid]
    missing = [c for c in missing if not any(run_path(c, r).exists() for r in reads)]
    if missing:
        listing = "\n".join(f"  - {describe(c)}" for c in missing)
        raise MissingRunsError(f"{len(missing)} of the search's {len(grid)} runs are not stored in {reads[0]}, and "
                               f"this build does not train (FGTUTOR_STORE=readonly):\n{listing}\n"
                               "Run `make results` to train and store them, then build again.")


def describe_search(study: optuna.Study) -> str:
    """E.g. ``mlp forward decay=1e-04, 10 epochs on 50000, seed 0: grid over lr 0.0001, …, 0.01 (pruner median)``."""
    check_type("study", study, optuna.Study, "an optuna.Study, e.g. from open_study(...) or search_study(...)")
    a = study.user_attrs
    b = a["base"]
    lrs = ", ".join(f"{lr:.3g}" for lr in a["grid"])
    how = (f"grid over lr {lrs}" if a.get("sampler") == "grid"
           else f"{a.get('sampler')} for lr in [{min(a['grid']):.3g}, {max(a['grid']):.3g}]")
    return (f"{b['model']} {b['method']} decay={b['decay']:.3g}, {b['epochs']} epochs on {b['n_train']}, "
            f"seed {b['seed']}: {how} (pruner {a.get('pruner')})")


def _line(say: Callable[[str], None]) -> Callable[[optuna.Study, FrozenTrial], None]:
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        say(trial_line(trial))
    return callback


def trial_line(trial: FrozenTrial) -> str:
    """One line about a finished trial, e.g. ``trial 3: lr 1.00e-03 → val_loss 0.3121 (trained, 41 s)``."""
    a, lr = trial.user_attrs, trial.params.get("lr", math.nan)
    head = f"trial {trial.number}: lr {lr:.3g}"
    if "surplus_of" in a:
        return f"{head} → stepped aside (trial {a['surplus_of']} runs this grid point)"
    if trial.state == TrialState.FAIL:
        return f"{head} → failed"
    spent = f"{a.get('source', '?')}, {a.get('train_seconds', math.nan):.0f} s of training"
    if a.get("diverged"):
        return f"{head} → diverged ({spent})"
    if trial.state == TrialState.PRUNED:
        return f"{head} → pruned after epoch {a.get('pruned_epoch')} ({spent})"
    return f"{head} → val_loss {trial.value:.4f}, val_accuracy {a.get('val_accuracy', math.nan):.4f} ({spent})"


def search_study(base: dict, grid: Sequence[float], *, storage: Optional[str] = None, study: Optional[str] = None,
                 sampler: Union[str, optuna.samplers.BaseSampler, None] = None,
                 pruner: Union[str, optuna.pruners.BasePruner, None] = None, n_trials: Optional[int] = None,
                 seed: int = 0, root: Union[str, Path, None] = None, device: str = "auto",
                 log: Optional[Callable[[str], None]] = print) -> optuna.Study:
    """Open the study (``open_study``) and work on it until complete (``run_worker``), in
    this process; returns the study. Runs that are stored are read, so a search over
    stored runs takes seconds, and rerunning it continues it."""
    s = open_study(storage, study, grid, base, sampler=sampler, pruner=pruner, seed=seed)
    run_worker(s, n_trials=n_trials, root=root, device=device, log=log)
    return s


def step_past_edge(grid: Sequence[float], best: Optional[float]) -> Optional[float]:
    """The next value beyond the edge of ``grid`` (sorted, at least two values) where
    ``best`` lies, one grid step further (the ratio of the two values at that edge, to 3
    significant digits); None when ``best`` lies inside. ``best=None`` (every run
    diverged) steps below the grid. For growing any geometric grid: learning rates, or a
    finite-difference step."""
    grid = sorted(grid)
    if len(grid) < 2:
        raise ValueError(f"grid={list(grid)} is not allowed: give at least two values, so the grid has a step.")
    if best is None or best == grid[0]:
        return float(f"{grid[0] ** 2 / grid[1]:.3g}")
    if best == grid[-1]:
        return float(f"{grid[-1] ** 2 / grid[-2]:.3g}")
    return None


def search_inside(bases: dict[str, dict], grids: dict[str, Sequence[float]], *, storage: str,
                  retrain: bool = False, device: str = "auto", max_rates: int = 8,
                  log: Optional[Callable[[str], None]] = print) -> dict[str, pd.DataFrame]:
    """Search the learning rate of every base (``name → settings but lr``) with the book's
    grid study (``search_study`` over runs that ``store.train_runs`` trains first, every
    base's runs in one batch so that they train in parallel), and grow a grid whose best
    rate lies at its edge: the grid gains the next rate beyond that edge, one grid step
    further (the ratio of the two rates at that edge), and is searched again, until every best
    rate (lowest final validation loss; ``fgtutor.train.best_run``) lies inside its grid,
    or the grid holds ``max_rates`` rates. A grid whose runs all diverged grows downwards.

    Returns each base's ``study_table`` with the column ``best`` (the chosen row) and the
    attribute ``attrs["at_edge"]`` (True only when ``max_rates`` stopped the growth)."""
    check_type("bases", bases, dict, "a dict: name → run settings without lr")
    check_positive("max_rates", max_rates, integer=True)
    if set(bases) != set(grids):
        raise ValueError(f"bases names {sorted(bases)} and grids names {sorted(grids)} differ: give one grid per base.")
    grids = {name: sorted(_grid(grid)) for name, grid in grids.items()}
    for name, grid in grids.items():
        if len(grid) < 2:
            raise ValueError(f"grids[{name!r}]={grid} is not allowed: give at least two rates, so the grid has a step.")
    tables: dict[str, pd.DataFrame] = {}
    pending = list(bases)
    while pending:
        configs = [dict(bases[n], lr=lr) for n in pending for lr in grids[n]]
        train_runs(configs, retrain=retrain, device=device)
        retrain = False  # a grown grid retrains only its new rate
        grown = []
        for name in pending:
            grid = grids[name]
            table = study_table(search_study(bases[name], grid, storage=storage, log=None))
            table["best"] = False
            best = None
            if (~table["diverged"] & table["val_loss"].notna()).any():
                best = float(best_run(table)["lr"])
                table.loc[table["lr"] == best, "best"] = True
            new = step_past_edge(grid, best)
            table.attrs["at_edge"] = new is not None
            tables[name] = table
            if new is None or len(grid) >= max_rates:
                continue
            grids[name] = sorted([*grid, new])
            grown.append(name)
            if log:
                log(f"{name}: the best rate is at the {'lower' if new < grid[0] else 'upper'} edge of "
                    f"{[float(f'{r:.3g}') for r in grid]}; adding {new:.3g}")
        pending = grown
    return tables


# ---------------------------------------------------------------------------
# Reading a study
# ---------------------------------------------------------------------------

def study_table(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial (complete or pruned; one per learning rate, the first),
    sorted by ``lr``: ``method``, ``lr``, ``decay``, the final ``val_loss`` and
    ``val_accuracy`` (NaN when the run diverged or was pruned, as
    ``fgtutor.analysis.search_table`` has them for diverged runs), ``diverged``,
    ``pruned``, ``pruned_epoch``, ``train_seconds`` (spent), ``full_train_seconds``,
    ``full_val_loss``, ``source`` and ``trial``."""
    check_type("study", study, optuna.Study, "an optuna.Study, e.g. from open_study(...) or search_study(...)")
    base = study.user_attrs.get("base") or {}
    rows, seen = [], set()
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                    key=lambda t: t.number):
        lr, a = t.params.get("lr"), t.user_attrs
        if lr is None or lr in seen:
            continue
        seen.add(lr)
        pruned = t.state == TrialState.PRUNED and not a.get("diverged", False)
        final = t.state == TrialState.COMPLETE and not a.get("diverged", False)
        rows.append({"method": base.get("method"), "lr": lr, "decay": base.get("decay"),
                     "val_loss": t.value if final else np.nan,
                     "val_accuracy": a.get("val_accuracy", np.nan) if final else np.nan,
                     "diverged": bool(a.get("diverged", False)), "pruned": pruned,
                     "pruned_epoch": a.get("pruned_epoch") if pruned else None,
                     "train_seconds": a.get("train_seconds", np.nan),
                     "full_train_seconds": a.get("full_train_seconds", np.nan),
                     "full_val_loss": a.get("full_val_loss", np.nan) if a.get("full_val_loss") is not None else np.nan,
                     "source": a.get("source"), "trial": t.number})
    columns = ["method", "lr", "decay", "val_loss", "val_accuracy", "diverged", "pruned", "pruned_epoch",
               "train_seconds", "full_train_seconds", "full_val_loss", "source", "trial"]
    return pd.DataFrame(rows, columns=columns).sort_values("lr", ignore_index=True)


def pruning_saving(study: optuna.Study) -> dict[str, Any]:
    """What pruning saved against training the full grid, from ``study_table``:

    * ``spent_seconds``: training seconds the trials spent (up to where each stopped),
      ``full_seconds``: what training every run to its end takes, ``saved_seconds`` and
      ``saved_fraction`` of it; ``estimated`` is True when some full times are
      extrapolated (a pruned run that was trained, not read: its full time is unknown);
    * ``trials``, ``pruned`` and ``diverged`` counts;
    * ``best_lr``: the learning rate the study picks (lowest final validation loss among
      runs that finished; ``fgtutor.train.best_run``), ``best_lr_full``: the one the full
      grid picks (None when a pruned run's final loss is unknown), and ``changed``
      (None when unknown).

    Seconds are the runs' own recorded training seconds (for stored runs, those of the
    machine that trained them), not the wall-clock time of this search."""
    check_type("study", study, optuna.Study, "an optuna.Study, e.g. from open_study(...) or search_study(...)")
    table = study_table(study)
    if table.empty:
        raise ValueError(f"study {study.study_name!r} has no finished trial yet: run a worker on it first.")
    spent, full = float(table["train_seconds"].sum()), float(table["full_train_seconds"].sum())
    estimated = any(t.user_attrs.get("full_estimated") for t in study.get_trials(deepcopy=False)
                    if t.number in set(table["trial"]))
    try:
        best = float(best_run(table)["lr"])
    except ValueError:
        best = None
    known = table["full_val_loss"].notna() | table["diverged"]
    best_full = None
    if known.all() and table["full_val_loss"].notna().any():
        best_full = float(table.loc[table["full_val_loss"].idxmin(), "lr"])
    return {"trials": len(table), "pruned": int(table["pruned"].sum()), "diverged": int(table["diverged"].sum()),
            "spent_seconds": spent, "full_seconds": full, "saved_seconds": full - spent,
            "saved_fraction": (full - spent) / full if full > 0 else 0.0, "estimated": bool(estimated),
            "best_lr": best, "best_lr_full": best_full,
            "changed": None if best_full is None or best is None else best != best_full}


# ---------------------------------------------------------------------------
# python -m fgtutor.sweep: one worker
# ---------------------------------------------------------------------------

SETTINGS = {"model": str, "method": str, "epochs": int, "n_train": int, "n_val": int, "batch_size": int,
            "decay": float, "seed": int}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgtutor.sweep", description=(
        "Join a learning-rate search (an Optuna study in a shared database) as one worker, and run trials until "
        "the grid is complete. Start as many workers as you like, on as many machines; rerunning continues the "
        "study. Settings left out are the study's (when it exists) or the learning-rate chapter's."))
    parser.add_argument("--storage", help="database URL (default: the SQLite file runs/studies.db); "
                                          "e.g. postgresql://user:password@host/db to share it between machines")
    parser.add_argument("--study", help="the study's name (default: one made from the settings)")
    for name, kind in SETTINGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                            help=f"run setting (default {SEARCH_DEFAULTS.get(name, store.DEFAULTS[name])})")
    parser.add_argument("--lrs", type=float, nargs="+", help="the learning rates (default: the chapter's grid "
                                                            "for the method)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="grid (default): every learning rate; tpe: Optuna's TPE within their range "
                             "(needs --n-trials)")
    parser.add_argument("--n-trials", type=int, help="the study's trial budget, all workers together")
    parser.add_argument("--pruner", choices=PRUNERS,
                        help="median (default): stop clearly hopeless runs early; none: train every run to its end")
    parser.add_argument("--seed-sampler", type=int, default=0, help="the sampler's seed (the same on every worker)")
    parser.add_argument("--heartbeat", type=int, default=HEARTBEAT,
                        help=f"seconds between a trial's heartbeats (default {HEARTBEAT})")
    parser.add_argument("--grace", type=int, default=GRACE,
                        help=f"seconds without a heartbeat after which a trial is retried (default {GRACE})")
    parser.add_argument("--device", default="auto", help="where runs train (auto, cpu, cuda, mps)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per run")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        rdb = connect(args.storage, args.heartbeat, args.grace)
        given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
        kept = _study_attrs(rdb, args.study) if args.study else None
        base = {**SEARCH_DEFAULTS, **given} if not kept or not kept.get("base") else {**kept["base"], **given}
        grid = args.lrs or (kept or {}).get("grid") or BOOK_GRIDS.get(base["method"])
        study = open_study(rdb, args.study, grid, base, sampler=args.sampler, pruner=args.pruner,
                           seed=args.seed_sampler)
        shown_url = shown(rdb.url)
        print(f"study {study.study_name!r} in {shown_url}: {describe_search(study)}")
        ended = run_worker(study, n_trials=args.n_trials, device=args.device, progress=args.progress,
                           poll=min(args.heartbeat, 5))
    except (ValueError, StorageError, MissingRunsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"this worker ran {ended['ran']} trial(s); the study has {ended['done']} finished, {ended['failed']} failed.")
    if ended["done"]:
        table = study_table(study)
        print(table[["lr", "val_loss", "val_accuracy", "diverged", "pruned", "train_seconds"]].to_string(index=False))
        s = pruning_saving(study)
        print(f"pruning: {s['pruned']} of {s['trials']} runs stopped early; {s['spent_seconds']:.0f} s of training "
              f"against {s['full_seconds']:.0f} s for the full grid ({100 * s['saved_fraction']:.0f}% saved"
              f"{', partly estimated' if s['estimated'] else ''}); best lr {s['best_lr']}")
    return 1 if ended["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
