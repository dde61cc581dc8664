"""Training and evaluation loops shared by every method.

``fit`` runs forward gradient and backprop through the *same* loop: the same model, data
order (a generator seeded with ``seed``), loss, optimizer, schedule and evaluation. What
differs is the training step: backprop fills ``p.grad`` with ``loss.backward()``; forward
gradient estimates it in one forward-mode pass (``fgtutor.optim.forward_step``), and with
plain SGD fuses the estimate into the update; ``"zeroth"`` estimates it from two ordinary
forward passes (MeZO, ``fgtutor.zeroth.zeroth_step``). ``train_model`` is the one-call
version the chapters use: it seeds, builds the model, SGD and the paper's schedule.
"""
from __future__ import annotations

import inspect
import io
import itertools
import json
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import TqdmWarning

with warnings.catch_warnings():  # without ipywidgets, tqdm.auto falls back to text bars and says so
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

from .activity import ActivityGradient
from .data import batches
from .forward import ForwardGradient
from .losses import cross_entropy
from .models import MODELS, count_parameters, make_model
from .optim import check_schedule, forward_step, fuses, make_schedule
from .zeroth import ZerothOrderGradient, check_eps, zeroth_step
from .utils import (atomic_write, check_callable, check_choice, check_frame, check_positive, check_type,
                    make_generator, pick_device, seed_everything, short_repr, synchronize)

#: the two methods the book compares, in the order its tables show them
METHODS = ("forward", "backprop")
#: every method ``fit`` takes: those two and ``"zeroth"``, two-point zeroth-order estimates
#: (SPSA) taken the MeZO way (``fgtutor.zeroth``)
ALL_METHODS = (*METHODS, "zeroth")
#: the finite-difference step of ``method="zeroth"`` unless ``eps`` says otherwise
EPS = 1e-3
#: what a forward gradient perturbs: all weights at once (``ForwardGradient``, FG-W) or
#: every layer's activities (``ActivityGradient``: FG-A, or LG-FG-A on a ``LocalMLP``)
PERTURB = ("weights", "activities")
#: the optimizers ``train_model`` builds by name
OPTIMIZERS = ("sgd", "adam")
Dataset = tuple[Tensor, Tensor]
LOSS_FN = "a function of (logits, labels) that returns a scalar tensor, e.g. fgtutor.losses.cross_entropy"


def _check_dataset(name: str, data: Dataset) -> Dataset:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
        raise ValueError(f"{name} must be a pair of tensors (X, Y), got {type(data).__name__}.")
    X, Y = data
    if X.dim() < 2 or Y.dim() != 1 or X.shape[0] != Y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"{name}=(X, Y) has shapes {tuple(X.shape)} and {tuple(Y.shape)}: X must be N×… "
                         "and Y must hold N integer labels, with N > 0.")
    return X, Y


@torch.no_grad()
def _check_labels(model: nn.Module, sets: dict[str, Dataset]) -> None:
    """Before any step is taken: the model accepts the inputs, and every label is an
    integer class index it can output (a bad label would otherwise crash mid-epoch)."""
    name, (X, _) = next(iter(sets.items()))
    was_training = model.training
    model.eval()
    try:
        out = model(X[:1])
    except RuntimeError as exc:
        raise ValueError(f"{type(model).__name__} cannot take {name} inputs of shape {tuple(X.shape[1:])}: "
                         f"{str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
    classes = out.shape[-1]
    for name, (_, Y) in sets.items():
        if Y.dtype.is_floating_point or Y.dtype == torch.bool:
            raise ValueError(f"{name} labels are {Y.dtype}: use integer class indices (Y.long()).")
        low, high = int(Y.min()), int(Y.max())
        if low < 0 or high >= classes:
            raise ValueError(f"{name} has labels from {low} to {high}, but {type(model).__name__} outputs {classes} "
                             f"classes: labels must lie in 0..{classes - 1}.")


def _model_device(model: nn.Module, default: torch.device) -> torch.device:
    """Where ``model`` computes: its parameters' device, else its buffers', else ``default``
    (a model with neither, e.g. ``nn.Flatten()``, runs wherever its inputs are)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return default if tensor is None else tensor.device


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, Y: Tensor, batch_size: int = 1000,
             loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy) -> tuple[float, float]:
    """Mean loss and accuracy over *every* sample of ``(X, Y)``.

    Batch losses are weighted by batch size, so the last partial batch counts exactly as
    much as its samples (the original kept only the last batch's loss).
    """
    check_type("model", model, nn.Module, "a torch.nn.Module, e.g. fgtutor.models.MLP()")
    check_callable("loss_fn", loss_fn, LOSS_FN)
    X, Y = _check_dataset("(X, Y)", (X, Y))
    check_positive("batch_size", batch_size, integer=True)
    device = _model_device(model, X.device)
    _check_labels(model, {"(X, Y)": (X.to(device), Y)})
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for x, y in batches(X, Y, batch_size, shuffle=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += loss_fn(logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    return total_loss / len(Y), correct / len(Y)


@dataclass
class History:
    """Everything a run measured, plus what is needed to reproduce it.

    * ``step_loss``: training loss of every step (the batch loss the method saw), or, in a
      stored run (``fgtutor.store``), the mean over each block of ``step_every`` steps;
    * ``epochs``: one row per evaluation (epoch 0 is before training) with the
      cumulative ``train_seconds`` and ``eval_seconds``, the learning rate, and
      ``<set>_loss`` / ``<set>_accuracy`` for every evaluation set;
    * ``meta``: method, model, hyper-parameters, seed, torch version, device, …;
    * ``diverged`` and ``message``: set when a non-finite loss stopped the run.
    """

    meta: dict = field(default_factory=dict)
    step_loss: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    step_every: int = 1
    diverged: bool = False
    message: str = ""

    def to_dataframe(self) -> pd.DataFrame:
        """Per-epoch rows, with ``method`` and ``model`` columns for concatenating runs."""
        df = pd.DataFrame(self.epochs)
        for key in ("model", "method"):
            df.insert(0, key, self.meta.get(key))
        return df

    def final(self, column: str) -> float:
        """The last recorded value of a per-epoch column, e.g. ``"test_accuracy"``.

        For a run that diverged that is the score of its last finished epoch, not of a
        trained model: a ``RuntimeWarning`` says so (check ``diverged`` first to handle it).
        """
        check_type("column", column, str, 'the name of a recorded column, e.g. "test_accuracy"')
        if not self.epochs or column not in self.epochs[-1]:
            raise ValueError(f"column={column!r} is not recorded; have: {', '.join(self.epochs[-1]) if self.epochs else 'nothing'}.")
        if self.diverged:
            warnings.warn(f"final({column!r}) of a run that diverged is the value after epoch "
                          f"{self.epochs[-1]['epoch']}, before it diverged: {self.message}", RuntimeWarning, stacklevel=2)
        return self.epochs[-1][column]

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        """The history as JSON; written atomically to ``path`` when given."""
        text = json.dumps(_strict(asdict(self)), indent=1, allow_nan=False)
        if path is not None:
            atomic_write(path, text)
        return text

    @classmethod
    def from_json(cls, source: Union[str, Path]) -> "History":
        """Read a history written by ``to_json`` (a path, or the JSON text itself)."""
        check_type("source", source, (str, Path), "a path to a History's JSON file, or the JSON text itself")
        text, where = str(source), "the JSON text"
        if not text.lstrip().startswith("{"):
            where = str(source)
            try:
                text = Path(source).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read a History from {where}: {exc}") from exc
        try:
            fields = _unstrict(json.loads(text))
            return cls(**fields)
        except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{where} is not a History written by History.to_json "
                             f"({type(exc).__name__}: {exc}).") from exc


# Strict JSON has no NaN or infinity; a diverged run has both. They are written as these
# strings and read back as floats.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _strict(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _unstrict(obj):
    if isinstance(obj, str) and obj in _NON_FINITE:
        return _NON_FINITE[obj]
    if isinstance(obj, dict):
        return {k: _unstrict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unstrict(v) for v in obj]
    return obj


def fit(
    model: nn.Module,
    method: str,
    optimizer: torch.optim.Optimizer,
    train: Dataset,
    eval_sets: Optional[dict[str, Dataset]] = None,
    epochs: int = 1,
    batch_size: int = 64,
    schedule: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
    seed: int = 0,
    sampler: str = "rademacher",
    num_tangents: int = 1,
    clip: Optional[float] = None,
    perturb: str = "weights",
    eps: float = EPS,
    schedule_every: str = "step",
    eval_batch_size: int = 1000,
    progress: bool = True,
    meta: Optional[dict] = None,
    max_steps: Optional[int] = None,
    checkpoint: Union[str, Path, None] = None,
    on_epoch: Optional[Callable[[dict], bool]] = None,
) -> History:
    """Train ``model`` with ``method`` = ``"forward"``, ``"backprop"`` or ``"zeroth"`` and record a History.

    Each step: ``.grad`` from ``loss.backward()`` (backprop) or from the forward-gradient
    estimate (which overwrites it: nothing to zero), then ``optimizer.step()`` and ``schedule.step()``
    (per iteration, as in the paper; ``schedule_every="epoch"`` steps it once per epoch
    instead, as the original notebook did).
    After every epoch, and once before training, every set in ``eval_sets`` is scored on
    all its samples. Training and evaluation wall-clock seconds are kept apart.

    With plain SGD the forward-gradient update is fused, ``θ ← θ − (lr·dd)·v`` in one pass
    over the weights (``fgtutor.optim.forward_step``): the same step as writing ``dd·v``
    into ``p.grad`` and calling ``optimizer.step()``, with one memory pass fewer; after it
    ``p.grad`` holds the tangent ``v``, not the estimate. With ``sampler="rank1"`` (a
    rank-one tangent per weight matrix, ``fgtutor.tangents``) each matrix takes a rank-one
    update instead and ``p.grad`` is not written. ``perturb="activities"`` estimates
    ``.grad`` by perturbing every layer's activities instead of the weights
    (``fgtutor.activity.ActivityGradient``; on a ``LocalMLP`` with its local losses),
    with one tangent and no clipping.

    ``method="zeroth"`` estimates ``.grad`` from the losses at ``θ ± eps·v_k`` alone
    (``num_tangents`` directions ``v_k`` drawn by ``sampler``, ``"rademacher"`` or
    ``"gaussian"``), MeZO's way (``fgtutor.zeroth``): the weights are moved in place and
    restored bit for bit, and with plain SGD the update is fused, ``θ ← θ − lr·p·v``, so
    ``p.grad`` is never written; other optimizers get the estimate in ``p.grad``. Its step
    losses are the means of the perturbed losses, within O(eps²) of the loss at θ.

    The data order comes from a generator seeded with ``seed`` and the tangents from a
    second one seeded with ``seed + 1``, so two runs with the same seed see the same
    batches whatever the method. A non-finite loss stops the run: the history records
    where and why (``diverged``, ``message``) and a warning says how to fix it.
    ``max_steps`` stops after that many steps, without a final evaluation: replaying the
    start of a stored run (``fgtutor.replay``) needs no more.

    ``checkpoint`` (a file path) makes the run resumable: after every epoch the model,
    optimizer, schedule, both random generators and the history are written there
    atomically, a call with the same run and path continues after the last finished epoch
    (with exactly the history an uninterrupted run would have), and the file is removed
    when the run ends.

    ``on_epoch`` (e.g. a hyper-parameter search reporting to its pruner,
    ``fgtutor.sweep``) is called with every evaluation row as it is recorded (epoch 0
    first; on resuming from ``checkpoint``, the restored rows first) and returns True to
    stop the run there. It only reads: the run's numbers are those of a run without it. A
    run it stopped before its last epoch is not a finished run: its History has
    ``meta["stopped_after_epoch"]``, it must not be stored as one, and its checkpoint (if
    any) is kept, so that the same run can be continued later.
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_choice("method", method, ALL_METHODS)
    check_type("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim optimizer over the model's parameters")
    if eval_sets is not None:
        check_type("eval_sets", eval_sets, dict, 'a dict of named (X, Y) pairs, e.g. {"test": (X_test, Y_test)}')
    _check_schedule(schedule, optimizer)
    check_callable("loss_fn", loss_fn, LOSS_FN)
    _check_hooks(meta, checkpoint, on_epoch)
    check_positive("seed", seed, allow_zero=True, integer=True)
    check_positive("epochs", epochs, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("eval_batch_size", eval_batch_size, integer=True)
    check_choice("schedule_every", schedule_every, ("step", "epoch"))
    check_choice("perturb", perturb, PERTURB)
    if method == "forward" and perturb == "activities" and (num_tangents != 1 or clip is not None):
        raise ValueError(f"perturb='activities' takes one tangent and no clip (got num_tangents={num_tangents}, "
                         f"clip={clip}); these settings belong to perturb='weights'.")
    check_eps(eps)
    if method == "zeroth" and (perturb != "weights" or clip is not None):
        raise ValueError(f"method='zeroth' perturbs the weights and clips nothing (got perturb={perturb!r}, "
                         f"clip={clip}); perturb='activities' and clip belong to method='forward'.")
    if method != "zeroth" and eps != EPS:
        raise ValueError(f"eps={eps!r} is the finite-difference step of method='zeroth', not of method={method!r}.")
    if max_steps is not None:
        check_positive("max_steps", max_steps, integer=True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True): "
                         "there is nothing to train.")
    device = next(model.parameters()).device
    X, Y = (t.to(device) for t in _check_dataset("train", train))
    eval_sets = {name: tuple(t.to(device) for t in _check_dataset(f"eval_sets[{name!r}]", data))
                 for name, data in (eval_sets or {}).items()}
    _check_labels(model, {"train": (X, Y), **{f"eval_sets[{k!r}]": v for k, v in eval_sets.items()}})

    history = History(meta={
        "method": method, "model": type(model).__name__, "num_params": count_parameters(model),
        "optimizer": type(optimizer).__name__, "lr": optimizer.param_groups[0]["lr"],
        "epochs": epochs, "batch_size": batch_size, "seed": seed, "n_train": len(Y),
        "schedule": type(schedule).__name__ if schedule is not None else None, "schedule_every": schedule_every,
        "eval_sets": {name: len(d[1]) for name, d in eval_sets.items()},
        "loss": getattr(loss_fn, "__name__", repr(loss_fn)),
        **({"sampler": sampler, "num_tangents": num_tangents, "clip": clip} if method == "forward" else {}),
        **({"perturb": perturb} if method == "forward" and perturb != "weights" else {}),
        **({"sampler": sampler, "num_tangents": num_tangents, "eps": eps} if method == "zeroth" else {}),
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), **(meta or {}),
    })
    if method == "forward":
        generator = make_generator(seed + 1, device)
        if perturb == "activities":
            estimate, fused = ActivityGradient(model, loss_fn, sampler=sampler, generator=generator), False
        else:
            estimate = ForwardGradient(model, loss_fn, num_tangents=num_tangents, sampler=sampler, clip=clip,
                                       generator=generator)
            fused = fuses(estimate, optimizer)  # decided once, not every step

        def train_step(x: Tensor, y: Tensor) -> Tensor:
            return forward_step(estimate, optimizer, x, y, fused=fused)
    elif method == "zeroth":
        estimate = ZerothOrderGradient(model, loss_fn, eps=eps, num_directions=num_tangents, sampler=sampler,
                                       generator=make_generator(seed + 1, device), in_place=True)

        def train_step(x: Tensor, y: Tensor) -> Tensor:
            return zeroth_step(estimate, optimizer, x, y)
    else:
        def train_step(x: Tensor, y: Tensor) -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if torch.isfinite(loss):  # a diverged step leaves the weights alone, as forward_step does
                optimizer.step()
            return loss
    data_order = make_generator(seed)
    train_seconds = eval_seconds = 0.0

    def record(epoch: int) -> None:
        nonlocal eval_seconds
        start = time.perf_counter()
        row = {"epoch": epoch, "step": len(history.step_loss), "lr": optimizer.param_groups[0]["lr"]}
        for name, (Xe, Ye) in eval_sets.items():
            row[f"{name}_loss"], row[f"{name}_accuracy"] = evaluate(model, Xe, Ye, eval_batch_size, loss_fn)
        eval_seconds += time.perf_counter() - start
        history.epochs.append({**row, "train_seconds": train_seconds, "eval_seconds": eval_seconds})

    generators = {"data_order": data_order}
    if method in ("forward", "zeroth"):
        generators["tangents"] = estimate.generator
    first_epoch = 1
    if checkpoint is not None and Path(checkpoint).exists():
        state = _load_checkpoint(checkpoint, history.meta)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
        history = History(**state["history"])
        train_seconds, eval_seconds = history.epochs[-1]["train_seconds"], history.epochs[-1]["eval_seconds"]
        first_epoch = history.epochs[-1]["epoch"] + 1
    else:
        record(0)
    stopped_after = None
    for row in history.epochs if on_epoch is not None else ():
        if on_epoch(row):
            stopped_after = row["epoch"]
            break
    steps_per_epoch = math.ceil(len(Y) / batch_size)
    bar = tqdm(total=epochs * steps_per_epoch, initial=(first_epoch - 1) * steps_per_epoch,
               desc=f"{method} {type(model).__name__}", disable=not progress, mininterval=1.0, leave=False)
    model.train()
    for epoch in range(first_epoch, epochs + 1):
        if stopped_after is not None:
            break
        synchronize(device)
        start = time.perf_counter()
        for x, y in batches(X, Y, batch_size, generator=data_order):
            loss = train_step(x, y).item()  # .item() also synchronises the device: honest timing
            history.step_loss.append(loss)
            if not math.isfinite(loss):
                history.diverged = True
                history.message = (
                    f"{method} diverged: the training loss became {loss} at epoch {epoch}, step "
                    f"{len(history.step_loss)} (lr {optimizer.param_groups[0]['lr']:.3g}). Lower the learning "
                    "rate" + {"forward": ", use more tangents or set clip.",
                              "zeroth": " or use more directions (num_tangents)."}.get(method, ".")
                )
                break
            if schedule is not None and schedule_every == "step":
                schedule.step()
            bar.update()
            if bar.n % 50 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if len(history.step_loss) == max_steps:
                break
        synchronize(device)
        train_seconds += time.perf_counter() - start
        if history.diverged:
            warnings.warn(history.message, RuntimeWarning, stacklevel=2)
            break
        if len(history.step_loss) == max_steps:
            break
        if schedule is not None and schedule_every == "epoch":
            schedule.step()
        record(epoch)
        if checkpoint is not None and epoch < epochs:
            _save_checkpoint(checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict() if schedule is not None else None,
                "generators": {name: g.get_state() for name, g in generators.items()},
                "history": asdict(history)})
        if on_epoch is not None and on_epoch(history.epochs[-1]) and epoch < epochs:
            stopped_after = epoch
    bar.close()
    if stopped_after is not None:
        history.meta["stopped_after_epoch"] = stopped_after
    elif checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return history


def _check_schedule(schedule, optimizer: torch.optim.Optimizer) -> None:
    """None, or a learning-rate schedule of ``optimizer`` itself: one made for another
    optimizer would step, and change nothing, without a word."""
    if schedule is None:
        return
    check_type("schedule", schedule, torch.optim.lr_scheduler.LRScheduler, "None or a torch.optim.lr_scheduler "
               "schedule of the optimizer, e.g. fgtutor.optim.exp_decay(optimizer, 1e-4)")
    if schedule.optimizer is not optimizer:
        raise ValueError(f"schedule={type(schedule).__name__} belongs to another optimizer: "
                         "make it from the optimizer passed to fit, e.g. exp_decay(optimizer, 1e-4).")


def _check_hooks(meta, checkpoint, on_epoch) -> None:
    """The optional extras of ``fit``, checked before the first step rather than at the first use."""
    if meta is not None:
        check_type("meta", meta, dict, 'None or a dict of extra facts to record, e.g. {"note": "baseline"}')
    if checkpoint is not None:
        check_type("checkpoint", checkpoint, (str, Path), "None or a file path (a str or pathlib.Path)")
    if on_epoch is not None:
        check_callable("on_epoch", on_epoch, "None or a function of an evaluation row (a dict) that returns "
                                             "True to stop the run")


# what may differ between an interrupted run and its resumption
_RESUMABLE_META = ("threads", "device", "torch", "python")


def _save_checkpoint(path: Union[str, Path], state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def _load_checkpoint(path: Union[str, Path], meta: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["history"]["meta"]
    except Exception as exc:
        raise ValueError(f"checkpoint={str(path)!r} is not a readable fgtutor checkpoint ({exc}); "
                         "delete it to start the run from scratch.") from exc
    differs = sorted(k for k in set(saved) | set(meta) if k not in _RESUMABLE_META and saved.get(k) != meta.get(k))
    if differs:
        raise ValueError(f"checkpoint={str(path)!r} belongs to another run (it differs in {', '.join(differs)}); "
                         "delete it, or pass another path, to start this run from scratch.")
    return state


def train_model(
    model: Union[str, nn.Module],
    method: str,
    train: Dataset,
    eval_sets: Optional[dict[str, Dataset]] = None,
    *,
    lr: float = 2e-4,
    decay: float = 1e-4,
    momentum: float = 0.0,
    optimizer: str = "sgd",
    lr_schedule: str = "exp",
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    **kwargs,
) -> tuple[nn.Module, History]:
    """Seed everything, build the model (a name from ``fgtutor.models.MODELS`` or a
    zero-argument constructor), the optimizer (``"sgd"``, with ``momentum``, or
    ``"adam"``: ``torch.optim.Adam`` with its defaults) and the schedule (``"exp"``: the
    paper's per-iteration decay by ``decay``; ``"cosine"``: to zero over the run, with
    ``decay=0``), then ``fit``. Returns the trained model and its History.

    Calling it twice with the same ``seed`` and different ``method`` trains the same
    initial weights on the same batches: the fair comparison. ``kwargs`` go to ``fit``.
    """
    _check_constructor(model)
    check_choice("method", method, ALL_METHODS)  # here too: before seeding and building anything
    check_positive("lr", lr)
    check_positive("epochs", epochs, integer=True)  # both size the cosine schedule, before fit sees them
    check_positive("batch_size", batch_size, integer=True)
    check_schedule(lr_schedule, decay)
    check_positive("momentum", momentum, allow_zero=True)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "adam" and momentum:
        raise ValueError(f"momentum={momentum} is an SGD setting; Adam keeps its own moments (use momentum=0).")
    unknown = sorted(set(kwargs) - set(inspect.signature(fit).parameters) - {"meta"})
    if unknown:
        raise ValueError(f"train_model has no argument {', '.join(map(repr, unknown))}; besides its own it passes "
                         f"these to fit: {', '.join(p for p in inspect.signature(fit).parameters if p not in ('model', 'method', 'optimizer', 'train', 'eval_sets', 'epochs', 'batch_size', 'schedule', 'seed', 'meta'))}.")
    if "meta" in kwargs:
        check_type("meta", kwargs["meta"], dict, 'a dict of extra facts to record, e.g. {"note": "baseline"}')
    seed_everything(seed)
    dev = pick_device(device)
    net = _build(model).to(dev)
    opt = (torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=lr))
    meta = {"decay": decay, "momentum": momentum, **kwargs.pop("meta", {})}
    if lr_schedule != "exp":
        meta["lr_schedule"] = lr_schedule
    if isinstance(model, str):
        meta["model_name"] = model
    per_epoch = kwargs.get("schedule_every", "step") == "epoch"
    total = epochs if per_epoch else epochs * math.ceil(len(_check_dataset("train", train)[1]) / batch_size)
    history = fit(net, method, opt, train, eval_sets, epochs, batch_size, make_schedule(opt, lr_schedule, decay, total),
                  seed=seed, meta=meta, **kwargs)
    return net, history


_MODEL_ARG = (f"a model name ({', '.join(map(repr, MODELS))}) or a zero-argument constructor, e.g. "
              "fgtutor.models.MLP or functools.partial(MLP, hidden=256)")


def _check_constructor(model) -> None:
    """``train_model``'s ``model``: a name, or something that builds a module when called
    with no arguments. Checked before seeding, so that nothing has happened yet."""
    if isinstance(model, nn.Module):
        raise ValueError("model must be a name (e.g. 'mlp') or a constructor (e.g. MLP), not a built "
                         "module: train_model seeds before building it, so that runs start from the same weights.")
    if isinstance(model, str):
        check_choice("model", model, tuple(MODELS))
        return
    check_callable("model", model, _MODEL_ARG)
    try:
        inspect.signature(model).bind()
    except TypeError as exc:
        raise ValueError(f"model={short_repr(model)} cannot be called without arguments ({exc}): "
                         f"use {_MODEL_ARG}.") from exc
    except ValueError:  # no signature to read (some built-in callables): the call will tell
        pass


def _build(model: Union[str, Callable[[], nn.Module]]) -> nn.Module:
    """The module ``train_model`` trains, built by name or by its constructor."""
    if isinstance(model, str):
        return make_model(model)
    net = model()
    if not isinstance(net, nn.Module):
        raise ValueError(f"model={short_repr(model)} returned {short_repr(net)}, not a torch.nn.Module: "
                         f"use {_MODEL_ARG}.")
    return net


def _check_grid(name: str, values, allow_zero: bool) -> list[float]:
    """A sweep axis: a non-empty list of positive (or non-negative) numbers."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name}={short_repr(values)} is not allowed: use a list of numbers, e.g. [1e-3, 1e-2].")
    values = list(values)
    for value in values:
        check_positive(f"{name} entry", value, allow_zero=allow_zero)
    return values


def sweep(
    model: Union[str, Callable[[], nn.Module]],
    method: str,
    train: Dataset,
    val: Dataset,
    lrs: Sequence[float],
    decays: Sequence[float] = (1e-4,),
    *,
    progress: bool = True,
    **kwargs,
) -> pd.DataFrame:
    """Train one run per (learning rate, decay) and score it on every sample of ``val``.

    Every run uses the same seed, so it starts from the same weights and sees the same
    batches; only the hyper-parameters differ. Returns one row per run with the final
    ``val_loss`` and ``val_accuracy`` (NaN when the run diverged), ``diverged`` and the
    training seconds. ``kwargs`` go to ``train_model`` (epochs, batch_size, seed, ...).
    """
    grid = [(lr, decay) for decay in _check_grid("decays", decays, True) for lr in _check_grid("lrs", lrs, False)]
    if not grid:
        raise ValueError("lrs and decays must each hold at least one value.")
    rows = []
    for lr, decay in tqdm(grid, desc=f"{method} sweep", disable=not progress, leave=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # divergence is a result here, recorded below
            _, history = train_model(model, method, train, {"val": val}, lr=float(lr), decay=float(decay),
                                     progress=False, **kwargs)
        last = history.epochs[-1]
        rows.append({"method": method, "lr": float(lr), "decay": float(decay),
                     "val_loss": math.nan if history.diverged else last["val_loss"],
                     "val_accuracy": math.nan if history.diverged else last["val_accuracy"],
                     "diverged": history.diverged, "train_seconds": last["train_seconds"]})
    return pd.DataFrame(rows)


_RESULTS = "a table of runs, one row each, as fgtutor.train.sweep or fgtutor.analysis.search_table make it"


def best_run(results: pd.DataFrame, metric: str = "val_loss") -> pd.Series:
    """The row of ``sweep`` results with the lowest ``metric`` among runs that did not diverge."""
    check_frame("results", results, ["diverged", metric], _RESULTS)
    if results.empty:
        raise ValueError("results has no rows: there is no run to choose from (was it filtered to nothing?).")
    finite = results[~results["diverged"] & results[metric].notna()]
    if finite.empty:
        raise ValueError("every run in the sweep diverged: try smaller learning rates.")
    return finite.loc[finite[metric].idxmin()]


def at_grid_edge(results: pd.DataFrame, best: pd.Series, column: str = "lr") -> bool:
    """True when ``best[column]`` is the smallest or largest value of the grid: the true
    optimum may then lie outside it."""
    check_frame("results", results, [column], _RESULTS)
    if not isinstance(best, pd.Series) or column not in best.index:
        raise ValueError(f"best={short_repr(best)} is not allowed: use a row of results with a {column!r} "
                         "entry, e.g. best_run(results).")
    values = sorted(results[column].unique())
    return len(values) > 1 and best[column] in (values[0], values[-1])
