"""The results store: a run's configuration -> one compressed JSON file in ``results/``.

A chapter asks for its runs with ``train_runs(configs)``: a run whose exact configuration
is stored is loaded, a missing one is trained (in ``jobs`` parallel processes) and stored.
A stored run holds everything needed to read and to reproduce it:

* ``config``: every setting that makes the run (``run_config`` fills in the defaults), so
  that the file name, a hash of it, changes whenever any setting does;
* ``history``: the ``History``, with per-step losses averaged over blocks of ``step_every``
  steps (the plots need no more) and the epoch rows untouched;
* ``first_steps``: the first ``REPLAY_STEPS`` step losses exactly, and ``fingerprint``:
  the first steps retraced in float64, which ``fgtutor.replay`` recomputes with today's
  code to prove the run can still be produced (exactly on the same machine, to ~1e-13 on
  any other);
* ``provenance``: fgtutor version, git commit (and whether the tree was dirty), date,
  machine, the CPU and kernels that decide float32 rounding (``fgtutor.replay.kernels``),
  torch version, threads and wall-clock seconds.

Where runs are read and written depends on ``FGTUTOR_STORE``:

* unset (a reader running a chapter): runs are read from ``results/`` and from a private
  cache (``runs/store``, or ``$FGTUTOR_CACHE``); missing ones train into the cache, so a
  reader's own settings never land in the book's committed store;
* ``results`` (``make results``): read from and written to ``results/``;
* ``readonly`` (``make book``, CI): read from ``results/``; a missing run is an error that
  says to run ``make results``, never hours of training.

``FGTUTOR_RESULTS`` moves ``results/`` (tests use a temporary one); ``FGTUTOR_JOBS`` sets
the number of parallel training processes.

``python -m fgtutor.store`` (``make results``) executes the chapters with training allowed,
so that every run they ask for is stored, and says what it loaded and what it trained.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

from . import __version__
from .data import INPUTS, load_fashion_mnist, load_mnist, prepare_inputs, train_val_split
from .forward import SAMPLERS
from .models import MODELS, train_only_last_layer
from .optim import check_schedule
from .train import ALL_METHODS, EPS, OPTIMIZERS, PERTURB, History, train_model
from .zeroth import SAMPLERS as ZEROTH_SAMPLERS, check_eps
from .utils import atomic_write, check_choice, check_positive, check_type, default_dtype, kept_rng

PACKAGE_DIR = Path(__file__).resolve().parent
REPLAY_STEPS = 100     # step losses kept exactly, for the replay check
MAX_CURVE_POINTS = 4000  # per-step losses are averaged in blocks down to about this many
FORMAT = 1

#: every setting of a stored run, with its default. ``sampler``, ``num_tangents`` and
#: ``clip`` concern the estimators only and are ``None`` in a backprop run's config; a
#: zeroth-order run takes ``sampler`` and ``num_tangents`` (its directions) and no ``clip``.
DEFAULTS = {
    "model": "mlp", "model_kwargs": {}, "method": "forward",
    "lr": 2e-4, "decay": 1e-4, "schedule_every": "step", "momentum": 0.0,
    "epochs": 1, "batch_size": 64, "seed": 0,
    "n_train": 50_000, "n_val": 10_000, "split_seed": 0, "eval_sets": ["val", "test"],
    "sampler": "rademacher", "num_tangents": 1, "clip": None,
}
#: settings added after the first stored runs. A configuration holds them only when they
#: differ from these defaults, so that the runs stored before them keep their keys.
#: ``eps`` is the finite-difference step of ``method="zeroth"``: a setting of no other method.
#: Fine-tuning: ``dataset`` is what the run trains and is evaluated on, ``pretrain`` the
#: configuration of a run whose final weights it starts from (trained again, in float64,
#: by ``pretrained_state``), and ``trainable`` the weights it trains: all, or the last layer.
LATER_DEFAULTS = {"optimizer": "sgd", "perturb": "weights", "inputs": "raw", "lr_schedule": "exp", "eps": EPS,
                  "dataset": "mnist", "pretrain": None, "trainable": "all"}
#: settings of the data, not of training: ``config_data`` applies them, ``fit_kwargs`` leaves them out
DATA_SETTINGS = ("inputs", "dataset")
#: settings of the initial model: ``model_constructor`` applies them, ``fit_kwargs`` leaves them out
MODEL_SETTINGS = ("pretrain", "trainable")
DATASETS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist}
TRAINABLE = ("all", "last")
EVAL_SETS = ("val", "test")
FORWARD_ONLY = ("sampler", "num_tangents", "clip")
#: the methods that estimate the gradient from random directions, and so take FORWARD_ONLY
ESTIMATORS = ("forward", "zeroth")


class MissingRunsError(RuntimeError):
    """Runs a chapter needs are not stored, and this build may not train them."""


class CorruptRunError(RuntimeError):
    """A stored run cannot be read; the message names the file."""


# ---------------------------------------------------------------------------
# Configurations and where they live
# ---------------------------------------------------------------------------

def run_config(**settings) -> dict:
    """A complete, checked run configuration: ``DEFAULTS`` updated with ``settings``.

    Unknown names and bad values raise ``ValueError`` naming the setting, so that a typo
    never becomes a silently different (and separately stored) run.
    """
    unknown = sorted(set(settings) - set(DEFAULTS) - set(LATER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run setting(s) {', '.join(map(repr, unknown))}; "
                         f"the settings are: {', '.join([*DEFAULTS, *LATER_DEFAULTS])}.")
    c = {**DEFAULTS, **LATER_DEFAULTS, **settings}
    check_choice("model", c["model"], tuple(MODELS))
    check_choice("method", c["method"], ALL_METHODS)
    check_choice("schedule_every", c["schedule_every"], ("step", "epoch"))
    check_choice("optimizer", c["optimizer"], OPTIMIZERS)
    check_choice("perturb", c["perturb"], PERTURB)
    check_choice("inputs", c["inputs"], INPUTS)
    check_choice("dataset", c["dataset"], tuple(DATASETS))
    check_choice("trainable", c["trainable"], TRAINABLE)
    c["pretrain"] = _check_pretrain(c["pretrain"], c["model"], c["model_kwargs"])
    check_schedule(c["lr_schedule"], c["decay"])
    if c["optimizer"] == "adam" and c["momentum"]:
        raise ValueError(f"momentum={c['momentum']} is an SGD setting: use momentum=0 with optimizer='adam'.")
    for name in ("lr",):
        check_positive(name, c[name])
    for name in ("decay", "momentum"):
        check_positive(name, c[name], allow_zero=True)
    for name in ("epochs", "batch_size", "n_train", "n_val"):
        check_positive(name, c[name], integer=True)
    for name in ("seed", "split_seed"):
        check_positive(name, c[name], allow_zero=True, integer=True)
    if c["n_train"] + c["n_val"] > 60_000:
        raise ValueError(f"n_train={c['n_train']} and n_val={c['n_val']} add up to more than the "
                         f"60,000 training images of {c['dataset']}.")
    if not isinstance(c["model_kwargs"], dict):
        raise ValueError(f"model_kwargs={c['model_kwargs']!r} is not allowed: use a dict, e.g. {{'padding': 1}}.")
    takes = inspect.signature(MODELS[c["model"]]).parameters
    if set(c["model_kwargs"]) - set(takes):
        raise ValueError(f"model_kwargs={c['model_kwargs']!r} is not allowed: model {c['model']!r} takes "
                         f"{', '.join(map(repr, takes)) or 'no settings'}.")
    c["eval_sets"] = list(c["eval_sets"])
    for name in c["eval_sets"]:
        check_choice("eval_sets entry", name, EVAL_SETS)
    for name in ("lr", "decay", "momentum"):
        c[name] = float(c[name])
    if c["method"] == "forward":
        check_choice("sampler", c["sampler"], SAMPLERS)
        check_positive("num_tangents", c["num_tangents"], integer=True)
        if c["clip"] is not None:
            check_positive("clip", c["clip"])
            c["clip"] = float(c["clip"])
        if c["perturb"] == "activities" and (c["num_tangents"] != 1 or c["clip"] is not None or c["sampler"] == "rank1"):
            raise ValueError("perturb='activities' takes one tangent, no clip and a 'rademacher' or 'gaussian' "
                             "sampler; num_tangents, clip and 'rank1' belong to perturb='weights'.")
    elif c["method"] == "zeroth":
        check_choice("sampler", c["sampler"], ZEROTH_SAMPLERS)
        check_positive("num_tangents", c["num_tangents"], integer=True)
        if c["clip"] is not None or c["perturb"] != "weights":
            raise ValueError(f"method='zeroth' perturbs the weights and clips nothing (got perturb={c['perturb']!r}, "
                             f"clip={c['clip']}); perturb='activities' and clip belong to method='forward'.")
        c["eps"] = check_eps(c["eps"])
    else:
        c.update(dict.fromkeys(FORWARD_ONLY))
        c["perturb"] = LATER_DEFAULTS["perturb"]
    if c["method"] != "zeroth":  # not a setting of theirs: it never splits their runs
        c["eps"] = LATER_DEFAULTS["eps"]
    for name, default in LATER_DEFAULTS.items():
        if c[name] == default:
            del c[name]
    return c


def _check_pretrain(pretrain, model: str, model_kwargs) -> Optional[dict]:
    """``pretrain`` as a complete run configuration of the same network (or None)."""
    if pretrain is None:
        return None
    check_type("pretrain", pretrain, dict, "the settings of the run to start from, e.g. "
               "{'model': 'mlp', 'method': 'backprop', 'lr': 0.1}")
    pretrain = run_config(**pretrain)
    if (pretrain["model"], pretrain["model_kwargs"]) != (model, model_kwargs):
        raise ValueError(f"pretrain trains model {pretrain['model']!r} {pretrain['model_kwargs']}, this run "
                         f"{model!r} {model_kwargs}: a run starts from the weights of the same network.")
    if pretrain.get("pretrain") is not None:
        raise ValueError("pretrain is itself fine-tuned (it has a pretrain setting): start from a run trained "
                         "from scratch.")
    return pretrain


def run_key(config: dict) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``config``."""
    check_type("config", config, dict, "a run configuration: a dict from run_config(...)")
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_root() -> Path:
    """``$FGTUTOR_RESULTS``, else ``results/`` of the repository fgtutor runs from (an
    editable install), else ``./results``."""
    env = os.environ.get("FGTUTOR_RESULTS")
    if env:
        return Path(env).expanduser()
    repo = PACKAGE_DIR.parent
    return repo / "results" if (repo / "_toc.yml").is_file() else Path("results").resolve()


def cache_root() -> Path:
    """Where runs trained outside ``make results`` go: ``$FGTUTOR_CACHE``, else ``runs/store``
    beside ``results/``."""
    env = os.environ.get("FGTUTOR_CACHE")
    return Path(env).expanduser() if env else default_root().parent / "runs" / "store"


MODES = ("train", "results", "readonly")


def store_roots(root: Union[str, Path, None] = None) -> tuple[list[Path], Optional[Path]]:
    """The folders runs are read from, in order, and the one missing runs are written to
    (None: training is not allowed), for the mode in ``$FGTUTOR_STORE``. An explicit
    ``root`` is both (the readonly mode still forbids writing)."""
    mode = os.environ.get("FGTUTOR_STORE", "") or "train"
    check_choice("FGTUTOR_STORE", mode, MODES)
    if root is not None:
        return [Path(root)], None if mode == "readonly" else Path(root)
    results = default_root()
    if mode == "results":
        return [results], results
    if mode == "readonly":
        return [results], None
    return [results, cache_root()], cache_root()


def run_path(config: dict, root: Union[str, Path, None] = None) -> Path:
    """Where the run of ``config`` is stored: ``<root>/<model>/<method>-<key>.json.gz``
    (``<model>_<dataset>/`` for a dataset other than MNIST)."""
    check_type("config", config, dict, "a run configuration: a dict from run_config(...)")
    root = Path(root) if root is not None else default_root()
    folder = config["model"] + (f"_{config['dataset']}" if "dataset" in config else "")
    return root / folder / f"{config['method']}-{run_key(config)}.json.gz"


def describe(config: dict) -> str:
    """A short human label, e.g. ``mlp forward lr=2e-04 decay=1e-04 50 epochs seed 0``."""
    check_type("config", config, dict, "a run configuration: a dict from run_config(...)")
    config = run_config(**config)
    extra = "".join(f" {k}={v}" for k, v in config["model_kwargs"].items())
    extra += "".join(f" {k}={config[k]}" for k in ("momentum", "clip") if config[k])
    extra += "".join(f" {config[k]}" for k in LATER_DEFAULTS if k in config and k not in ("eps", "pretrain", "trainable"))
    if config.get("trainable", "all") != "all":
        extra += f" training the {config['trainable']} layer"
    if config.get("pretrain"):
        p = config["pretrain"]
        extra += f" from {p['method']} on {p.get('dataset', 'mnist')} ({p['epochs']} epochs, seed {p['seed']})"
    if config["method"] in ESTIMATORS and (config["sampler"] != "rademacher" or config["num_tangents"] != 1):
        extra += f" {config['sampler']}×{config['num_tangents']}"
    if config["method"] == "zeroth":
        extra += f" eps={config.get('eps', LATER_DEFAULTS['eps']):.3g}"
    if config["schedule_every"] != "step":
        extra += f" decay per {config['schedule_every']}"
    return (f"{config['model']} {config['method']} lr={config['lr']:.3g} decay={config['decay']:.3g}{extra} "
            f"{config['epochs']} epochs on {config['n_train']} seed {config['seed']}")


# ---------------------------------------------------------------------------
# Reading and writing one run
# ---------------------------------------------------------------------------

def thin(values: Sequence[float], every: int) -> list[float]:
    """Means of consecutive blocks of ``every`` values (the last block may be shorter),
    rounded to 5 significant digits: curves at the resolution plots need."""
    check_positive("every", every, integer=True)
    check_type("values", values, (list, tuple), "a list of numbers")
    out = []
    for i in range(0, len(values), every):
        block = values[i:i + every]
        out.append(float(f"{sum(block) / len(block):.5g}"))
    return out


def git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_is_dirty() -> Optional[bool]:
    """True when the package's own files differ from the commit (None outside git)."""
    status = git("status", "--porcelain", "--", ".")
    return None if status is None else bool(status)


def provenance(wall_seconds: float, device: str) -> dict:
    """Who made a run, with what, where and when."""
    from .replay import kernels  # replay sits on the store

    return {
        "fgtutor": __version__, "commit": git("rev-parse", "HEAD"), "dirty": code_is_dirty(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "platform": platform.platform(), "cpu": platform.machine(),
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "device": device,
        "torch": torch.__version__, "python": platform.python_version(), "kernels": kernels(),
        "wall_seconds": round(wall_seconds, 2),
    }


def save(config: dict, history: History, prov: dict, root: Union[str, Path, None] = None) -> Path:
    """Write a run with its ``fgtutor.replay`` fingerprint (computed here, so that no
    stored run lacks one) atomically, and return its path."""
    from .replay import fingerprint_record  # replay sits on the store

    every = max(1, math.ceil(len(history.step_loss) / MAX_CURVE_POINTS))
    stored = {**history.__dict__, "step_loss": thin(history.step_loss, every), "step_every": every}
    record = {"format": FORMAT, "key": run_key(config), "config": config, "provenance": prov,
              "first_steps": history.step_loss[:REPLAY_STEPS], "history": stored,
              "fingerprint": fingerprint_record(config, float32_exact=True)}
    return write_record(run_path(config, root), record)


def write_record(path: Path, record: dict) -> Path:
    """Write a stored record as gzipped JSON, atomically (a temporary file beside it, then
    a rename), byte for byte the same for the same record."""
    return atomic_write(path, gzip.compress(json.dumps(record, separators=(",", ":")).encode(), mtime=0))


def read(path: Union[str, Path]) -> dict:
    """The stored record at ``path``; ``CorruptRunError`` naming the file if it is not one."""
    check_type("path", path, (str, Path), "the path of a stored run, e.g. results/mlp/forward-….json.gz")
    path = Path(path)
    try:
        record = json.loads(gzip.decompress(path.read_bytes()))
        History(**record["history"])
        record["config"], record["first_steps"], record["provenance"]
        if "fingerprint" in record:
            fp = record["fingerprint"]
            fp["steps"], fp["loss"], fp["displacement"], fp["projections"]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise CorruptRunError(f"{path} is not a readable stored run ({type(exc).__name__}: {exc}). "
                              "Delete it and run `make results` to train it again.") from exc
    if record["config"] != run_config(**record["config"]) or path.name != run_path(record["config"], "x").name:
        raise CorruptRunError(f"{path} does not hold the run its name says (its configuration was edited?). "
                              "Delete it and run `make results`.")
    return record


def load(config: dict, root: Union[str, Path, None] = None) -> Optional[History]:
    """The stored History of ``config`` in ``root`` (default ``results/``), or None."""
    path = run_path(config, root)
    return _load_path(path) if path.exists() else None


def _load_path(path: Path) -> History:
    record = read(path)
    history = History(**record["history"])
    history.meta["provenance"] = record["provenance"]
    return history


# ---------------------------------------------------------------------------
# Training a configuration
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _dataset(name: str, train: bool):
    return DATASETS[name](train=train)


def config_data(config: dict) -> tuple[tuple, dict]:
    """The training set and evaluation sets a configuration names, from its dataset (MNIST
    unless ``dataset`` says otherwise) in memory, every one prepared the same way
    (``inputs``: raw or pixels standardized with MNIST's statistics)."""
    dataset = config.get("dataset", LATER_DEFAULTS["dataset"])
    X, Y = _dataset(dataset, True)
    (X_train, Y_train), val = train_val_split(X, Y, n_val=config["n_val"], seed=config["split_seed"])
    train = (X_train[:config["n_train"]], Y_train[:config["n_train"]])
    sets = {"val": val, "test": _dataset(dataset, False) if "test" in config["eval_sets"] else None}
    inputs = config.get("inputs", LATER_DEFAULTS["inputs"])
    prepared = {name: (prepare_inputs(sets[name][0], inputs), sets[name][1]) for name in config["eval_sets"]}
    return (prepare_inputs(train[0], inputs), train[1]), prepared


def fit_kwargs(config: dict) -> dict:
    """The keyword arguments of ``train_model`` that a configuration sets."""
    kwargs = dict(lr=config["lr"], decay=config["decay"], momentum=config["momentum"], epochs=config["epochs"],
                  batch_size=config["batch_size"], seed=config["seed"], schedule_every=config["schedule_every"])
    if config["method"] in ESTIMATORS:
        kwargs.update({k: config[k] for k in FORWARD_ONLY})
    kwargs.update({k: config[k] for k in LATER_DEFAULTS
                   if k in config and k not in DATA_SETTINGS and k not in MODEL_SETTINGS})
    return kwargs


def model_constructor(config: dict):
    """A zero-argument constructor of the configuration's model (``train_model`` seeds, then
    builds): a fresh network, or for a fine-tuning run the weights its ``pretrain`` run ended
    with, all of them trainable or (``trainable="last"``) only the last layer."""
    build = functools.partial(MODELS[config["model"]], **config["model_kwargs"])
    pretrain, trainable = config.get("pretrain"), config.get("trainable", "all")
    if pretrain is None and trainable == "all":
        return build
    pretrain_json = json.dumps(pretrain, sort_keys=True) if pretrain is not None else None
    return functools.partial(_fine_tuning_model, build, pretrain_json, trainable)


def _fine_tuning_model(build, pretrain_json: Optional[str], trainable: str) -> torch.nn.Module:
    model = build()  # its random weights are drawn (and overwritten): the seed's stream is the same for all runs
    if pretrain_json is not None:
        model.load_state_dict(pretrained_state(pretrain_json))  # cast to the model's dtype
    return train_only_last_layer(model) if trainable == "last" else model


@functools.lru_cache(maxsize=2)
def pretrained_state(pretrain_json: str) -> dict[str, torch.Tensor]:
    """The final weights of the run whose configuration ``pretrain_json`` holds (canonical
    JSON), trained again here, on the CPU, in float64, with the random number generators
    left as they were (a fine-tuning run's own seed still decides its batches).

    Float64, so that every CPU computes the same weights: float32 training on two CPUs
    drifts apart by far more than the replay check's tolerance, while the float64 weights
    agree to ~1e-13 and round to the same float32 numbers (but perhaps a handful)."""
    config = json.loads(pretrain_json)
    (X, Y), _ = config_data({**config, "eval_sets": []})
    with default_dtype(torch.float64), kept_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model, _ = train_model(model_constructor(config), config["method"], (X.double(), Y), {}, progress=False,
                               device="cpu", **fit_kwargs(config))
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def checkpoint_path(config: dict, root: Union[str, Path, None] = None) -> Path:
    """Where an unfinished run keeps its last epoch (``fit(checkpoint=...)``)."""
    path = run_path(config, root)
    return path.parent.parent / ".checkpoints" / path.name.replace(".json.gz", ".pt")


def train_config(config: dict, device: str = "auto", progress: bool = True,
                 checkpoint: Union[str, Path, None] = None) -> tuple[History, dict]:
    """Train the run ``config`` describes (resuming from ``checkpoint`` when given and
    present); returns its History and provenance."""
    start = time.perf_counter()
    train, sets = config_data(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divergence is a result: it is in the History
        _, history = train_model(model_constructor(config), config["method"], train, sets, device=device,
                                 progress=progress, meta={"model_name": config["model"]}, checkpoint=checkpoint,
                                 **fit_kwargs(config))
    return history, provenance(time.perf_counter() - start, history.meta["device"])


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock for ``path`` (a sidecar file in ``.locks``), so that two
    processes never train and write the same run at once."""
    lock_dir = path.parent.parent / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{path.name}.lock", "w") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # no advisory locks (Windows): one process at a time is up to you
            pass
        yield


def train_and_save(config: dict, root: Union[str, Path, None] = None, retrain: bool = False,
                   device: str = "auto", progress: bool = True) -> tuple[Path, bool]:
    """Train and store ``config`` unless another process stored it meanwhile (and
    ``retrain`` is off). Returns the path and whether this call trained it. A run that
    was interrupted resumes from its last finished epoch."""
    path = run_path(config, root)
    with locked(path):
        if path.exists() and not retrain:
            return path, False
        history, prov = train_config(config, device, progress, checkpoint_path(config, root))
        return save(config, history, prov, root), True


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", RuntimeWarning)


def _log(event: dict) -> None:
    log = os.environ.get("FGTUTOR_STORE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(event) + "\n")


def train_runs(configs: Sequence[dict], *, retrain: bool = False, jobs: Optional[int] = None,
               device: str = "auto", root: Union[str, Path, None] = None, progress: bool = True) -> list[History]:
    """The History of every configuration in ``configs`` (in order): loaded when stored,
    trained and stored when not, or when ``retrain`` is set.

    Missing runs train in ``jobs`` processes (default ``$FGTUTOR_JOBS`` or 1), each with
    its share of the CPU threads; a progress bar estimates the time left. An interrupted
    batch resumes where it stopped: every finished run is already stored, and an
    unfinished one continues from its last finished epoch. Under
    ``FGTUTOR_STORE=readonly`` a missing run raises ``MissingRunsError`` instead.
    """
    check_type("configs", configs, (list, tuple), "a list of run configurations (dicts)")
    for c in configs:
        check_type("configs entry", c, dict, "a dict of run settings, e.g. {'model': 'mlp', 'lr': 1e-3}")
    configs = [run_config(**c) for c in configs]
    if not configs:
        raise ValueError("configs is empty: pass at least one run configuration.")
    retrain = retrain or os.environ.get("FGTUTOR_RETRAIN", "") not in ("", "0")
    jobs = jobs if jobs is not None else int(os.environ.get("FGTUTOR_JOBS", "1") or 1)
    check_positive("jobs", jobs, integer=True)
    reads, write = store_roots(root)
    unique = {run_key(c): c for c in configs}
    found = {k: next((run_path(c, r) for r in reads if run_path(c, r).exists()), None) for k, c in unique.items()}
    todo = {k: c for k, c in unique.items() if retrain or found[k] is None}
    if todo and write is None:
        listing = "\n".join(f"  - {describe(c)}" for c in list(todo.values())[:10])
        more = f"\n  … and {len(todo) - 10} more" if len(todo) > 10 else ""
        raise MissingRunsError(
            f"{len(todo)} of this chapter's {len(unique)} runs {'must be retrained' if retrain else 'are not stored'} "
            f"in {reads[0]}, and this build does not train (FGTUTOR_STORE=readonly):\n{listing}{more}\n"
            "Run `make results` (add JOBS=2 to train in parallel) to train and store them, then build again.")
    print(f"{len(unique) - len(todo)} of {len(unique)} runs loaded from {', '.join(map(str, reads))}; "
          f"{len(todo)} to train" + (f" into {write}." if todo else "."))
    if todo:
        _train_missing(list(todo.values()), write, retrain, jobs, device, progress)
        found.update({k: run_path(c, write) for k, c in todo.items()})
    histories = {}
    for key, config in unique.items():
        histories[key] = _load_path(found[key])
        _log({"key": key, "path": str(found[key]), "trained": key in todo, "run": describe(config)})
    return [histories[run_key(c)] for c in configs]


def _train_missing(todo: list[dict], root: Path, retrain: bool, jobs: int, device: str, progress: bool) -> None:
    # progress in epochs × images, so that the time left weighs long runs more than short ones
    work = {run_key(c): c["epochs"] * c["n_train"] for c in todo}
    bar = tqdm(total=sum(work.values()), desc=f"training {len(todo)} runs", unit="img", unit_scale=True,
               disable=not progress, mininterval=10.0, file=sys.stdout)

    def done(config: dict, seconds: float) -> None:
        bar.update(work[run_key(config)])
        bar.write(f"stored: {describe(config)} ({seconds:.0f} s)")

    if jobs == 1:
        for config in todo:
            start = time.perf_counter()
            train_and_save(config, root, retrain, device, progress=False)
            done(config, time.perf_counter() - start)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            started = time.perf_counter()
            futures = {pool.submit(train_and_save, c, root, retrain, device, False): c for c in todo}
            try:
                for future in as_completed(futures):
                    future.result()
                    done(futures[future], time.perf_counter() - started)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    bar.close()


def stored_note(histories: Sequence[History]) -> str:
    """One sentence of provenance for figures and tables built from stored runs: how many
    runs and seeds, when, at which commit, on what machine."""
    check_type("histories", histories, (list, tuple), "a non-empty list of stored runs' Histories")
    if not histories or not all(isinstance(h, History) for h in histories):
        raise ValueError("histories must be a non-empty list of Histories (from train_runs or load).")
    provs = [h.meta.get("provenance") or {} for h in histories]
    dates = sorted(p.get("date", "?")[:10] for p in provs)
    commits = sorted({(p.get("commit") or "unknown")[:7] + ("+dirty" if p.get("dirty") else "") for p in provs})
    machines = sorted({f"{p.get('machine', '?')} ({p.get('cpus', '?')} CPUs, {p.get('threads', '?')} thread"
                       f"{'s' if p.get('threads') != 1 else ''} per run, {p.get('device', '?')}, "
                       f"torch {p.get('torch', '?')})" for p in provs})
    seeds = sorted({h.meta.get("seed") for h in histories})
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return (f"{len(histories)} stored runs ({len(seeds)} seeds: {', '.join(map(str, seeds))}), "
            f"trained {when} at commit {', '.join(commits)} on {'; '.join(machines)}.")


def stored_paths(root: Union[str, Path, None] = None) -> list[Path]:
    """Every stored run under ``root``, sorted."""
    root = Path(root) if root is not None else default_root()
    return sorted(root.glob("*/*.json.gz"))


# ---------------------------------------------------------------------------
# make results: execute the chapters with training allowed
# ---------------------------------------------------------------------------

def store_chapters(repo: Path) -> list[Path]:
    """The chapters of ``_toc.yml``, in reading order, whose code asks the store for runs."""
    import yaml
    toc = yaml.safe_load((repo / "_toc.yml").read_text())
    chapters = [repo / f"{entry['file']}.ipynb" for entry in toc["chapters"]]
    return [c for c in chapters if c.is_file() and "train_runs(" in c.read_text()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgtutor.store", description=(
        "Execute the book's chapters with training allowed, so that every run they ask for is in the "
        "results store. Runs already stored are loaded, not trained."))
    parser.add_argument("chapters", nargs="*",
                        help="chapters to execute (default: every chapter in _toc.yml that uses the store)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel training processes (default 1)")
    parser.add_argument("--retrain", action="store_true", help="train every run again, even when stored")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="store runs made by uncommitted code (their provenance says so)")
    args = parser.parse_args(argv)
    repo = PACKAGE_DIR.parent
    try:
        check_positive("--jobs", args.jobs, integer=True)
        chapters = [Path(c) for c in args.chapters] or store_chapters(repo)
        for chapter in chapters:
            if not chapter.is_file():
                raise ValueError(f"chapter {chapter} does not exist.")
        if code_is_dirty() and not args.allow_dirty:
            raise ValueError("fgtutor/ has uncommitted changes: stored runs must come from committed code. "
                             "Commit first (or pass --allow-dirty for a throw-away store).")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .book import run_chapter

    out_dir = repo / "runs" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "store-log.jsonl"
    log.unlink(missing_ok=True)
    env = {"FGTUTOR_STORE": "results", "FGTUTOR_JOBS": str(args.jobs), "FGTUTOR_STORE_LOG": str(log),
           "FGTUTOR_RETRAIN": "1" if args.retrain else "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    summary, start = [], time.perf_counter()
    try:
        for chapter in chapters:
            before = log.read_text().splitlines() if log.exists() else []
            print(f"\n=== {chapter.name}", flush=True)
            t0 = time.perf_counter()
            run_chapter(chapter, out_dir / chapter.name, progress=False, log_output=True)
            events = [json.loads(line) for line in log.read_text().splitlines()[len(before):]] if log.exists() else []
            trained = [e for e in events if e["trained"]]
            summary.append((chapter.name, len(events) - len(trained), len(trained), time.perf_counter() - t0))
            for e in trained:
                print(f"  ran:     {e['run']}")
            print(f"  {chapter.name}: {len(events) - len(trained)} runs skipped (already stored), "
                  f"{len(trained)} trained, {time.perf_counter() - t0:.0f} s", flush=True)
    except Exception as exc:
        print(f"error: {chapter} failed:\n{exc}", file=sys.stderr)
        return 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print("\nchapter            skipped  trained  seconds")
    for name, skipped, trained, seconds in summary:
        print(f"{name:18} {skipped:7d}  {trained:7d}  {seconds:7.0f}")
    used = {json.loads(line)["path"] for line in log.read_text().splitlines()} if log.exists() else set()
    unused = [p for p in stored_paths() if str(p) not in used]
    if unused and not args.chapters:
        print(f"\n{len(unused)} stored runs are used by no chapter (delete them if they are stale):")
        for p in unused:
            print(f"  {p}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
