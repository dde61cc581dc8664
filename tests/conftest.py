"""Shared test set-up: the tests never read or write the book's committed results store.

Runs the tests train (the chapters' tiny runs, the store's own tests) go to a temporary
store; tests of the committed store (the replay check) name ``results/`` explicitly.
"""
import os
import tempfile

import torch
from torch import nn

REPO_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def pytest_configure(config):
    os.environ["FGTUTOR_RESULTS"] = tempfile.mkdtemp(prefix="fgtutor-test-results-")
    os.environ["FGTUTOR_CACHE"] = tempfile.mkdtemp(prefix="fgtutor-test-cache-")
    os.environ["FGTUTOR_STORE"] = "train"
    for name in ("FGTUTOR_JOBS", "FGTUTOR_RETRAIN", "FGTUTOR_STORE_LOG"):
        os.environ.pop(name, None)


def seeded(factory, seed: int = 0) -> nn.Module:
    """Build a float64 module from a fixed seed without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().double()


def quadratic(dim: int = 5, seed: int = 0, dtype=torch.float64):
    """f(θ) = ½θᵀAθ + bᵀθ with A symmetric positive definite; returns (f, θ, ∇f(θ))."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(dim, dim, generator=g, dtype=dtype)
    A = M @ M.T + torch.eye(dim, dtype=dtype)
    b = torch.randn(dim, generator=g, dtype=dtype)
    theta = torch.randn(dim, generator=g, dtype=dtype)
    return (lambda t: 0.5 * t @ A @ t + b @ t), theta, A @ theta + b
