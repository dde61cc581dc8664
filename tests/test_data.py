"""Tests for fgtutor.data: splitting and batching in-memory tensors."""

from __future__ import annotations

import pytest
import torch

from fgtutor import data, mnist
from fgtutor.data import prepare_inputs, standardize


def test_reexports_the_loader():
    assert data.load_mnist is mnist.load_mnist
    assert data.default_root is mnist.default_root
    assert data.MNISTUnavailableError is mnist.MNISTUnavailableError


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


def test_standardize_uses_mnist_statistics_and_leaves_its_input_alone():
    X = torch.tensor([[0.1307, 0.4388, 0.0]])
    out = standardize(X)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, -0.1307 / 0.3081]]))
    assert X[0, 1] == 0.4388 and prepare_inputs(X, "raw") is X
    assert torch.equal(prepare_inputs(X, "standardized"), out)
    with pytest.raises(ValueError, match="inputs='z'"):
        prepare_inputs(X, "z")
    with pytest.raises(ValueError, match="floating-point"):
        standardize(torch.zeros(2, dtype=torch.uint8))
