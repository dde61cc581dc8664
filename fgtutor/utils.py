"""Small shared helpers: argument checks, seeding (the one place seeds are set), devices."""
from __future__ import annotations

import math
import numbers
import os
import random

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


def check_choice(name: str, value, allowed) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: use one of {', '.join(map(repr, allowed))}.")


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
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private random stream (data order, tangents) that leaves the global RNG alone."""
    return torch.Generator(device=device).manual_seed(int(seed))


def pick_device(name: str = "auto") -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda" | "mps"`` to a device that exists on this machine.

    ``"auto"`` prefers CUDA, then Apple's MPS, then the CPU. Asking for a device that is
    absent raises ``ValueError`` saying so, instead of failing later inside a kernel.
    """
    if name not in DEVICES and not (isinstance(name, str) and name.startswith("cuda:")):
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
