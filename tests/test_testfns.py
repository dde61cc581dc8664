"""Tests for fgtutor.testfns: Beale, Rosenbrock and the small optimiser loop."""

from __future__ import annotations

import pytest
import torch

from fgtutor.testfns import BEALE_MINIMUM, ROSENBROCK_MINIMUM, Trajectory, beale, optimize, rosenbrock


F64 = torch.float64


@pytest.mark.parametrize("f, point, value", [
    (beale, BEALE_MINIMUM, 0.0),
    (beale, (0.0, 0.0), 14.203125),
    (beale, (1.0, 1.0), 14.203125),
    (rosenbrock, ROSENBROCK_MINIMUM, 0.0),
    (rosenbrock, (0.0, 0.0), 1.0),
    (rosenbrock, (-1.0, 1.0), 4.0),
    (rosenbrock, (0.0, 1.0), 101.0),
])
def test_known_values(f, point, value):
    assert f(*point) == pytest.approx(value, abs=1e-12)
    assert f(*(torch.tensor(c, dtype=F64) for c in point)).item() == pytest.approx(value, abs=1e-12)


def test_minima_are_where_the_docstrings_say():
    assert BEALE_MINIMUM == (3.0, 0.5) and ROSENBROCK_MINIMUM == (1.0, 1.0)


@pytest.mark.parametrize("f", [beale, rosenbrock])
def test_functions_work_elementwise_on_meshgrids(f):
    xs, ys = torch.linspace(-2, 3, 7, dtype=F64), torch.linspace(-1, 2, 5, dtype=F64)
    X, Y = torch.meshgrid(xs, ys, indexing="ij")
    Z = f(X, Y)
    assert Z.shape == (7, 5)
    for i in (0, 3, 6):
        for j in (0, 2, 4):
            assert Z[i, j].item() == pytest.approx(f(xs[i].item(), ys[j].item()), rel=1e-12)


@pytest.mark.parametrize("f, minimum", [(beale, BEALE_MINIMUM), (rosenbrock, ROSENBROCK_MINIMUM)])
def test_gradient_vanishes_at_the_minimum(f, minimum):
    p = torch.tensor(minimum, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(f(p[0], p[1]), p)
    assert torch.equal(grad, torch.zeros(2, dtype=F64))


def test_beale_gradient_at_a_known_point():
    p = torch.tensor([1.5, -0.1], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(beale(p[0], p[1]), p)
    assert grad.tolist() == pytest.approx([-3.434, -0.808], abs=5e-4)


STARTS = {beale: (1.0, 1.0), rosenbrock: (-1.0, 1.5)}
LRS = {(beale, "sgd"): 1e-3, (beale, "adam"): 0.05, (rosenbrock, "sgd"): 1e-4, (rosenbrock, "adam"): 0.05}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["forward", "backprop"])
@pytest.mark.parametrize("f", [beale, rosenbrock])
def test_optimize_lowers_the_loss(f, method, optimizer):
    steps = 200
    traj = optimize(f, STARTS[f], steps, LRS[f, optimizer], method, optimizer, seed=0)
    assert isinstance(traj, Trajectory)
    assert traj.points.shape == (steps + 1, 2)
    assert traj.losses.shape == (steps + 1,)
    assert traj.grads.shape == (steps, 2)
    assert torch.isfinite(traj.losses).all()
    assert traj.losses[-1] < 0.5 * traj.losses[0]


def test_optimize_records_the_loss_at_every_point():
    traj = optimize(beale, (1.0, 1.0), 10, 1e-3, "forward", "sgd", seed=0)
    assert torch.equal(traj.points[0], torch.tensor([1.0, 1.0], dtype=F64))
    expected = torch.stack([beale(p[0], p[1]) for p in traj.points])
    torch.testing.assert_close(traj.losses, expected)


def test_optimize_with_backprop_uses_the_true_gradients():
    traj = optimize(rosenbrock, (-1.0, 1.5), 10, 1e-4, "backprop", "sgd")
    for point, grad in zip(traj.points[:-1], traj.grads):
        p = point.clone().requires_grad_()
        (true,) = torch.autograd.grad(rosenbrock(p[0], p[1]), p)
        torch.testing.assert_close(grad, true)
    # plain SGD: every step is -lr times the gradient used
    torch.testing.assert_close(traj.points[1:] - traj.points[:-1], -1e-4 * traj.grads)


def test_optimize_forward_gradients_are_directional_estimates_not_the_gradient():
    traj = optimize(beale, (1.0, 1.0), 20, 1e-3, "forward", "sgd", seed=0, sampler="rademacher")
    for point, grad in zip(traj.points[:-1], traj.grads):
        p = point.clone().requires_grad_()
        (true,) = torch.autograd.grad(beale(p[0], p[1]), p)
        # g = (∇f·v) v with v ∈ {±1}²: both components have the magnitude |∇f·v|
        assert grad.abs()[0].item() == pytest.approx(grad.abs()[1].item(), rel=1e-12)
        assert not torch.allclose(grad, true)


def test_optimize_same_seed_gives_the_same_forward_trajectory():
    a = optimize(beale, (1.0, 1.0), 30, 1e-3, "forward", "sgd", seed=3)
    b = optimize(beale, (1.0, 1.0), 30, 1e-3, "forward", "sgd", seed=3)
    c = optimize(beale, (1.0, 1.0), 30, 1e-3, "forward", "sgd", seed=4)
    assert torch.equal(a.points, b.points) and torch.equal(a.grads, b.grads)
    assert not torch.equal(a.points, c.points)


@pytest.mark.parametrize("kwargs, name", [
    (dict(method="sideways"), "method"),
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(steps=0), "steps"),
    (dict(steps=-5), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-0.1), "lr"),
    (dict(start=(1.0, 2.0, 3.0)), "start"),
    (dict(start=(1.0,)), "start"),
    (dict(sampler="uniform"), "sampler"),
])
def test_optimize_rejects_invalid_arguments(kwargs, name):
    args = dict(f=beale, start=(1.0, 1.0), steps=5, lr=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        optimize(**args)
