"""Tests for fgtutor.utils: argument checks, seeding and device selection."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fgtutor.utils import check_positive, default_dtype, kept_rng, make_generator, pick_device, seed_everything


@pytest.fixture
def restore_rng(monkeypatch):
    """seed_everything touches global state: put it back afterwards."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def test_seed_everything_makes_draws_reproducible_and_returns_the_seed(restore_rng):
    assert seed_everything(123) == 123
    a = (torch.randn(5), np.random.rand(3), random.random())
    seed_everything(123)
    b = (torch.randn(5), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    seed_everything(124)
    assert not torch.equal(torch.randn(5), a[0])


def test_seed_everything_accepts_zero_and_numpy_integers(restore_rng):
    assert seed_everything(0) == 0
    assert seed_everything(np.int64(7)) == 7


@pytest.mark.parametrize("seed", [-1, 1.5, 2.0, "3", None, True])
def test_seed_everything_rejects_negative_or_non_integer_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(seed)


def test_make_generator_gives_a_private_reproducible_stream():
    state = torch.random.get_rng_state()
    a = torch.randn(4, generator=make_generator(5))
    assert torch.equal(a, torch.randn(4, generator=make_generator(5)))
    assert torch.equal(state, torch.random.get_rng_state())


def test_pick_device_cpu():
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_auto_returns_an_available_device():
    device = pick_device("auto")
    assert isinstance(device, torch.device)
    torch.zeros(1, device=device)  # usable
    if torch.cuda.is_available():
        assert device.type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_pick_device_cuda_without_a_gpu_raises_a_helpful_value_error(name):
    with pytest.raises(ValueError, match="no CUDA GPU") as info:
        pick_device(name)
    assert "auto" in str(info.value) and "cpu" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pick_device_rejects_a_cuda_index_that_is_not_visible():
    with pytest.raises(ValueError, match="CUDA device"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("name", ["tpu", "CPU", "gpu", "", None])
def test_pick_device_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="device="):
        pick_device(name)


@pytest.mark.parametrize("value", [1, 0.5, 1e9, np.float64(2.0)])
def test_check_positive_accepts_positive_numbers(value):
    check_positive("x", value)


@pytest.mark.parametrize("value", [0, -1, -0.5, float("nan"), float("inf"), True, "1", None])
def test_check_positive_rejects_the_rest_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^lr="):
        check_positive("lr", value)


def test_check_positive_allow_zero_accepts_zero_only_as_the_boundary():
    check_positive("k", 0, allow_zero=True)
    check_positive("k", 0.0, allow_zero=True)
    with pytest.raises(ValueError, match="non-negative"):
        check_positive("k", -1e-9, allow_zero=True)


def test_check_positive_integer_rejects_floats():
    check_positive("steps", 3, integer=True)
    with pytest.raises(ValueError, match="positive integer"):
        check_positive("steps", 3.0, integer=True)


def test_atomic_write_writes_whole_files_with_the_usual_permissions(tmp_path):
    import os
    from fgtutor.utils import atomic_write
    path = atomic_write(tmp_path / "sub" / "a.json", "{}")
    assert path.read_text() == "{}"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_check_writable_refuses_folders_the_input_itself_and_read_only_places(tmp_path):
    from fgtutor.utils import check_writable
    with pytest.raises(ValueError, match="is a directory"):
        check_writable("output", tmp_path)
    (tmp_path / "in.ipynb").write_text("{}")
    with pytest.raises(ValueError, match="is the input itself"):
        check_writable("output", tmp_path / "in.ipynb", not_same_as=tmp_path / "." / "in.ipynb")
    assert check_writable("output", tmp_path / "new" / "out.ipynb") == tmp_path / "new" / "out.ipynb"


def test_kept_rng_puts_every_generator_back_after_its_block(restore_rng):
    seed_everything(5)
    expected = (torch.randn(3), np.random.rand(2), random.random())
    seed_everything(5)
    with kept_rng():
        seed_everything(99)
        torch.randn(10), np.random.rand(10), random.random()
    assert torch.equal(torch.randn(3), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]


def test_default_dtype_holds_inside_its_block_and_is_put_back_even_after_an_error():
    before = torch.get_default_dtype()
    with default_dtype(torch.float64):
        assert torch.zeros(1).dtype == torch.float64
    assert torch.get_default_dtype() == before
    with pytest.raises(RuntimeError), default_dtype(torch.float64):
        raise RuntimeError("inside")
    assert torch.get_default_dtype() == before
