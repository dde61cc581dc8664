r"""Zeroth-order gradient estimates, from loss values alone: SPSA and MeZO.

A forward gradient (``fgtutor.forward``) needs one forward-*mode* pass for the directional
derivative :math:`\nabla L\cdot v`. A zeroth-order estimate needs only two ordinary
forward passes: the central difference along a random direction :math:`v`,

.. math:: \frac{L(\theta+\varepsilon v) - L(\theta-\varepsilon v)}{2\varepsilon}
          = \nabla L\cdot v + \frac{\varepsilon^2}{6}\, D^3L(\theta)[v, v, v] + O(\varepsilon^4),

(the even terms of the two Taylor series cancel), and the two-point SPSA estimate
(Spall 1992) with :math:`K` directions

.. math:: \hat g = \frac1K \sum_{k=1}^K
          \frac{L(\theta+\varepsilon v_k) - L(\theta-\varepsilon v_k)}{2\varepsilon}\, v_k
          = \frac1K \sum_k (\nabla L\cdot v_k)\, v_k + O(\varepsilon^2).

It is the forward gradient plus an :math:`O(\varepsilon^2)` bias: exact for a quadratic,
unbiased in the limit :math:`\varepsilon \to 0` (:math:`\mathbb E[v v^\top] = I`), with the
forward gradient's variance. That needs :math:`L` smooth between :math:`\theta \pm \varepsilon v`:
a ReLU network is only piecewise smooth, and once the segment crosses a kink (some
hidden unit changing sign) the error is no longer :math:`O(\varepsilon^2)`. On the MLP
with 8 MNIST images the nearest kink along :math:`v` is about 2e-6 away; below it the
estimate matches the forward gradient to 1e-9 (float64), at :math:`\varepsilon = 10^{-3}` it
is 10-20% off, a bias that still shrinks with :math:`\varepsilon`. In floating point the limit is not the best: each loss
carries a rounding error of about :math:`u\,|L|` (:math:`u` = 6e-8 in float32, 1.1e-16 in
float64), which the difference divides by :math:`\varepsilon`, so the total error
:math:`\approx \varepsilon^2 |D^3L|/6 + u|L|/\varepsilon` is smallest near
:math:`\varepsilon \approx (u|L|/|D^3L|)^{1/3}`: around 1e-3 to 1e-2 in float32.

``ZerothOrderGradient(model, loss_fn)`` computes it for a model in one of two ways:

* ``in_place=False`` (default): the weights are never written. :math:`v` is drawn into
  ``p.grad`` (one flat buffer, as ``ForwardGradient`` does) and the two losses are
  evaluated on perturbed *copies* of the weights (``torch.func.functional_call``; one
  spare buffer of the model's size). ``p.grad`` ends up holding :math:`\hat g`, so any
  ``torch.optim`` optimizer takes the step.
* ``in_place=True``: MeZO (Malladi et al. 2023). The weights themselves are moved,
  :math:`\theta \mathrel{+}= \varepsilon v`, evaluate, :math:`\theta \mathrel{-}= 2\varepsilon v`,
  evaluate, :math:`\theta \mathrel{+}= \varepsilon v`, and :math:`v` is never stored: each pass
  regenerates it, piece by piece (``CHUNK`` entries at a time), from a seed. No copy of
  the weights and no tangent buffer is held, so the memory is that of inference (plus
  two ``CHUNK``-sized scratch rows and the log below). The
  estimate is kept as :math:`K` seeds and :math:`K` scalars :math:`p_k` (``seeds``,
  ``projections``); ``p.grad`` is not written. ``step_(lr)`` takes MeZO's fused SGD step
  :math:`\theta \leftarrow \theta - \tfrac{lr}K\sum_k p_k v_k`, regenerating each
  :math:`v_k` once more, and ``write_grad_()`` materialises :math:`\hat g` in ``p.grad``
  for any other optimizer (which then needs the gradient buffers after all).

**Exact restoration.** In floating point :math:`\theta+\varepsilon v-2\varepsilon v+\varepsilon v`
is not :math:`\theta`: on the MLP at :math:`\varepsilon=10^{-3}` about 43% of the float32
weights come back a bit off (14% with Rademacher directions), and the error would random-walk over training. No
perturbation of fixed size can be undone from the perturbed value alone (weights much
smaller than :math:`\varepsilon v` lose their low bits when it is added), so each shift
logs what it cannot undo: with :math:`b = \varepsilon v` computed bitwise the same in
every pass, it computes :math:`\theta' = \theta + b` and the undo :math:`\theta' - b`
before writing :math:`\theta'`, and keeps the position and original value of every entry
whose undo differs from :math:`\theta` in any bit. The next pass undoes the shift
(:math:`\theta' - b`, bitwise the computation just checked) and writes those entries
back, so the weights are restored bit for bit, including signed zeros and NaNs. The log
holds about 4% of the entries at :math:`\varepsilon = 10^{-3}` (0.8% at 1e-4), 8 bytes
each, and only from one pass to the next; keeping it costs about as much time as MeZO's
passes themselves (one CPU thread: 33 against 16 ms per MLP step at batch 64). Both modes perturb with the same arithmetic
(:math:`\theta \pm b`), so they see bitwise the same losses.

**The loss returned** is the mean of the :math:`2K` losses at :math:`\theta \pm \varepsilon v_k`,
as MeZO reports it, not a third forward pass at :math:`\theta`: it differs from
:math:`L(\theta)` by :math:`\tfrac{\varepsilon^2}2\, v^\top \nabla^2 L\, v` on average (6e-6 on
the MLP at :math:`\varepsilon = 10^{-3}`), far below
the batch-to-batch spread of the loss, and the third pass would cost 50% more.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from .losses import cross_entropy
from .optim import is_plain_sgd
from .tangents import Params, check_params, flat_buffer, sample_, tree_map
from .utils import (check_batch, check_callable, check_choice, check_generator, check_positive, check_type,
                    short_repr)

__all__ = ["CHUNK", "SAMPLERS", "ZerothOrderGradient", "directional_difference", "zeroth_step"]

#: directions with i.i.d. zero-mean, unit-variance entries (rank-one tangents save
#: forward-mode work, of which a zeroth-order estimate does none)
SAMPLERS = ("gaussian", "rademacher")
#: the in-place mode regenerates ``v`` and moves the weights this many entries at a time
CHUNK = 1 << 16
_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float's bits, as an integer of its size


def check_eps(eps) -> float:
    """``eps`` as a float, else ``ValueError``: a finite positive number."""
    try:
        check_positive("eps", eps)
    except ValueError:
        raise ValueError(f"eps={short_repr(eps)} is not allowed: use a finite positive number, the step of the "
                         "finite difference (e.g. 1e-3).") from None
    return float(eps)


def check_num_directions(num_directions) -> int:
    """``num_directions`` as an int, else ``ValueError``: a positive integer (not a bool or a float)."""
    check_positive("num_directions", num_directions, integer=True)
    return int(num_directions)


def directional_difference(f: Callable[[Params], Tensor], params: Params, tangents: Params,
                           eps: float = 1e-3) -> Tensor:
    r"""The central difference :math:`(f(\theta+\varepsilon v) - f(\theta-\varepsilon v))/(2\varepsilon)`:
    :math:`\nabla f\cdot v + O(\varepsilon^2)` from two calls of ``f``, no derivative at all.
    The zeroth-order counterpart of ``fgtutor.forward.directional_derivative``; the
    points are :math:`\theta \pm b` with :math:`b = \varepsilon v`, as ``ZerothOrderGradient``
    computes them."""
    check_callable("f", f, "a function of params that returns a scalar tensor")
    check_params(params)
    eps = check_eps(eps)
    b = tree_map(lambda t: t * eps, tangents)
    return (f(tree_map(torch.add, params, b)) - f(tree_map(torch.sub, params, b))) / (2 * eps)


def _differ(a: Tensor, b: Tensor) -> Tensor:
    """The positions (int32) where two 1-d float tensors differ in any bit: a signed zero
    and a NaN's payload count, unlike for ``!=``. (On the CPU through NumPy, several times
    quicker than torch's comparison and ``nonzero`` on a few thousand entries.)"""
    ints = _INTS[a.element_size()]
    a, b = a.view(ints), b.view(ints)
    if a.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(a.numpy() != b.numpy()).astype(np.int32))
    return (a != b).nonzero().squeeze(1).to(torch.int32)


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers one block of memory without gaps (contiguous, channels-last, ...)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True


class ZerothOrderGradient:
    r"""Two-point SPSA estimates of the gradient of ``loss_fn(model(x), y)`` from loss values.

    ``estimate = ZerothOrderGradient(model)``; ``loss = estimate(x, y)`` draws
    ``num_directions`` directions :math:`v_k` (``"gaussian"`` or ``"rademacher"`` entries),
    evaluates :math:`L(\theta \pm \varepsilon v_k)` under ``torch.no_grad()`` (no autograd
    graph) and returns the mean of those :math:`2K` losses (detached; the module docstring
    says why not :math:`L(\theta)` itself). What ``p.grad`` holds afterwards:

    * ``in_place=False``: :math:`\hat g = \frac1K\sum_k p_k v_k` with
      :math:`p_k = (L(\theta+\varepsilon v_k) - L(\theta-\varepsilon v_k))/(2\varepsilon)`, for
      every trainable parameter; ``optimizer.step()`` applies it, as after ``loss.backward()``.
      The weights are never written.
    * ``in_place=True`` (MeZO): nothing; ``p.grad`` keeps whatever it held (``None`` after
      ``optimizer.zero_grad()``). The estimate is ``seeds`` and ``projections`` (the
      :math:`p_k`); ``step_(lr)`` applies it without forming it, ``write_grad_()`` writes it
      into ``p.grad``. The weights are moved in place and restored bit for bit.

    Each direction is drawn from its own seed (``seeds``, from ``generator``), parameter
    by parameter in memory order, ``CHUNK`` entries at a time, so both modes use the same
    :math:`v_k` for the same generator state (``direction(seed)`` rebuilds one).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
        *,
        eps: float = 1e-3,
        num_directions: int = 1,
        sampler: str = "gaussian",
        generator: Optional[torch.Generator] = None,
        in_place: bool = False,
    ) -> None:
        check_type("model", model, nn.Module, "a torch.nn.Module, e.g. fgtutor.models.MLP()")
        check_callable("loss_fn", loss_fn, "a function of (logits, labels) that returns a scalar tensor, "
                                           "e.g. fgtutor.losses.cross_entropy")
        self.eps = check_eps(eps)
        self.num_directions = check_num_directions(num_directions)
        check_choice("sampler", sampler, SAMPLERS)
        check_generator(generator)
        check_type("in_place", in_place, bool, "True (MeZO: move the weights in place) or False (perturbed copies)")
        self.model, self.loss_fn, self.sampler, self.generator, self.in_place = model, loss_fn, sampler, generator, in_place
        self.seeds: list[int] = []           # the last estimate's directions ...
        self.projections: list[float] = []   # ... and the difference quotients p_k along them
        self._grads: Optional[tuple] = None  # (layout, flat buffer, views): p.grad
        self._spares: dict = {}              # model-sized buffers of the perturbed-copies mode
        self._chunks: dict = {}              # two CHUNK-sized buffers per dtype and device (in place)
        self._log: dict = {}                 # the entries a shift could not undo: (positions, values)

    # -- the estimate -------------------------------------------------------------------

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        check_batch(x, y)
        with torch.no_grad():
            self.seeds = [self._new_seed() for _ in range(self.num_directions)]
            self.projections = []
            try:
                losses = self._estimate_in_place(x, y) if self.in_place else self._estimate_on_copies(x, y)
            except BaseException:
                self.seeds, self.projections = [], []  # no half estimate for step_ to apply
                raise
        return torch.stack(losses).mean()

    def _estimate_on_copies(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Losses at perturbed copies ``θ ± b``; ``p.grad`` ← ĝ (the first direction is
        drawn straight into it, further ones into a spare buffer and added in)."""
        params = {n: p.detach() for n, p in self._trainable().items()}
        grads = self.gradient_buffers()
        flat_grad = self._grads[1]
        _, perturbed = self._spare("perturbed", params)
        losses = []
        for k, seed in enumerate(self.seeds):
            flat_v, v = (flat_grad, grads) if k == 0 else self._spare("tangent", params)
            self._draw_(v, seed)
            for sign in (1, -1):
                for name, theta in params.items():
                    b = torch.mul(v[name], self.eps, out=perturbed[name])
                    b.add_(theta) if sign > 0 else torch.sub(theta, b, out=b)
                losses.append(self._loss(x, y, perturbed))
            self._project(losses[-2], losses[-1])
            scale = self.projections[-1] / self.num_directions
            flat_grad.mul_(scale) if k == 0 else flat_grad.add_(flat_v.mul_(scale))
        return losses

    def _estimate_in_place(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """MeZO: θ += b, evaluate, θ −= 2b, evaluate, θ += b, each move a pass that
        regenerates b = εv from the direction's seed and restores exactly."""
        losses = []
        for seed in self.seeds:
            self._shift_(seed, do=1)
            shifted = 1
            try:
                losses.append(self._loss(x, y))
                self._shift_(seed, undo=1, do=-1)
                shifted = -1
                losses.append(self._loss(x, y))
            finally:  # a failing evaluation (a bad batch) leaves the weights as they were, too
                self._shift_(seed, undo=shifted)
            self._project(losses[-2], losses[-1])
        return losses

    def _project(self, plus: Tensor, minus: Tensor) -> None:
        self.projections.append(((plus - minus) / (2 * self.eps)).item())

    def _shift_(self, seed: int, undo: int = 0, do: int = 0) -> None:
        r"""One pass over the weights, ``CHUNK`` entries at a time, with :math:`b = \varepsilon v`
        regenerated from ``seed``: first undo the last pass's shift ``θ ± b`` (``undo`` = ±1)
        exactly, by the inverse operation and the logged entries, then shift by ``do``·b,
        logging every entry whose inverse would not give it back bit for bit."""
        for key, theta, v in self._regenerate(seed, self._trainable()):
            b = v.mul_(self.eps)
            if undo:
                theta.sub_(b) if undo > 0 else theta.add_(b)
                where, value = self._log.pop(key)
                theta[where] = value
            if do:
                new = (torch.add if do > 0 else torch.sub)(theta, b, out=self._chunk(theta, 1)[:theta.numel()])
                back = (torch.sub if do > 0 else torch.add)(new, b, out=b)  # what the undo will compute
                where = _differ(back, theta)
                self._log[key] = (where, theta.index_select(0, where))
                theta.copy_(new)

    # -- using the estimate -------------------------------------------------------------

    def step_(self, lr: float) -> None:
        r"""MeZO's fused SGD step :math:`\theta \leftarrow \theta - \frac{lr}K \sum_k p_k v_k`
        for the last estimate, each :math:`v_k` regenerated from its seed: :math:`\hat g` is
        never formed and ``p.grad`` is not touched."""
        check_positive("lr", lr, allow_zero=True)
        self._check_estimated("step_")
        with torch.no_grad():
            params = self._trainable()
            for seed, projection in zip(self.seeds, self.projections):
                for _, theta, v in self._regenerate(seed, params):
                    theta.add_(v, alpha=-lr * projection / self.num_directions)

    def write_grad_(self) -> dict[str, Tensor]:
        r"""Write the last estimate :math:`\hat g = \frac1K\sum_k p_k v_k` into ``p.grad`` (the
        gradient buffers, allocated once) from the seeds: what ``in_place=False`` leaves
        there, bit for bit. For an optimizer other than plain SGD after an in-place estimate."""
        self._check_estimated("write_grad_")
        grads = self.gradient_buffers()
        with torch.no_grad():
            for k, (seed, projection) in enumerate(zip(self.seeds, self.projections)):
                scale = projection / self.num_directions
                for _, g, v in self._regenerate(seed, grads):
                    torch.mul(v, scale, out=g) if k == 0 else g.add_(v.mul_(scale))
        return grads

    def direction(self, seed: int) -> dict[str, Tensor]:
        """The direction ``v`` drawn from ``seed``, as new tensors by parameter name (for
        checking; ``directions()`` gives those of the last estimate)."""
        with torch.no_grad():
            _, views = flat_buffer({n: p.detach() for n, p in self._trainable().items()})
            self._draw_(views, seed)
        return views

    def directions(self) -> list[dict[str, Tensor]]:
        """The directions of the last estimate, rebuilt from ``seeds``."""
        return [self.direction(seed) for seed in self.seeds]

    def gradient_buffers(self) -> dict[str, Tensor]:
        """``p.grad`` of every trainable parameter, as views of one flat buffer allocated
        once (again when the parameters change shape, dtype, device or layout)."""
        named = self._trainable()
        layout = [(n, p.shape, p.stride(), p.dtype, p.device) for n, p in named.items()]
        if self._grads is None or self._grads[0] != layout:
            self._grads = (layout, *flat_buffer(named))
        views = self._grads[2]
        for name, p in named.items():
            if p.grad is not views[name]:  # e.g. optimizer.zero_grad() set it to None
                p.grad = views[name]
        return views

    # -- pieces -------------------------------------------------------------------------

    def _trainable(self) -> dict[str, nn.Parameter]:
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        kinds = {(p.dtype, p.device) for p in named.values()}
        if len(kinds) > 1:
            raise ValueError(f"all trainable parameters must share one dtype and device, got "
                             f"{', '.join(f'{d} on {v}' for d, v in sorted(kinds, key=str))}.")
        for name, p in named.items():
            if not p.is_floating_point() or not _dense(p):
                raise ValueError(f"parameter {name} must be a dense floating-point tensor, got a {p.dtype} "
                                 f"tensor with strides {p.stride()} for shape {tuple(p.shape)}.")
        return named

    def _new_seed(self) -> int:
        device = self.generator.device if self.generator is not None else "cpu"
        return int(torch.randint(2**63 - 1, (), generator=self.generator, device=device))

    def _regenerate(self, seed: int, tensors: dict[str, Tensor]) -> Iterator[tuple[tuple[str, int], Tensor, Tensor]]:
        """``(key, piece, v)`` for every piece of at most ``CHUNK`` entries of every tensor
        (by name, in memory order), with ``v`` that piece of the direction drawn from
        ``seed`` into a scratch buffer (valid until the next piece)."""
        generator = None
        for name, t in tensors.items():
            flat = t.detach().as_strided((t.numel(),), (1,))
            if generator is None:
                generator = torch.Generator(device=t.device).manual_seed(seed)
            for start in range(0, t.numel(), CHUNK):
                piece = flat[start:start + CHUNK]
                yield (name, start), piece, sample_(self._chunk(piece, 0)[:piece.numel()], self.sampler, generator)

    def _draw_(self, views: dict[str, Tensor], seed: int) -> None:
        for _, piece, v in self._regenerate(seed, views):
            piece.copy_(v)

    def _chunk(self, like: Tensor, i: int) -> Tensor:
        key = (like.dtype, like.device)
        if key not in self._chunks:
            self._chunks[key] = torch.empty(2, CHUNK, dtype=like.dtype, device=like.device)
        return self._chunks[key][i]

    def _spare(self, name: str, like: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        layout = [(n, t.shape, t.stride(), t.dtype, t.device) for n, t in like.items()]
        if name not in self._spares or self._spares[name][0] != layout:
            self._spares[name] = (layout, *flat_buffer(like))
        return self._spares[name][1:]

    def _loss(self, x: Tensor, y: Tensor, params: Optional[dict[str, Tensor]] = None) -> Tensor:
        try:
            logits = self.model(x) if params is None else functional_call(self.model, params, (x,))
            loss = self.loss_fn(logits, y)
        except (RuntimeError, IndexError) as exc:  # e.g. inputs of the wrong shape, a label out of range
            raise ValueError(f"{type(self.model).__name__} cannot take x of shape {tuple(x.shape)} with y of "
                             f"shape {tuple(y.shape)}: {str(exc).splitlines()[0]}") from exc
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor, got {short_repr(loss)}.")
        return loss.detach()

    def _check_estimated(self, what: str) -> None:
        if not self.seeds:
            raise ValueError(f"{what} applies the last estimate, and there is none yet: call estimate(x, y) first.")

    def __repr__(self) -> str:
        return (f"ZerothOrderGradient(model={type(self.model).__name__}, eps={self.eps:g}, "
                f"num_directions={self.num_directions}, sampler={self.sampler!r}, in_place={self.in_place})")


def zeroth_step(estimate: ZerothOrderGradient, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One zeroth-order training step on ``(x, y)``; returns the loss (``estimate``'s mean
    of the perturbed losses). In place with plain SGD (``fgtutor.optim.is_plain_sgd``) it is
    MeZO's fused step (``step_``, ``p.grad`` untouched); otherwise ``p.grad`` holds ĝ
    (``write_grad_`` after an in-place estimate) and ``optimizer.step()`` applies it. A
    step whose loss is not finite leaves the weights alone."""
    check_type("estimate", estimate, ZerothOrderGradient, "a ZerothOrderGradient(model)")
    check_type("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim optimizer")
    loss = estimate(x, y)
    if torch.isfinite(loss):
        if estimate.in_place and is_plain_sgd(optimizer, estimate.model):
            estimate.step_(optimizer.param_groups[0]["lr"])
            optimizer._opt_called = True  # a step was taken, outside optimizer.step(): tell the LR schedule
        else:
            if estimate.in_place:
                estimate.write_grad_()
            optimizer.step()
    return loss
