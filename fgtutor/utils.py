"""Small shared helpers: argument checks, seeding (the one place seeds are set), devices."""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def check_positive(name: str, value, *, allow_zero: bool = False, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a positive (or ≥ 0) number."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "integer" if integer else "number"
        raise ValueError(f"{name}={value!r} is not allowed: use a {'non-negative' if allow_zero else 'positive'} {what}.")


def short_repr(value) -> str:
    """``repr(value)``, or ``<a TYPE>`` when that is too long for one line of an error message."""
    text = repr(value)
    return text if len(text) <= 60 else f"<a {type(value).__name__}>"


def check_type(name: str, value, kind, what: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an instance of ``kind``."""
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{name}={short_repr(value)} is not allowed: use {what}.")


def check_callable(name: str, value, what: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` can be called (a function, a class)."""
    if not callable(value):
        raise ValueError(f"{name}={short_repr(value)} is not allowed: use {what}.")


def check_number(name: str, value) -> float:
    """A real number (a Python or NumPy number, or a one-element tensor; NaN allowed: a
    missing score) as a float, else ``ValueError`` naming ``name``."""
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}={short_repr(value)} is not allowed: use a number.") from None


def check_pair(name: str, value, what: str = "two numbers (x, y)") -> tuple[float, float]:
    """Two finite numbers (a tuple, list, array or 2-element tensor) as floats, else
    ``ValueError`` naming ``name``: a point or an axis range, checked before it is unpacked."""
    try:  # a string iterates too, but its characters are no coordinates
        pair = () if isinstance(value, (str, bytes)) else tuple(float(v) for v in value)
    except (TypeError, ValueError, RuntimeError):  # not iterable, not numbers, a tensor entry of several numbers
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
        raise ValueError(f"{name}={short_repr(value)} is not allowed: use {what}.")
    return pair


def check_frame(name: str, frame, columns, what: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``frame`` is a pandas DataFrame that has
    every one of ``columns`` (checked here, so that a missing one is not a bare KeyError)."""
    import pandas as pd  # only the functions that take tables need it

    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name}={short_repr(frame)} is not allowed: use {what}.")
    missing = [c for c in columns if not isinstance(c, str) or c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns)) or "no columns"
        raise ValueError(f"{name} has no column {', '.join(map(repr, missing))} (it has {have}): use {what}.")


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """``ValueError`` unless ``x`` and ``y`` are tensors: what an estimator's call needs
    before anything can be said about their shapes."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"x and y must be tensors (a batch of inputs and its integer labels), got "
                         f"{type(x).__name__} and {type(y).__name__}.")


def check_generator(generator) -> None:
    """``None`` or a ``torch.Generator``, else ``ValueError``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r} is not allowed: use None or a torch.Generator, "
                         "e.g. torch.Generator().manual_seed(0).")


def check_choice(name: str, value, allowed) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: use one of {', '.join(map(repr, allowed))}.")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Run the block with ``dtype`` as torch's default floating-point type (new modules and
    tensors are made in it), and put the previous default back afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def kept_rng():
    """Run the block with Python's, NumPy's and PyTorch's random number generators put back
    as they were afterwards (CPU and every GPU), so that what it draws changes no later draw."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) from one integer; returns it.

    Call it once at the top of a run and record the value (``fit`` stores it in the
    history). Model initialisation then depends on ``seed`` only.
    """
    check_positive("seed", seed, allow_zero=True, integer=True)
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    # (PYTHONHASHSEED only acts when set before the interpreter starts; nothing here hashes
    # strings into results, so it is left alone)
    return seed


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private random stream (data order, tangents) that leaves the global RNG alone."""
    check_positive("seed", seed, allow_zero=True, integer=True)
    return torch.Generator(device=device).manual_seed(int(seed))


def pick_device(name: str = "auto") -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda" | "mps"`` to a device that exists on this machine.

    ``"auto"`` prefers CUDA, then Apple's MPS, then the CPU. Asking for a device that is
    absent raises ``ValueError`` saying so, instead of failing later inside a kernel.
    """
    if name not in DEVICES and not (isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device={name!r} is not allowed: use one of {', '.join(DEVICES)} (or 'cuda:N').")
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r} was asked for, but PyTorch sees no CUDA GPU here "
                f"(torch {torch.__version__}). Use device='auto' or 'cpu', or in Colab choose "
                "Runtime > Change runtime type > GPU."
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    if name == "mps" and not mps_ok:
        raise ValueError("device='mps' was asked for, but Apple's MPS backend is not available here; use 'auto' or 'cpu'.")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def check_seeds(name: str, seeds) -> list[int]:
    """A non-empty list of distinct non-negative integer seeds, or ``ValueError`` naming ``name``."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise ValueError(f"{name}={seeds!r} is not allowed: use a list of seeds, e.g. [0, 1, 2].")
    seeds = list(seeds)
    for seed in seeds:
        check_positive(f"{name} entry", seed, allow_zero=True, integer=True)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{name}={seeds!r} is not allowed: use a non-empty list of distinct seeds, e.g. [0, 1, 2].")
    return [int(s) for s in seeds]


def check_writable(name: str, path: Union[str, Path], not_same_as: Union[str, Path, None] = None) -> Path:
    """Check, before any work is done, that a result can be written to ``path``: it is
    not a directory, its folder exists or can be made and is writable, and it is not
    ``not_same_as`` (e.g. the input it would overwrite). ``ValueError`` names ``name``."""
    check_type(name, path, (str, os.PathLike), "a file path (a str or pathlib.Path)")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a directory: give a file name, e.g. {path / 'out'}.")
    if not_same_as is not None and path.resolve() == Path(not_same_as).resolve():
        raise ValueError(f"{name}={str(path)!r} is the input itself and would overwrite it: choose another path.")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"{name}={str(path)!r} cannot be written: {folder} is not a writable folder.")
    return path


def atomic_write(path: Union[str, Path], data: Union[bytes, str]) -> Path:
    """Write ``data`` to ``path`` all at once or not at all: into a temporary file beside
    it, then renamed over it, so a reader (or a crash) never sees half a file. The file
    gets the usual permissions (0666 minus the umask), not the temporary file's 0600."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give a file name to write to.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is still running (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process: alive
        return True
    return True


def staging_dir(folder: Path, name: str) -> Path:
    """A new temporary folder ``.fgtutor-<name>-<pid>-*`` inside ``folder`` (same filesystem,
    so that moving its contents into place is an atomic rename), after removing those left
    by processes that are gone (killed with SIGKILL, they could not clean up after
    themselves)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f".fgtutor-{name}-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".fgtutor-{name}-{os.getpid()}-", dir=folder))

