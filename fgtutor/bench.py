r"""What a training step costs: ``python -m fgtutor.bench`` (or ``make bench``).

For each model, on the same batch and device, after warm-up, the median of repeated calls:

* ``forward``: one forward pass (no gradient);
* ``backprop``: a backprop training step (forward, backward, ``optimizer.step()``);
* ``forward gradient``: a forward-gradient training step as ``fit`` runs it (tangents,
  forward-mode pass, gradient, ``optimizer.step()``), and its three parts;
* ``torch.func``: the same step through ``torch.func.jvp`` instead of the fast path;
* ``estimators``: a training step of each estimator of ``fgtutor.activity`` beside
  backprop's, on the MLP (weight perturbation with 1 and 4 tangents, activity
  perturbation, and the zeroth-order estimates of ``fgtutor.zeroth``: SPSA into
  ``p.grad`` on perturbed copies, and MeZO in place with its fused step) and the
  ``LocalMLP`` (local losses, and backprop of the same model); and on the ConvNet,
  backprop, weight and activity perturbation, and the ``LocalConvNet``'s local losses.

From these, the paper's cost ratios :math:`R_f` = forward-gradient step / forward pass and
:math:`R_b` = backprop step / forward pass. It also measures the peak extra memory of one
step (in a fresh process per configuration; backprop, forward gradient and MeZO) and one
epoch of data loading, in memory vs a torchvision ``DataLoader`` with ``ToTensor``. It
prints tables and writes the numbers as JSON with the machine, torch version and thread
count. Timings live here, never in tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from .data import batches, default_root, load_mnist
from .activity import ActivityGradient
from .forward import ForwardGradient
from .tangents import SAMPLERS, rademacher_
from .losses import cross_entropy
from .models import MODELS, make_model
from .optim import forward_step, sgd_along
from .utils import atomic_write, check_choice, check_positive, check_writable, pick_device, synchronize
from .zeroth import SAMPLERS as ZEROTH_SAMPLERS, ZerothOrderGradient, zeroth_step

LR = 1e-6  # tiny, so that the weights barely move while they are timed
PARTS = ("sample tangents", "forward-mode pass", "update")


def _setup(model_name: str, batch: int, device: torch.device, seed: int = 0):
    """A model, its SGD, and one random MNIST-shaped batch on ``device``."""
    torch.manual_seed(seed)
    model = make_model(model_name).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, optimizer, x, y


def step_functions(model_name: str, batch: int, device: torch.device, sampler: str = "rademacher",
                   torch_func: bool = True) -> dict[str, Callable[[], object]]:
    """The calls that are timed, keyed by name (see the module docstring)."""
    model, optimizer, x, y = _setup(model_name, batch, device)
    estimate = ForwardGradient(model, cross_entropy, sampler=sampler)
    slow = ForwardGradient(model, cross_entropy, sampler=sampler, fast=False)
    tangents = estimate.sample()  # dense views of p.grad, or rank-one factors
    with torch.no_grad():
        _, dd = estimate.directional_derivative(tangents, x, y)
    lr = optimizer.param_groups[0]["lr"]

    def forward():
        with torch.no_grad():
            model(x)

    def backprop():
        optimizer.zero_grad()
        cross_entropy(model(x), y).backward()
        optimizer.step()

    def forward_gradient():  # what fit runs for plain SGD
        forward_step(estimate, optimizer, x, y)

    def torch_func_step():  # the straightforward way: torch.func.jvp, then optimizer.step()
        slow(x, y)
        optimizer.step()

    def sample():
        estimate.sample()

    def jvp():
        with torch.no_grad():
            estimate.directional_derivative(tangents, x, y)

    def update():
        if sampler == "rank1":
            estimate.descend_(lr * dd.item())
        else:
            sgd_along(optimizer, dd)

    fns = {"forward": forward, "backprop": backprop, "forward gradient": forward_gradient,
           "sample tangents": sample, "forward-mode pass": jvp, "update": update}
    if torch_func:
        fns["torch.func"] = torch_func_step
    return fns


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
              rounds: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each function. Calls are interleaved in ``rounds`` so
    that a burst of load from elsewhere on the machine hits every function alike."""
    times: dict[str, list] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def measure_steps(models=("mlp", "convnet"), batch: int = 64, repeats: int = 30, warmup: int = 5,
                  device: str = "auto", sampler: str = "rademacher", torch_func: bool = True,
                  progress: Optional[Callable[[str], None]] = print) -> pd.DataFrame:
    """One row per model: median ms of every step and part, and the cost ratios."""
    dev = pick_device(device)
    rows = []
    for name in models:
        check_choice("model", name, tuple(MODELS))
        if progress:
            progress(f"timing {name} at batch {batch} on {dev} ...")
        ms = median_ms(step_functions(name, batch, dev, sampler, torch_func), repeats, warmup, dev)
        row = {"model": name, "batch": batch, **{f"{k} ms": v for k, v in ms.items()}}
        row["R_f"] = ms["forward gradient"] / ms["forward"]
        row["R_b"] = ms["backprop"] / ms["forward"]
        row["forward gradient / backprop"] = ms["forward gradient"] / ms["backprop"]
        if torch_func:
            row["torch.func / backprop"] = ms["torch.func"] / ms["backprop"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def estimator_steps(batch: int, device: torch.device, num_tangents: int = 4) -> dict[str, Callable[[], object]]:
    """A plain-SGD training step of every estimator, keyed by name: backprop, weight
    perturbation (1 and ``num_tangents`` tangents), activity perturbation and the
    zeroth-order estimates (SPSA on perturbed copies into ``p.grad``, then
    ``optimizer.step()``; MeZO in place with its fused step), all with Rademacher
    directions, on the MLP; local losses (LG-FG-A) and backprop on the ``LocalMLP``."""
    fns = {}
    for model_name in ("mlp", "local_mlp"):
        model, optimizer, x, y = _setup(model_name, batch, device)
        tag = "" if model_name == "mlp" else ", local MLP"
        fns[f"backprop{tag}"] = _backprop_step(model, optimizer, x, y)
        if model_name == "mlp":
            for k in (1, num_tangents):
                estimate = ForwardGradient(model, cross_entropy, num_tangents=k)
                fns[f"FG-W ×{k}"] = lambda e=estimate, o=optimizer, x=x, y=y: forward_step(e, o, x, y)
            fns["FG-A"] = _activity_step(model, optimizer, x, y)
            for name, in_place in (("SPSA ×1", False), ("MeZO ×1", True)):
                estimate = ZerothOrderGradient(model, cross_entropy, sampler="rademacher", in_place=in_place)
                fns[name] = lambda e=estimate, o=optimizer, x=x, y=y: zeroth_step(e, o, x, y)
        else:
            fns["LG-FG-A"] = _activity_step(model, optimizer, x, y)
    return fns


def convnet_estimator_steps(batch: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """The ConvNet's training steps, keyed by name (plain SGD, Rademacher tangents):
    backprop, weight perturbation (FG-W), activity perturbation on every convolution's
    and linear layer's output (FG-A), and on the ``LocalConvNet`` its local losses
    (LG-FG-A) and backprop of the same model."""
    fns = {}
    model, optimizer, x, y = _setup("convnet", batch, device)
    fns["backprop"] = _backprop_step(model, optimizer, x, y)
    estimate = ForwardGradient(model, cross_entropy)
    fns["FG-W ×1"] = lambda: forward_step(estimate, optimizer, x, y)
    fns["FG-A"] = _activity_step(model, optimizer, x, y)
    local, local_optimizer, x, y = _setup("local_convnet", batch, device)
    fns["LG-FG-A"] = _activity_step(local, local_optimizer, x, y)
    fns["backprop, local ConvNet"] = _backprop_step(local, local_optimizer, x, y)
    return fns


def _backprop_step(model, optimizer, x, y) -> Callable[[], None]:
    def step():
        optimizer.zero_grad()
        cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def _activity_step(model, optimizer, x, y) -> Callable[[], None]:
    estimate = ActivityGradient(model)

    def step():
        estimate(x, y)
        optimizer.step()
    return step


ESTIMATOR_MODELS = {"mlp": estimator_steps, "convnet": convnet_estimator_steps}


def measure_estimators(batch: int = 64, repeats: int = 30, warmup: int = 5, device: str = "auto",
                       model: str = "mlp") -> pd.DataFrame:
    """Median ms of a training step of every estimator on ``model`` (``"mlp"``:
    ``estimator_steps``; ``"convnet"``: ``convnet_estimator_steps``) and its ratio to
    that model's backprop step."""
    check_choice("model", model, tuple(ESTIMATOR_MODELS))
    dev = pick_device(device)
    ms = median_ms(ESTIMATOR_MODELS[model](batch, dev), repeats, warmup, dev)
    frame = pd.DataFrame({"ms": ms})
    frame["× backprop step"] = frame["ms"] / ms["backprop"]
    frame.index.name = f"batch {batch}"
    return frame


def measure_sampling(n: int = 1_863_690, repeats: int = 30, warmup: int = 3, device: str = "auto") -> pd.Series:
    """Median ms to fill ``n`` floats (the MLP's size by default) with a random tangent:
    Gaussian ``normal_``, Rademacher through ``bernoulli_`` (a float per sign) and
    Rademacher from random bits (``fgtutor.tangents.rademacher_``, a bit per sign)."""
    dev = pick_device(device)
    buffer = torch.empty(n, device=dev)
    fns = {"gaussian normal_": lambda: buffer.normal_(),
           "rademacher via bernoulli_": lambda: buffer.bernoulli_(0.5).mul_(2).sub_(1),
           "rademacher from bits (fgtutor)": lambda: rademacher_(buffer)}
    return pd.Series(median_ms(fns, repeats, warmup, dev), name="ms")


# --- memory ---------------------------------------------------------------------------------


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _probe_memory(model_name: str, method: str, batch: int, device: str, sampler: str) -> float:
    """Peak extra memory (MB) of one training step, measured in this (fresh) process.
    ``method="inference"`` is one forward pass without gradients, the floor a training
    step can reach; ``method="zeroth"`` is a MeZO step (in place, fused SGD; Rademacher directions unless
    ``sampler`` is ``"gaussian"``)."""
    dev = pick_device(device)
    # one step of a throwaway copy first: the kernels' code and the libraries' workspaces
    # (a first call pages in megabytes of libtorch) are then resident for every method alike,
    # and what is measured is what a step of training allocates, its persistent buffers
    # (.grad, p.grad of an estimate) included, since the measured model starts cold
    _probe_step(model_name, method, batch, dev, sampler)()
    gc.collect()
    step = _probe_step(model_name, method, batch, dev, sampler)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    before = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    step()
    return _rss_mb("VmHWM") - before


def _probe_step(model_name: str, method: str, batch: int, dev: torch.device, sampler: str) -> Callable[[], None]:
    """One training step of ``method`` on a fresh model and batch (see ``_probe_memory``)."""
    model, optimizer, x, y = _setup(model_name, batch, dev)
    if method == "zeroth":
        estimate = ZerothOrderGradient(model, cross_entropy, in_place=True,
                                       sampler=sampler if sampler in ZEROTH_SAMPLERS else "rademacher")
    else:
        estimate = ForwardGradient(model, cross_entropy, sampler=sampler)

    def step():
        if method == "inference":  # the reference: one forward pass, no gradient
            with torch.no_grad():
                model(x)
        elif method == "forward":
            forward_step(estimate, optimizer, x, y)
        elif method == "zeroth":
            zeroth_step(estimate, optimizer, x, y)
        else:
            optimizer.zero_grad()
            cross_entropy(model(x), y).backward()
            optimizer.step()
        synchronize(dev)

    return step


MEMORY_METHODS = ("backprop", "forward", "zeroth", "inference")


def measure_memory(models=("mlp", "convnet"), batches=(64, 4096), device: str = "auto",
                   sampler: str = "rademacher", progress: Optional[Callable[[str], None]] = print,
                   methods=("backprop", "forward")) -> pd.DataFrame:
    """Peak extra memory (MB) of one step per model, method and batch size, each measured in
    a fresh Python process so that no earlier allocation hides it. On the CPU this reads the
    process's peak resident size (Linux only); on CUDA, the allocator's peak. ``methods``
    (from ``MEMORY_METHODS``; backprop is always measured, as the reference) adds a
    ``<method> MB`` column and its ratio ``<method> / backprop`` for each."""
    methods = ["backprop", *(m for m in methods if m != "backprop")]
    for method in methods:
        check_choice("methods entry", method, MEMORY_METHODS)
    dev = pick_device(device)
    if dev.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("CPU memory is measured through /proc (Linux); use --skip memory here.")
    # large tensors straight from mmap, so that freed memory leaves the resident set
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for name in models:
        for batch in batches:
            row = {"model": name, "batch": batch}
            for method in methods:
                if progress:
                    progress(f"memory of one {method} step: {name}, batch {batch} ...")
                out = subprocess.run([sys.executable, "-m", "fgtutor.bench", "--probe-memory", name, method,
                                      str(batch), str(dev), sampler], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise RuntimeError(f"memory probe failed for {name} {method} {batch}:\n{out.stderr[-2000:]}")
                row[f"{method} MB"] = float(out.stdout.strip().splitlines()[-1])
            for method in methods[1:]:
                row[f"{method} / backprop"] = row[f"{method} MB"] / row["backprop MB"]
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "batch"])


# --- data loading -----------------------------------------------------------------------------


def measure_loading(n_images: int = 50_000, batch: int = 64, root: Optional[str] = None) -> pd.DataFrame:
    """Seconds to iterate ``n_images`` training images once in batches: indexing tensors held
    in memory (``fgtutor.data.batches``) vs torchvision's ``MNIST`` + ``ToTensor`` +
    ``DataLoader`` over the same files."""
    import torchvision
    from torch.utils.data import DataLoader, Subset

    X, Y = load_mnist(root)
    X, Y = X[:n_images], Y[:n_images]
    start = time.perf_counter()
    for _ in batches(X, Y, batch, generator=torch.Generator().manual_seed(0)):
        pass
    in_memory = time.perf_counter() - start

    dataset = torchvision.datasets.MNIST(str(root or default_root()), train=True, download=False,
                                         transform=torchvision.transforms.ToTensor())
    loader = DataLoader(Subset(dataset, range(n_images)), batch_size=batch, shuffle=True)
    start = time.perf_counter()
    for _ in loader:
        pass
    torchvision_s = time.perf_counter() - start
    return pd.DataFrame({"images": [n_images, n_images], "seconds": [in_memory, torchvision_s]},
                        index=pd.Index(["in-memory tensors", "DataLoader + ToTensor"], name="loader"))


# --- report -----------------------------------------------------------------------------------


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(results: dict, path: Path) -> None:
    """Write atomically: a temporary file beside ``path``, renamed when complete."""
    atomic_write(path, json.dumps(results, indent=1))


def _frame_to_json(df: pd.DataFrame) -> list:
    return json.loads(df.reset_index().to_json(orient="records"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgtutor.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "convnet"], choices=list(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256],
                        help="batch sizes for the step timings (the first is also used for memory)")
    parser.add_argument("--large-batch", type=int, default=4096, help="second batch size for the memory probe")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    parser.add_argument("--samplers", nargs="+", default=["rademacher", "rank1"], choices=list(SAMPLERS),
                        help="tangent samplers to time (the first is also used for memory)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--loading-images", type=int, default=50_000, help="images in the loading epoch")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "loading", "torch.func", "estimators"])
    parser.add_argument("--json", type=Path, default=Path("runs/bench.json"), help="where to write the numbers")
    parser.add_argument("--probe-memory", nargs=5, metavar=("MODEL", "METHOD", "BATCH", "DEVICE", "SAMPLER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_memory:
        name, method, batch, device, sampler = args.probe_memory
        print(_probe_memory(name, method, int(batch), device, sampler))
        return 0
    try:
        for name in ("large_batch", "repeats", "loading_images"):
            check_positive(name, getattr(args, name), integer=True)
        for batch in args.batch:
            check_positive("batch", batch, integer=True)
        check_positive("warmup", args.warmup, integer=True, allow_zero=True)
        pick_device(args.device)
        check_writable("--json", args.json)
    except ValueError as exc:
        parser.error(str(exc))

    results = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "probe_memory"}}
    results["settings"]["json"] = str(args.json)
    pd.set_option("display.width", 160)
    steps = pd.concat([measure_steps(args.models, batch, args.repeats, args.warmup, args.device, sampler,
                                     torch_func="torch.func" not in args.skip).assign(sampler=sampler)
                       for sampler in args.samplers for batch in args.batch])
    steps = steps.set_index(["batch", "sampler"], append=True)
    results["steps"] = _frame_to_json(steps)
    print(f"\nMedian milliseconds per call ({torch.get_num_threads()} threads):")
    print(steps.round(3).T.to_string())
    if "estimators" not in args.skip:
        for model in ESTIMATOR_MODELS:
            estimators = measure_estimators(args.batch[0], args.repeats, args.warmup, args.device, model)
            results["estimators" if model == "mlp" else f"estimators_{model}"] = _frame_to_json(estimators)
            print(f"\nA training step of each estimator on the {model}, batch {args.batch[0]} "
                  "(plain SGD; fgtutor.activity):")
            print(estimators.round(3).to_string())
    sampling = measure_sampling(repeats=args.repeats, warmup=args.warmup, device=args.device)
    results["sampling"] = sampling.to_dict()
    print("\nMedian milliseconds to draw one MLP-sized tangent (1,863,690 numbers):")
    print(sampling.round(3).to_string())
    if "memory" not in args.skip:
        memory = measure_memory(args.models, (args.batch[0], args.large_batch), args.device, args.samplers[0],
                                methods=MEMORY_METHODS)
        results["memory"] = _frame_to_json(memory)
        print("\nPeak extra memory of one training step (MB):")
        print(memory.round(2).to_string())
    if "loading" not in args.skip:
        loading = measure_loading(args.loading_images, args.batch[0])
        results["loading"] = _frame_to_json(loading)
        print(f"\nOne pass over {args.loading_images} training images, batch {args.batch[0]}:")
        print(loading.round(3).to_string())
    write_json(results, args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
