"""Tests for fgtutor.losses: the stable cross-entropy and the original clamped one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fgtutor.losses import clamp_probs, cross_entropy, functional_xent, softmax


def logits_and_targets(n: int = 6, seed: int = 0, scale: float = 1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g, dtype=dtype) * scale, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_cross_entropy_equals_torch_cross_entropy(scale):
    z, t = logits_and_targets(scale=scale)
    torch.testing.assert_close(cross_entropy(z, t), F.cross_entropy(z, t))


def test_functional_xent_equals_cross_entropy_when_nothing_saturates():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(2))
    params = dict(net.named_parameters())

    def model(p, inp):
        return functional_call(net, p, (inp,))

    torch.testing.assert_close(functional_xent(params, model, x, t), F.cross_entropy(net(x), t))


def test_softmax_equals_torch_softmax():
    z, _ = logits_and_targets(scale=3.0)
    torch.testing.assert_close(softmax(z), torch.softmax(z, dim=-1))


def test_softmax_is_stable_for_huge_logits():
    z = torch.tensor([[1000.0, 1000.0, 0.0], [-1e4, 5e3, 5e3], [1e30, 0.0, -1e30]])
    p = softmax(z)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamp_probs_clamps_to_machine_epsilon(dtype):
    eps = torch.finfo(dtype).eps
    p = torch.tensor([0.0, 1e-300 if dtype == torch.float64 else 1e-40, 0.3, 1.0], dtype=dtype)
    assert clamp_probs(p).tolist() == [eps, eps, torch.tensor(0.3, dtype=dtype).item(), 1 - eps]


def saturated_wrong_prediction():
    """The network is certain of class 0, but the answer is class 1."""
    z = torch.zeros(1, 10)
    z[0, 0] = 200.0
    return z.requires_grad_(), torch.tensor([1])


def test_clamped_loss_is_capped_at_minus_log_eps_for_a_saturated_wrong_prediction():
    z, t = saturated_wrong_prediction()
    loss = functional_xent(None, lambda p, x: x, z, t)
    assert loss.item() == pytest.approx(-math.log(torch.finfo(torch.float32).eps), rel=1e-6)
    assert loss.item() == pytest.approx(15.94, abs=0.01)
    assert cross_entropy(z, t).item() == pytest.approx(200.0, rel=1e-4)  # the true loss is much larger


def test_clamped_loss_has_zero_gradient_once_saturated_so_a_diverged_run_cannot_recover():
    z, t = saturated_wrong_prediction()
    (g_clamped,) = torch.autograd.grad(functional_xent(None, lambda p, x: x, z, t), z)
    (g_stable,) = torch.autograd.grad(cross_entropy(z, t), z)
    assert torch.all(g_clamped == 0)
    assert g_stable.abs().max() > 0.9  # the stable loss still points back towards the right class
