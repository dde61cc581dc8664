"""MNIST in memory: splitting and batching tensors.

MNIST is small (about 55 MB of uint8 pixels), so the whole dataset lives in
memory and mini-batches are made by indexing tensors: no ``Dataset`` or
``DataLoader`` in the way of the forward-gradient code. ``train_val_split``
holds out a reproducible validation set, ``batches`` yields mini-batches and
``standardize`` puts the pixels at zero mean and unit variance.

Getting the files onto disk and into tensors is ``fgtutor.mnist``'s job;
``load_mnist``, ``load_fashion_mnist``, ``default_root`` and ``MNISTUnavailableError``
are re-exported here so that ``from fgtutor.data import load_mnist, train_val_split`` works.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .mnist import MNISTUnavailableError, default_root, load_fashion_mnist, load_mnist
from .utils import check_choice, check_generator, check_positive, check_type

__all__ = ["train_val_split", "batches", "standardize", "prepare_inputs", "load_mnist", "load_fashion_mnist",
           "default_root", "MNISTUnavailableError"]

#: MNIST's training-set pixel mean and standard deviation, as torchvision's
#: ``Normalize((0.1307,), (0.3081,))`` and orobix/fwdgrad use them
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: what the inputs of a run are: pixels in [0, 1] as loaded, or standardized
INPUTS = ("raw", "standardized")


def _check_pair(X: torch.Tensor, Y: torch.Tensor) -> int:
    """Return N, checking that X and Y are tensors with the same first dimension."""
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise ValueError(f"X and Y must be tensors, got {type(X).__name__} and {type(Y).__name__}: "
                         "convert them with torch.as_tensor.")
    if X.ndim == 0 or Y.ndim == 0 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X of shape {tuple(X.shape)} and Y of shape {tuple(Y.shape)} do not pair up: "
                         "X and Y must have the same first dimension, one row of Y per sample of X.")
    return X.shape[0]


def train_val_split(
    X: torch.Tensor, Y: torch.Tensor, n_val: int = 10_000, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Split ``(X, Y)`` into ``((X_train, Y_train), (X_val, Y_val))`` at random.

    The permutation comes from a local generator seeded with ``seed``, so the
    split is reproducible and the global RNG is untouched.
    """
    n = _check_pair(X, Y)
    check_positive("seed", seed, allow_zero=True, integer=True)
    if isinstance(n_val, bool) or not isinstance(n_val, int) or not 1 <= n_val <= n - 1:
        raise ValueError(f"n_val={n_val!r} is not allowed: use an integer in 1..{n - 1} (there are N={n} samples).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(X.device)
    val, tr = perm[:n_val], perm[n_val:]
    return (X[tr], Y[tr.to(Y.device)]), (X[val], Y[val.to(Y.device)])


def standardize(X: torch.Tensor, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> torch.Tensor:
    r"""The inputs at zero mean and unit variance, :math:`(x - \mu)/\sigma`, with MNIST's
    training-set :math:`\mu` and :math:`\sigma` (fixed numbers, so the test set is
    shifted exactly like the training set). A new tensor; ``X`` is left alone."""
    check_type("X", X, torch.Tensor, "a tensor of images")
    if not X.is_floating_point():
        raise ValueError(f"X is {X.dtype}: standardize floating-point pixels in [0, 1] (load_mnist gives those).")
    check_positive("std", std)
    return (X - mean) / std


def prepare_inputs(X: torch.Tensor, inputs: str = "raw") -> torch.Tensor:
    """``X`` as a run with ``inputs`` (one of ``INPUTS``) sees it: as loaded, or ``standardize``-d."""
    check_choice("inputs", inputs, INPUTS)
    return X if inputs == "raw" else standardize(X)


def batches(
    X: torch.Tensor,
    Y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches of the in-memory tensors, last partial one included.

    Arguments are checked here, not at the first ``next()``, so mistakes
    surface where the call is written.
    """
    n = _check_pair(X, Y)
    if n == 0:
        raise ValueError("X and Y are empty: there is nothing to make batches of; pass at least one sample.")
    check_positive("batch_size", batch_size, integer=True)
    check_generator(generator)
    return _iter_batches(X, Y, n, batch_size, shuffle, generator)


def _iter_batches(
    X: torch.Tensor,
    Y: torch.Tensor,
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: Optional[torch.Generator],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
