r"""Learning-rate schedule and forward-gradient optimizers.

The paper decays the learning rate every *iteration*, :math:`\eta_i = \eta_0 e^{-k i}` with
:math:`k = 10^{-4}`, for both methods. (The original notebook instead stepped
``ExponentialLR(gamma=1e-4)`` once per *epoch*, which multiplies the rate by 1e-4 after the
first epoch and stops backprop from learning.)

``ForwardSGD`` and ``ForwardAdam`` are conveniences: ``ForwardGradient`` fills ``p.grad``,
a stock ``torch.optim`` optimizer takes the step, ``exp_decay`` moves the rate. A backprop
baseline uses the very same optimizer and schedule; only the origin of ``.grad`` differs.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from .forward import ForwardGradient
from .losses import cross_entropy
from .utils import check_callable, check_positive, check_type

MODEL = "a torch.nn.Module, e.g. fgtutor.models.MLP()"
OPTIMIZER = "a torch.optim optimizer"


def exp_decay(optimizer: torch.optim.Optimizer, k: float) -> LambdaLR:
    r"""The paper's per-iteration schedule :math:`\eta_i = \eta_0 e^{-k i}`; call ``.step()``
    after every optimizer step. ``k = 0`` keeps the rate constant."""
    check_type("optimizer", optimizer, torch.optim.Optimizer, OPTIMIZER)
    check_positive("k", k, allow_zero=True)
    return LambdaLR(optimizer, lambda i: math.exp(-k * i))


#: learning-rate schedules by name: the paper's exponential decay (``k = 0``: constant) and
#: the cosine schedule of SGDR, :math:`\eta_i = \eta_0 \tfrac12 (1 + \cos(\pi i / T))`
SCHEDULES = ("exp", "cosine")


def cosine_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    r"""The cosine schedule :math:`\eta_i = \eta_0 \tfrac12 (1 + \cos(\pi i / T))` over
    ``total_steps`` :math:`T` steps, from :math:`\eta_0` to 0 (held at 0 after ``T``)."""
    check_type("optimizer", optimizer, torch.optim.Optimizer, OPTIMIZER)
    check_positive("total_steps", total_steps, integer=True)
    return LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total_steps) / total_steps)))


def check_schedule(lr_schedule: str, decay: float) -> None:
    """One rule for a run's schedule: a name from ``SCHEDULES``, and ``decay`` (the
    exponential schedule's ``k``) only with ``"exp"``."""
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r} is not allowed: use one of {', '.join(map(repr, SCHEDULES))}.")
    check_positive("decay", decay, allow_zero=True)
    if lr_schedule != "exp" and decay:
        raise ValueError(f"decay={decay} is the 'exp' schedule's rate: use decay=0 with lr_schedule={lr_schedule!r}.")


def make_schedule(optimizer: torch.optim.Optimizer, lr_schedule: str, decay: float, total_steps: int) -> LambdaLR:
    """The schedule ``lr_schedule`` names: ``exp_decay(optimizer, decay)`` or
    ``cosine_decay(optimizer, total_steps)``."""
    check_schedule(lr_schedule, decay)
    return exp_decay(optimizer, decay) if lr_schedule == "exp" else cosine_decay(optimizer, total_steps)


def is_plain_sgd(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """True when ``optimizer`` is ``torch.optim.SGD`` without momentum, weight decay or
    maximisation, over exactly the trainable parameters of ``model`` in one group: then a
    forward-gradient step can be fused (``forward_step``)."""
    check_type("model", model, nn.Module, MODEL)
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return (group["momentum"] == 0 and group["weight_decay"] == 0 and not group.get("maximize", False)
            and {id(p) for p in group["params"]} == trainable)


def fuses(estimate: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer) -> bool:
    """True when ``forward_step`` can fuse the update: a ``ForwardGradient`` with one
    tangent, and plain SGD over exactly its model's trainable parameters."""
    return (isinstance(estimate, ForwardGradient) and estimate.num_tangents == 1
            and is_plain_sgd(optimizer, estimate.model))


def sgd_along(optimizer: torch.optim.Optimizer, dd: Tensor) -> None:
    """``θ ← θ − lr · dd · v`` with the tangent ``v`` in ``p.grad``: one plain-SGD step whose
    learning rate carries the scalar ``dd``, so ``v`` need not be scaled first."""
    group = optimizer.param_groups[0]
    lr = group["lr"]
    group["lr"] = lr * dd.item()
    try:
        optimizer.step()
    finally:
        group["lr"] = lr


def forward_step(estimate: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
                 x: Tensor, y: Tensor, fused: Optional[bool] = None) -> Tensor:
    """One forward-gradient training step on ``(x, y)``; returns the loss.

    ``estimate(x, y)`` writes the estimate ``dd·v`` into ``p.grad`` and ``optimizer.step()``
    applies it: two passes over the weights' size (``v ← dd·v``, then ``θ ← θ − lr·v``).
    With plain SGD (``is_plain_sgd``) and one tangent the step is *fused*: the tangent stays
    in ``p.grad`` and the scalar rides on the learning rate, ``θ ← θ − (lr·dd)·v``, the same
    step in one pass (``p.grad`` then holds ``v`` rather than the estimate; with
    ``sampler="rank1"`` each weight matrix takes the rank-one update ``addr_`` and ``p.grad``
    is not written at all). ``fused=None``
    asks ``fuses`` every call; a training loop can ask once and pass the answer. Either
    way, a step whose loss is not finite leaves the weights alone.
    """
    # cheap enough for every step, and a None here would otherwise fail inside the step
    check_callable("estimate", estimate, "an estimator, e.g. fgtutor.forward.ForwardGradient(model)")
    check_type("optimizer", optimizer, torch.optim.Optimizer, OPTIMIZER)
    if fused if fused is not None else fuses(estimate, optimizer):
        with torch.no_grad():
            loss, dd = estimate.loss_and_derivative(x, y)
        if torch.isfinite(loss):
            if estimate.sampler == "rank1":  # rank-one updates, straight from the factors
                estimate.descend_(optimizer.param_groups[0]["lr"] * estimate.clip_(dd).item())
                optimizer._opt_called = True  # a step was taken, outside optimizer.step(): tell the LR schedule
            else:
                sgd_along(optimizer, estimate.clip_(dd))
        return loss.detach()
    loss = estimate(x, y)
    if torch.isfinite(loss):
        optimizer.step()
    return loss


class _ForwardOptimizer:
    """Estimator + torch optimizer + schedule behind one ``.step(x, y) -> loss``."""

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 decay: float, clip: Optional[float], num_tangents: int, sampler: str,
                 generator: Optional[torch.Generator]) -> None:
        check_positive("decay", decay, allow_zero=True)  # by its name here, not exp_decay's k
        self.model = model
        self.estimate = ForwardGradient(model, loss_fn, num_tangents=num_tangents, sampler=sampler,
                                        clip=clip, generator=generator)
        self.optimizer = optimizer
        self.scheduler = exp_decay(optimizer, decay)

    def step(self, x: Tensor, y: Tensor) -> float:
        """One forward-gradient step on the batch ``(x, y)``; returns the batch loss."""
        loss = forward_step(self.estimate, self.optimizer, x, y)
        self.scheduler.step()
        return loss.item()

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.optimizer.param_groups[0]["lr"]


class ForwardSGD(_ForwardOptimizer):
    r"""SGD on forward gradients, with optional (Nesterov) momentum and per-iteration decay.

    Momentum is ``torch.optim.SGD``'s: :math:`b \leftarrow \mu b + g`,
    :math:`\theta \leftarrow \theta - \eta b` (Sutskever's form with :math:`v = -\eta b` at a
    constant rate). With ``nesterov=True`` the stored parameters are the *look-ahead* point
    :math:`\theta + \mu v` of Sutskever et al. (2013), so the estimate is taken there, as
    the original's Nesterov variant did by evaluating the jvp at :math:`\theta + \mu v`.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable = cross_entropy, lr: float = 2e-4,
                 momentum: float = 0.0, nesterov: bool = False, decay: float = 0.0,
                 clip: Optional[float] = None, *, num_tangents: int = 1, sampler: str = "rademacher",
                 generator: Optional[torch.Generator] = None) -> None:
        check_type("model", model, nn.Module, MODEL)  # before torch.optim reads model.parameters()
        check_positive("lr", lr)
        check_positive("momentum", momentum, allow_zero=True)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0.")
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov)
        super().__init__(model, loss_fn, opt, decay, clip, num_tangents, sampler, generator)


def _check_betas(betas) -> None:
    """Adam's two decay rates, each in [0, 1): torch.optim.Adam checks their values, but
    indexes them first (a bare TypeError or IndexError for anything but a pair)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas={betas!r} is not allowed: use two numbers in [0, 1), e.g. (0.9, 0.999).")
    for i, beta in enumerate(betas):
        check_positive(f"betas[{i}]", beta, allow_zero=True)


class ForwardAdam(_ForwardOptimizer):
    """Adam (``torch.optim.Adam``, bias-corrected) on forward gradients, with per-iteration decay.

    The original put Adam's ε inside the square root; PyTorch adds it outside. The
    difference only matters when the second-moment estimate is below ε².
    """

    def __init__(self, model: nn.Module, loss_fn: Callable = cross_entropy, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), decay: float = 1e-4,
                 clip: Optional[float] = None, *, eps: float = 1e-8, num_tangents: int = 1,
                 sampler: str = "rademacher", generator: Optional[torch.Generator] = None) -> None:
        check_type("model", model, nn.Module, MODEL)  # before torch.optim reads model.parameters()
        check_positive("lr", lr)
        _check_betas(betas)
        check_positive("eps", eps, allow_zero=True)
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)
        super().__init__(model, loss_fn, opt, decay, clip, num_tangents, sampler, generator)
