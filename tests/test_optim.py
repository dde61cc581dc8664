"""Tests for fgtutor.optim: the per-iteration schedule and the forward-gradient optimizers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtutor.losses import cross_entropy
from fgtutor.forward import ForwardGradient
from fgtutor.optim import ForwardAdam, ForwardSGD, cosine_decay, exp_decay, forward_step, is_plain_sgd
from conftest import seeded


F64 = torch.float64



def classification_batch(step: int, n: int = 6):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def exact_estimator(model: nn.Module, loss_fn=cross_entropy):
    """A drop-in for ``ForwardGradient``: writes the true gradient into ``.grad``, returns the loss."""
    def estimate(x, y):
        params = [p for p in model.parameters() if p.requires_grad]
        loss = loss_fn(model(x), y)
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        return loss.detach()
    return estimate


# --------------------------------------------------------------------------- exp_decay

@pytest.mark.parametrize("k", [0.0, 1e-4, 0.1])
def test_exp_decay_gives_lr0_times_exp_minus_k_i_at_step_i(k):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.5)
    scheduler = exp_decay(opt, k)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    for i in (0, 1, 2, 5, 10):
        assert lrs[i] == pytest.approx(0.5 * math.exp(-k * i), rel=1e-12)
    if k == 0:
        assert set(lrs) == {0.5}


@pytest.mark.parametrize("k", [-0.1, float("nan")])
def test_exp_decay_rejects_a_negative_rate(k):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.5)
    with pytest.raises(ValueError, match="k="):
        exp_decay(opt, k)


# --------------------------------------------------------------------------- ForwardSGD with exact gradients

@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)],
                         ids=["plain", "momentum", "nesterov"])
def test_forward_sgd_with_exact_gradients_reproduces_torch_sgd_with_exp_decay(momentum, nesterov):
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 3)))
    reference = copy.deepcopy(model)
    lr, decay = 0.3, 0.05
    opt = ForwardSGD(model, lr=lr, momentum=momentum, nesterov=nesterov, decay=decay)
    opt.estimate = exact_estimator(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr, momentum=momentum, nesterov=nesterov)
    ref_scheduler = exp_decay(ref_opt, decay)
    start = copy.deepcopy(model)
    for step in range(6):
        x, y = classification_batch(step)
        loss = opt.step(x, y)
        ref_opt.zero_grad()
        ref_loss = cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_scheduler.step()
        assert isinstance(loss, float) and loss == pytest.approx(ref_loss.item(), abs=1e-6)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        assert opt.lr == pytest.approx(lr * math.exp(-decay * (step + 1)))
    assert not torch.allclose(model[0].weight, start[0].weight)


class Point(nn.Module):
    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


def test_nesterov_forward_sgd_follows_sutskevers_look_ahead_recursion():
    """Sutskever et al.: v ← μv − η∇f(θ + μv), θ ← θ + v. The stored parameter is φ = θ + μv."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 3, generator=g, dtype=F64)
    A, b = M @ M.T + torch.eye(3, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    theta0 = torch.randn(3, generator=g, dtype=F64)

    def grad_f(t):
        return A @ t - b  # f(θ) = ½θᵀAθ − bᵀθ

    model = Point(theta0)
    mu, eta = 0.8, 0.05
    opt = ForwardSGD(model, lr=eta, momentum=mu, nesterov=True, decay=0.0)

    def exact(x, y):
        model.theta.grad = grad_f(model.theta.detach())
        return torch.zeros(())

    opt.estimate = exact
    theta, v = theta0.clone(), torch.zeros(3, dtype=F64)
    for _ in range(15):
        opt.step(None, None)
        v = mu * v - eta * grad_f(theta + mu * v)
        theta = theta + v
        torch.testing.assert_close(model.theta.detach(), theta + mu * v, atol=1e-10, rtol=1e-10)
    # ... and this is not plain heavy-ball momentum at the same point
    assert not torch.allclose(model.theta.detach(), theta, atol=1e-6)


# --------------------------------------------------------------------------- with the real estimator

def least_squares(n: int = 32):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 5, generator=g, dtype=F64)
    w = torch.randn(5, 1, generator=g, dtype=F64)
    return X, X @ w + 0.5


def test_forward_step_returns_the_float_batch_loss():
    model = seeded(lambda: nn.Sequential(nn.Linear(5, 1)))
    X, Y = least_squares()
    expected = F.mse_loss(model(X), Y).item()
    loss = ForwardSGD(model, F.mse_loss, lr=0.01, generator=torch.Generator().manual_seed(1)).step(X, Y)
    assert type(loss) is float and loss == pytest.approx(expected)


def test_forward_sgd_lowers_a_least_squares_loss():
    model = seeded(lambda: nn.Sequential(nn.Linear(5, 1)))
    X, Y = least_squares()
    opt = ForwardSGD(model, F.mse_loss, lr=0.03, generator=torch.Generator().manual_seed(1))
    losses = [opt.step(X, Y) for _ in range(200)]
    final = F.mse_loss(model(X), Y).item()
    assert final < 0.01 * losses[0]


def test_forward_adam_lowers_a_logistic_regression_loss():
    X, _ = least_squares(64)
    labels = (X[:, 0] + X[:, 1] > 0).long()
    model = seeded(lambda: nn.Sequential(nn.Linear(5, 2)))
    opt = ForwardAdam(model, lr=0.05, decay=0.0, generator=torch.Generator().manual_seed(1))
    first = opt.step(X, labels)
    for _ in range(199):
        opt.step(X, labels)
    final = cross_entropy(model(X), labels).item()
    assert final < 0.5 * first
    assert (model(X).argmax(1) == labels).float().mean() > 0.9


def test_forward_adam_applies_the_exp_decay_schedule():
    model = seeded(lambda: nn.Sequential(nn.Linear(5, 1)))
    X, Y = least_squares()
    opt = ForwardAdam(model, F.mse_loss, lr=1e-3, decay=0.5)
    for _ in range(3):
        opt.step(X, Y)
    assert opt.lr == pytest.approx(1e-3 * math.exp(-1.5))


# --------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("lr", [0, 0.0, -1e-3, float("inf")])
def test_non_positive_lr_raises_value_error(lr):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lr"):
        ForwardSGD(model, lr=lr)
    with pytest.raises(ValueError, match="lr"):
        ForwardAdam(model, lr=lr)


def test_nesterov_without_momentum_raises_value_error():
    with pytest.raises(ValueError, match="nesterov"):
        ForwardSGD(nn.Sequential(nn.Linear(2, 2)), nesterov=True)


def test_negative_momentum_raises_value_error():
    with pytest.raises(ValueError, match="momentum"):
        ForwardSGD(nn.Sequential(nn.Linear(2, 2)), momentum=-0.5)


def test_negative_decay_raises_value_error():
    with pytest.raises(ValueError):
        ForwardSGD(nn.Sequential(nn.Linear(2, 2)), decay=-1e-4)


def test_plain_forward_sgd_fuses_the_update_and_takes_the_same_step_as_torch_sgd():
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    reference = copy.deepcopy(model)
    opt = ForwardSGD(model, lr=0.1, decay=0.01, generator=torch.Generator().manual_seed(3))
    ref_estimate = ForwardGradient(reference, generator=torch.Generator().manual_seed(3))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_scheduler = exp_decay(ref_opt, 0.01)
    for step in range(5):
        x, y = classification_batch(step)
        assert opt.step(x, y) == pytest.approx(ref_estimate(x, y).item(), abs=1e-12)
        ref_opt.step()
        ref_scheduler.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=1e-12, rtol=0)


def test_is_plain_sgd_only_for_sgd_without_momentum_or_weight_decay_over_all_trainable_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert is_plain_sgd(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert not is_plain_sgd(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    assert not is_plain_sgd(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4), model)
    assert not is_plain_sgd(torch.optim.Adam(model.parameters(), lr=0.1), model)
    assert not is_plain_sgd(torch.optim.SGD(model[0].parameters(), lr=0.1), model)  # a subset only


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_forward_step_equals_writing_the_estimate_then_a_torch_sgd_step(clip):
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    reference = copy.deepcopy(model)
    x, y = classification_batch(0)
    estimate = ForwardGradient(model, clip=clip, generator=torch.Generator().manual_seed(2))
    loss = forward_step(estimate, torch.optim.SGD(model.parameters(), lr=0.5), x, y)
    ref_loss = ForwardGradient(reference, clip=clip, generator=torch.Generator().manual_seed(2))(x, y)
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    torch.testing.assert_close(loss, ref_loss)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_forward_step_leaves_the_weights_alone_when_the_loss_is_not_finite():
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 3)))
    before = copy.deepcopy(model)
    x, y = classification_batch(0)
    loss = forward_step(ForwardGradient(model), torch.optim.SGD(model.parameters(), lr=0.5), x * math.nan, y)
    assert not torch.isfinite(loss)
    for p, q in zip(model.parameters(), before.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_the_fused_rank_one_step_equals_writing_the_dense_estimate_then_a_torch_sgd_step(clip):
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    reference, before = copy.deepcopy(model), copy.deepcopy(model)
    x, y = classification_batch(0)
    estimate = ForwardGradient(model, sampler="rank1", clip=clip, generator=torch.Generator().manual_seed(2))
    loss = forward_step(estimate, torch.optim.SGD(model.parameters(), lr=0.5), x, y)
    ref = ForwardGradient(reference, sampler="rank1", clip=clip, generator=torch.Generator().manual_seed(2))
    ref_loss = ref(x, y)  # p.grad = dd · (u wᵀ), dense
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    torch.testing.assert_close(loss, ref_loss)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters())), "every weight moved"


def test_cosine_decay_goes_from_lr0_to_zero_along_half_a_cosine_and_stays_there():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    schedule = cosine_decay(opt, total_steps=4)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    expected = [0.4 * 0.5 * (1 + math.cos(math.pi * min(i, 4) / 4)) for i in range(6)]
    assert seen == pytest.approx(expected, abs=1e-12) and seen[4] == seen[5] == pytest.approx(0, abs=1e-12)
