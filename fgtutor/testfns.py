r"""Two-dimensional test functions and a small optimiser loop to watch estimators at work.

* Beale: :math:`(1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2`,
  minimum 0 at (3, 0.5).
* Rosenbrock: :math:`(1 - x)^2 + 100\,(y - x^2)^2`, minimum 0 at (1, 1): a long curved
  valley where gradient descent crawls.

Both accept Python numbers, scalar tensors or meshgrid tensors (element-wise).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .forward import check_sampler, forward_gradient
from .utils import check_callable, check_choice, check_pair, check_positive, make_generator

BEALE_MINIMUM = (3.0, 0.5)
ROSENBROCK_MINIMUM = (1.0, 1.0)


def beale(x, y):
    """Beale's function; minimum 0 at ``BEALE_MINIMUM`` = (3, 0.5)."""
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(x, y):
    """Rosenbrock's banana function; minimum 0 at ``ROSENBROCK_MINIMUM`` = (1, 1)."""
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


class Trajectory(NamedTuple):
    """What ``optimize`` saw: ``points[i]`` is the iterate before step ``i`` (``steps + 1``
    rows, the last is the final point), ``losses[i] = f(points[i])``, ``grads[i]`` the
    gradient (or its estimate) used at step ``i``."""

    points: Tensor  # (steps + 1, 2)
    losses: Tensor  # (steps + 1,)
    grads: Tensor   # (steps, 2)


METHODS = ("forward", "backprop")
_F = "a function f(x, y) of two scalar tensors, e.g. fgtutor.testfns.beale"
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def optimize(
    f: Callable,
    start: Sequence[float],
    steps: int,
    lr: float,
    method: str = "forward",
    optimizer: str = "sgd",
    seed: int = 0,
    *,
    sampler: str = "gaussian",
    num_tangents: int = 1,
) -> Trajectory:
    """Minimise ``f(x, y)`` from ``start`` with true gradients (``"backprop"``) or forward
    gradients (``"forward"``), using ``torch.optim`` SGD or Adam at a constant rate.

    The tangents come from a private generator seeded with ``seed``, so two calls with the
    same arguments give the same trajectory.
    """
    check_callable("f", f, _F)
    check_choice("method", method, METHODS)
    check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
    check_positive("steps", steps, integer=True)
    check_positive("lr", lr)
    check_sampler(sampler)
    start = check_pair("start", start)

    theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = OPTIMIZERS[optimizer]([theta], lr=lr)
    generator = make_generator(seed)

    def loss_of(p: Tensor) -> Tensor:
        return f(p[0], p[1])

    points, losses, grads = [theta.detach().clone()], [], []
    for _ in range(steps):
        if method == "backprop":
            value = loss_of(theta)
            (grad,) = torch.autograd.grad(value, theta)
        else:
            value, grad = forward_gradient(loss_of, theta.detach(), sampler=sampler,
                                           num_tangents=num_tangents, generator=generator)
        theta.grad = grad
        opt.step()
        losses.append(value.detach())
        grads.append(grad.detach().clone())
        points.append(theta.detach().clone())
    losses.append(loss_of(theta.detach()))
    return Trajectory(torch.stack(points), torch.stack(losses), torch.stack(grads))


def sample_estimates(f: Callable, point: Sequence[float], n: int, sampler: str = "gaussian",
                     seed: int = 0) -> Tensor:
    """``n`` independent single-tangent forward gradients of ``f(x, y)`` at ``point``, as an
    (n, 2) tensor: the raw material for looking at the estimator's mean and spread."""
    check_callable("f", f, _F)
    check_positive("n", n, integer=True)
    theta = torch.tensor(check_pair("point", point), dtype=torch.float64)
    generator = make_generator(seed)
    return torch.stack([forward_gradient(lambda p: f(p[0], p[1]), theta, sampler=sampler,
                                         generator=generator)[1] for _ in range(n)])


def true_gradient(f: Callable, point: Sequence[float]) -> Tensor:
    """The exact gradient of ``f(x, y)`` at ``point`` (by reverse mode), as a (2,) tensor."""
    check_callable("f", f, _F)
    theta = torch.tensor(check_pair("point", point), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(f(theta[0], theta[1]), theta)
    return grad
