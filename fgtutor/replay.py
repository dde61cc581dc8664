r"""Replay: can today's code still produce a stored run, on this CPU or any other?

A stored run keeps its first float32 step losses exactly (``first_steps``). They are a
perfect check on the machine that made them and a poor one anywhere else: another CPU's
vector kernels round differently, and at a large learning rate those last-bit
differences grow to 1e-3 within 50 steps. At a forward gradient's small rate the
opposite goes wrong: a learning rate 1% too large moves the step losses by less than
that noise. So a replay checks two things:

* **on the same machine** (same CPU, vector instructions, kernels, thread count:
  ``kernels()`` is recorded in the run's provenance), the float32 step losses, exactly;
* **anywhere**, a *fingerprint*: the first ``FINGERPRINT_STEPS`` steps retraced in
  float64 from float64 initial weights (``fingerprint``), which records

  .. math::

     L_1, \dots, L_N, \qquad \|\theta_N - \theta_0\|, \qquad
     \langle \theta_N - \theta_0, r_j \rangle / \sqrt{n} \quad (j = 1, \dots, J),

  with fixed random sign vectors :math:`r_j`. Float64 rounds about 10⁹ times finer than
  float32, so another CPU moves these by ~1e-13, while a real change to the code moves
  the displacement by about as much as it changes the steps: 7e-3 for a 1% learning
  rate, 8e-5 for a decay 10% off after 20 steps. ``FINGERPRINT_RTOL`` sits between.
  On another machine the first float32 loss (``LOOSE_STEPS``), at the initial weights,
  must also agree to ``LOOSE_RTOL``: it depends on no training dynamics, only on the
  model, data and loss.

Runs stored before fingerprints existed get theirs from ``add_fingerprints``
(``python -m fgtutor.replay --add-fingerprints``), computed by committed code and
recorded with its own provenance; a run's configuration, and so its file name, is
unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import re
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from . import store
from .train import train_model
from .utils import check_positive, check_type, default_dtype

FINGERPRINT_STEPS = 20
#: the fingerprint's tolerance (relative): measured cross-kernel noise is below 4e-13
#: after 20 steps (ATEN_CPU_CAPABILITY=default or AVX2 against AVX-512), and the
#: smallest real change tried moves it by 1e-5 or more
FINGERPRINT_RTOL = 1e-9
FINGERPRINT_SEED = 20_221_217  # the sign vectors r_j; any fixed number will do
PROJECTIONS = 3
#: float32 steps compared on another machine, and their tolerance: the first loss, before
#: any update, moves by below 1e-6 there (9.4e-7 worst over the 89 runs of 2026-12-03 under
#: other kernels: a margin of 100). Later float32 steps are dynamics, which the fingerprint
#: checks: Adam's first update divides each gradient entry by its own size, so an entry that
#: is rounding noise (a sum that cancels) steps by ±lr on either CPU. Measured: LG-FG-A on
#: the LocalConvNet, Adam at 3e-3, step 2 moved by 6e-7 and step 3 by 1e-4 under
#: ATEN_CPU_CAPABILITY=default, while its fingerprint agreed to 1.5e-14
LOOSE_STEPS, LOOSE_RTOL = 1, 1e-4
#: environment variables that choose other kernels: recorded when set
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "DNNL_MAX_CPU_ISA",
              "ONEDNN_MAX_CPU_ISA", "MKL_DEBUG_CPU_TYPE")


class StaleRunError(AssertionError):
    """Today's code no longer produces a stored run."""


# ---------------------------------------------------------------------------
# What decides a float32 run's last bits
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def _simd_flags() -> list[str]:
    """The CPU's vector-instruction flags (x86 ``flags`` or Arm ``Features``)."""
    info = _cpuinfo()
    flags = (info.get("flags") or info.get("Features") or "").split()
    return sorted(f for f in flags if re.match(r"(sse|ssse|avx|fma|f16c|amx|neon|asimd|sve|sme)", f))


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, Optional[str]]:
    shown = torch.__config__.show()

    def version(pattern: str) -> Optional[str]:
        found = re.search(pattern, shown)
        return found.group(1) if found else None

    return {"mkl": version(r"Math Kernel Library Version ([\w.\-]+)"), "onednn": version(r"MKL-DNN (v[\w.]+)")}


def kernels() -> dict:
    """What decides the last bits of a float32 run on this machine: the CPU model and its
    vector instructions, the kernels torch dispatches to (its CPU capability, MKL and
    oneDNN versions), torch itself, the thread count, and the environment variables that
    pick other kernels (``KERNEL_ENV``, when set). Two machines with equal ``kernels()``
    replay each other's runs exactly."""
    info = _cpuinfo()
    model = info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()
    return {"cpu_model": model, "simd": _simd_flags(), "capability": torch.backends.cpu.get_cpu_capability(),
            **_library_versions(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    """Run with ``n`` CPU threads (a replay sums in the run's own order), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# The fingerprint
# ---------------------------------------------------------------------------

def _vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fingerprint(config: dict, steps: int = FINGERPRINT_STEPS) -> dict:
    r"""The first ``steps`` steps of the run ``config`` retraced in float64, from initial
    weights drawn in float64 (float32 initial weights already differ in their last bit
    between CPUs): the step losses, the displacement :math:`\|\theta_N - \theta_0\|` and
    ``PROJECTIONS`` projections :math:`\langle \theta_N - \theta_0, r_j\rangle/\sqrt n` on
    fixed ±1 vectors. Same seeds, batches, tangents and schedule as the run itself."""
    check_positive("steps", steps, integer=True)
    check_type("config", config, dict, "a run configuration: a dict from fgtutor.store.run_config(...)")
    config = store.run_config(**config)
    (X, Y), _ = store.config_data(config)
    start: dict = {}

    def build() -> torch.nn.Module:
        with default_dtype(torch.float64):
            model = store.model_constructor(config)()
        start["theta"] = _vector(model).clone()
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverged replay is compared like any other
        model, history = train_model(build, config["method"], (X.double(), Y), {}, progress=False, device="cpu",
                                     max_steps=steps, **store.fit_kwargs(config))
    delta = _vector(model) - start["theta"]
    signs = torch.randint(0, 2, (PROJECTIONS, delta.numel()), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(FINGERPRINT_SEED)).mul_(2).sub_(1)
    return {"steps": steps, "loss": history.step_loss, "displacement": delta.norm().item(),
            "projections": (signs @ delta / math.sqrt(delta.numel())).tolist()}


def fingerprint_difference(stored: dict, replayed: dict) -> float:
    """The largest relative difference between two fingerprints: losses relative to
    themselves, the displacement to itself and the projections to the displacement (they
    are at most that in size). Infinite when they have different lengths, or one is
    finite where the other is not."""
    if len(stored["loss"]) != len(replayed["loss"]):
        return math.inf
    scale = stored["displacement"]
    pairs = [*zip(stored["loss"], replayed["loss"]), (stored["displacement"], replayed["displacement"])]
    worst = max(_relative(a, b) for a, b in pairs)
    return max([worst, *(_relative(a, b, scale) for a, b in zip(stored["projections"], replayed["projections"]))])


# ---------------------------------------------------------------------------
# Replaying a stored run
# ---------------------------------------------------------------------------

def replay(path: Union[str, Path], steps: int = 50) -> tuple[list[float], list[float]]:
    """Retrain the first ``steps`` float32 steps of the run stored at ``path`` with its
    seeds and its number of CPU threads, and return ``(stored, replayed)`` step losses."""
    record = store.read(path)
    with _threads(record["provenance"].get("threads")):
        return _replay_float32(record, steps)


def _replay_float32(record: dict, steps: int) -> tuple[list[float], list[float]]:
    config, stored = record["config"], record["first_steps"][:steps]
    (X, Y), _ = store.config_data(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, history = train_model(store.model_constructor(config), config["method"], (X, Y), {}, progress=False,
                                 device="cpu", max_steps=len(stored), **store.fit_kwargs(config))
    return stored, history.step_loss


def _relative(a: float, b: float, scale: Optional[float] = None) -> float:
    """``|a − b|`` relative to ``|scale|`` (default ``|a|``): 0 when both are NaN (diverged
    at the same step), infinite when only one is finite."""
    if math.isnan(a) and math.isnan(b) or a == b:
        return 0.0
    size = abs(a if scale is None else scale)
    return abs(a - b) / max(size, 1e-300) if math.isfinite(a - b) else math.inf


def same_machine(record: dict) -> bool:
    """Whether this machine, at the run's thread count, has the ``kernels()`` of one that
    made the run's float32 steps, or reproduced them exactly when it added the fingerprint."""
    fp = record.get("fingerprint", {}).get("provenance", {})
    made = [record["provenance"].get("kernels"), fp.get("kernels") if fp.get("float32_exact") else None]
    with _threads(record["provenance"].get("threads")):
        here = kernels()
    return here in [k for k in made if k]


def check_replay(path: Union[str, Path], steps: int = 50) -> dict:
    """Replay the run stored at ``path`` and raise ``StaleRunError`` naming the file when
    today's code no longer produces it.

    On the machine that made it (``same_machine``) the first ``steps`` float32 step
    losses must be exactly the stored ones. Elsewhere the first ``LOOSE_STEPS`` (one) must agree
    to ``LOOSE_RTOL``. Everywhere the float64 fingerprint must agree to
    ``FINGERPRINT_RTOL``. Returns what was compared: ``exact`` (same machine),
    ``float32`` (largest relative difference of the float32 steps compared),
    ``float32_steps`` and ``fingerprint`` (``fingerprint_difference``)."""
    check_positive("steps", steps, integer=True)
    record = store.read(path)
    exact = same_machine(record)
    fix = "run `make results RETRAIN=1` (or delete the file and `make results`)."
    with _threads(record["provenance"].get("threads")):
        stored, replayed = _replay_float32(record, steps if exact else min(steps, LOOSE_STEPS))
        if "fingerprint" not in record and not exact:
            raise StaleRunError(f"{path} has no fingerprint, and this machine is not the one that made it, so its "
                                "float32 steps cannot be compared exactly: add one with "
                                "`python -m fgtutor.replay --add-fingerprints` on committed code.")
        fp = record.get("fingerprint")
        fp_diff = fingerprint_difference(fp, fingerprint(record["config"], fp["steps"])) if fp else None
    tolerance = 0.0 if exact else LOOSE_RTOL
    diffs = [_relative(a, b) for a, b in zip(stored, replayed)]
    for i, diff in enumerate(diffs):
        if not diff <= tolerance:
            where = "exactly, on the machine that made it" if exact else f"to {LOOSE_RTOL:g} on another machine"
            raise StaleRunError(f"{path}: float32 step {i + 1} of the replay has loss {replayed[i]:.9g}, the stored "
                                f"run {stored[i]:.9g}; they must agree {where}. Today's code no longer produces this "
                                f"run: {fix}")
    if len(replayed) < len(stored):
        raise StaleRunError(f"{path}: the replay stopped after {len(replayed)} of {len(stored)} steps: {fix}")
    if fp_diff is not None and not fp_diff <= FINGERPRINT_RTOL:
        raise StaleRunError(f"{path}: the float64 fingerprint of the first {fp['steps']} steps differs by {fp_diff:.2g} "
                            f"(relative; another CPU moves it by ~1e-13, the tolerance is {FINGERPRINT_RTOL:g}). "
                            f"Today's code no longer produces this run: {fix}")
    return {"exact": exact, "float32": max(diffs, default=0.0), "float32_steps": len(diffs), "fingerprint": fp_diff}


# ---------------------------------------------------------------------------
# Fingerprints for runs stored before them
# ---------------------------------------------------------------------------

def fingerprint_record(config: dict, float32_exact: bool) -> dict:
    """A fingerprint with its provenance: who computed it, with what, where and when, and
    whether this machine reproduced the run's float32 steps exactly (then it replays them
    exactly later, like the machine that made the run)."""
    return {**fingerprint(config), "provenance": {
        "commit": store.git("rev-parse", "HEAD"), "dirty": store.code_is_dirty(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
        "kernels": kernels(), "float32_exact": float32_exact}}


def add_fingerprints(root: Union[str, Path, None] = None, steps: int = 50, progress: bool = True) -> list[Path]:
    """Give every stored run under ``root`` that lacks one its fingerprint, computed by
    today's code, after checking that today's code gives its first ``LOOSE_STEPS`` float32
    steps (to ``LOOSE_RTOL``; whether the first ``steps`` are exact is recorded). Each file
    is rewritten atomically; its configuration, and so its name, is unchanged. Returns the
    files changed."""
    changed = []
    for path in store.stored_paths(root):
        record = store.read(path)
        if "fingerprint" in record:
            continue
        with _threads(record["provenance"].get("threads")):
            stored, replayed = _replay_float32(record, steps)
            diffs = [_relative(a, b) for a, b in zip(stored, replayed)]
            loose = max(diffs[:LOOSE_STEPS], default=0.0)
            if not loose <= LOOSE_RTOL or len(replayed) < min(len(stored), LOOSE_STEPS):
                raise StaleRunError(f"{path}: today's code does not give its first float32 steps (relative "
                                    f"difference {loose:.2g}), so it cannot vouch for it with a fingerprint.")
            exact = len(replayed) == len(stored) and max(diffs, default=0.0) == 0
            record["fingerprint"] = fingerprint_record(record["config"], exact)
        store.write_record(path, record)
        changed.append(path)
        if progress:
            print(f"fingerprinted {path} (float32: {'exact' if exact else f'{max(diffs):.1g} over {len(diffs)} steps'})",
                  flush=True)
    return changed


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgtutor.replay", description=(
        "Replay stored runs with today's code (exactly on the machine that made them, by their float64 "
        "fingerprint anywhere), or give runs stored before fingerprints existed theirs."))
    parser.add_argument("runs", nargs="*", help="stored run files (default: every run in results/)")
    parser.add_argument("--steps", type=int, default=50, help="float32 steps compared on the same machine")
    parser.add_argument("--add-fingerprints", action="store_true",
                        help="add a fingerprint to every stored run without one (needs committed code)")
    args = parser.parse_args(argv)
    try:
        check_positive("--steps", args.steps, integer=True)
        paths = [Path(p) for p in args.runs] or store.stored_paths()
        for path in paths:
            if not path.is_file():
                raise ValueError(f"{path} is not a stored run file.")
        if args.add_fingerprints and store.code_is_dirty():
            raise ValueError("fgtutor/ has uncommitted changes: fingerprints must come from committed code. Commit first.")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.add_fingerprints:
        add_fingerprints()
        return 0
    failed = 0
    for path in paths:
        try:
            report = check_replay(path, args.steps)
        except (StaleRunError, store.CorruptRunError) as exc:
            failed += 1
            print(f"STALE {exc}")
            continue
        fp = "none" if report["fingerprint"] is None else f"{report['fingerprint']:.1e}"
        print(f"ok    {path}: {'exact' if report['exact'] else 'other machine'}, float32 {report['float32']:.1e} "
              f"over {report['float32_steps']} steps, fingerprint {fp}", flush=True)
    print(f"{len(paths) - failed} of {len(paths)} stored runs replay")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
