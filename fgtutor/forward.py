r"""The forward-gradient estimator (Baydin et al. 2022), on ``torch.func``.

For a scalar function :math:`f(\theta)` and a random tangent :math:`v`, one forward-mode
pass gives the value and the directional derivative :math:`f'(\theta; v) = \nabla f\cdot v`
without a backward pass. The *forward gradient* is

.. math:: g(\theta) = (\nabla f(\theta)\cdot v)\, v .

It is unbiased whenever the components of :math:`v` are independent, zero-mean and of unit
variance, because then :math:`\mathbb E[v v^\top] = I` and
:math:`\mathbb E[g] = \mathbb E[v v^\top]\nabla f = \nabla f`. Gaussian :math:`N(0, I)` and
Rademacher (:math:`\pm 1` with probability ½) tangents both qualify; Rademacher is cheaper
to draw and has slightly lower variance (:math:`v_i^2 = 1` exactly). The variance grows
with the number of parameters :math:`N`: the cosine between :math:`g` and
:math:`\nabla f` is about :math:`1/\sqrt N`. Averaging :math:`K` independent estimates
divides the variance by :math:`K`.

Two ways in:

* ``forward_gradient(f, params)`` for any function of a dict (or tuple) of tensors;
* ``ForwardGradient(model, loss_fn)`` for training: it writes the estimate into ``p.grad``
  so that any ``torch.optim`` optimizer applies it, exactly where backprop would have
  written the true gradient. For ``nn.Sequential`` stacks of Linear / Conv2d / ReLU /
  MaxPool2d / Flatten layers it uses hand-written forward-mode rules (``fgtutor.fastjvp``)
  that are several times cheaper than ``torch.func.jvp``; anything else falls back to
  ``torch.func.jvp`` + ``functional_call``.

How the tangents are drawn, quickly, is ``fgtutor.tangents``'s business.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from . import fastjvp
from .losses import cross_entropy
from .tangents import (SAMPLERS, Params, RankOne, check_params, check_sampler, flat_buffer, rademacher_,
                       rank_one, rank_one_sizes, sample_, sample_tangents, tree_map)
from .utils import check_batch, check_callable, check_generator, check_positive

__all__ = ["SAMPLERS", "ForwardGradient", "directional_derivative", "forward_gradient", "sample_tangents"]

# torch 2.14 compiles its own jvp decompositions with the deprecated torch.jit.script on the
# first forward-mode call; the warning is about torch's internals, not about this code.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


_F = "a function of params that returns a scalar tensor"


def directional_derivative(f: Callable[[Params], Tensor], params: Params, tangents: Params) -> tuple[Tensor, Tensor]:
    r"""``(f(params), ∇f(params)·tangents)`` from one forward-mode pass (``torch.func.jvp``)."""
    check_callable("f", f, _F)
    check_params(params)
    if not _same_shapes(params, tangents):
        got = f"shape {tuple(tangents.shape)}" if isinstance(tangents, Tensor) else type(tangents).__name__
        want = f"shape {tuple(params.shape)}" if isinstance(params, Tensor) else type(params).__name__
        raise ValueError(f"tangents must have the structure and shapes of params (e.g. sample_tangents(params)): "
                         f"params: {want}; tangents: {got}.")
    try:
        value, dd = jvp(f, (params,), (tangents,))
    except RuntimeError as exc:
        if not str(exc).startswith("jvp("):  # raised inside f itself: the caller's own error, as it is
            raise
        raise ValueError(f"f must return a scalar tensor ({str(exc).splitlines()[0]}).") from exc
    if value.dim() != 0:
        raise ValueError(f"f must return a scalar, but it returned a tensor of shape {tuple(value.shape)}.")
    return value, dd


def _same_shapes(params: Params, tangents: Params) -> bool:
    """Whether ``tangents`` is a tensor, dict, tuple or list like ``params``, leaf for leaf."""
    if isinstance(params, Tensor):
        return isinstance(tangents, Tensor) and tangents.shape == params.shape
    if isinstance(params, dict):
        return (isinstance(tangents, dict) and tangents.keys() == params.keys()
                and all(_same_shapes(params[k], tangents[k]) for k in params))
    return (isinstance(tangents, (tuple, list)) and len(tangents) == len(params)
            and all(map(_same_shapes, params, tangents)))


def forward_gradient(
    f: Callable[[Params], Tensor],
    params: Params,
    *,
    num_tangents: int = 1,
    sampler: str = "gaussian",
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Params]:
    r"""The forward gradient :math:`\frac1K\sum_{k=1}^K (\nabla f\cdot v_k)\,v_k` and ``f(params)``.

    ``params`` is a tensor, or a dict / tuple / list of tensors; the estimate has the same
    structure. Costs ``num_tangents`` forward-mode passes and no backward pass.
    """
    _check_num_tangents(num_tangents)
    check_sampler(sampler)
    check_generator(generator)
    check_callable("f", f, _F)
    check_params(params)
    grads = None
    for _ in range(num_tangents):
        v = sample_tangents(params, sampler, generator)
        value, dd = directional_derivative(f, params, v)
        if grads is None:
            grads = tree_map(lambda t: t.mul_(dd / num_tangents), v)
        else:
            grads = tree_map(lambda g, t: g.add_(t * (dd / num_tangents)), grads, v)
    return value, grads


def _check_num_tangents(num_tangents: int) -> None:
    check_positive("num_tangents", num_tangents, integer=True)


def densify_(tangents: dict[str, Union[RankOne, Tensor]], out: dict[str, Tensor]) -> None:
    """Write each (possibly factored) tangent densely into ``out[name]``."""
    for name, t in tangents.items():
        out[name].copy_(t.dense() if isinstance(t, RankOne) else t)


class ForwardGradient:
    r"""Write a forward-gradient estimate into ``p.grad`` of every trainable parameter.

    ``estimate = ForwardGradient(model, loss_fn)``; then ``loss = estimate(x, y)`` sets
    ``p.grad = (1/K) Σ_k clip(∇L·v_k) v_k`` for every ``p`` with ``requires_grad`` and
    returns the (detached) loss, so any ``torch.optim`` optimizer can take the step::

        loss = estimate(x, y)      # backprop would do: loss = loss_fn(model(x), y); loss.backward()
        optimizer.step()

    ``clip`` bounds the scalar directional derivative to ``[-clip, clip]``. The original
    repository needed ``clip=1`` for stability; note that it makes the estimator *biased*
    (large directional derivatives are shrunk), unlike the plain forward gradient.

    The tangents are drawn straight into ``p.grad`` (views of one flat buffer, allocated
    once and reused), so the estimator needs no memory beyond the gradient buffers
    backprop would use.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
        *,
        num_tangents: int = 1,
        sampler: str = "rademacher",
        clip: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        fast: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={model!r} is not allowed: use a torch.nn.Module, e.g. fgtutor.models.MLP().")
        check_callable("loss_fn", loss_fn, "a function of (logits, labels) that returns a scalar tensor, "
                                           "e.g. fgtutor.losses.cross_entropy")
        _check_num_tangents(num_tangents)
        check_sampler(sampler)
        check_generator(generator)
        if clip is not None and not (isinstance(clip, numbers.Real) and not isinstance(clip, bool) and clip > 0):
            raise ValueError(f"clip={clip!r} is not allowed: use a positive number, or None for no clipping.")
        self.model, self.loss_fn = model, loss_fn
        self.num_tangents, self.sampler, self.clip, self.generator = num_tangents, sampler, clip, generator
        self.fast = fast and fastjvp.supports(model)
        self._plan = fastjvp.plan(model) if self.fast else None
        self._flat: Optional[Tensor] = None
        self._views: Optional[dict[str, Tensor]] = None
        self._signs: Optional[Tensor] = None  # rank-one factors, drawn in one call
        self._last: dict = {}  # the last rank-one tangent, for descend_

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            loss, dd = self.loss_and_derivative(x, y)
            if self.sampler == "rank1":  # the factors become the dense tangent in p.grad
                densify_(self._last, self._views)
            self.scale_(dd)
            if self.num_tangents > 1:  # further tangents go to one scratch buffer, added in
                flat, extra = flat_buffer(self._views)
            for _ in range(self.num_tangents - 1):  # p.grad = mean of dd_k v_k
                if self.sampler == "rank1":
                    tangents = self._rank_one_tangents()
                    _, dd = self.directional_derivative(tangents, x, y)
                    densify_(tangents, extra)
                else:
                    sample_(flat, self.sampler, self.generator)
                    _, dd = self.directional_derivative(extra, x, y)
                self._flat.add_(self.scale_(dd, flat))
        return loss.detach()

    def loss_and_derivative(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Draw a fresh tangent (``sample``) and return the loss on ``(x, y)`` and its
        derivative along it: the first pass of every step, fused or not. A batch the model
        cannot take is a ``ValueError`` that says so in one line."""
        check_batch(x, y)
        try:
            return self.directional_derivative(self.sample(), x, y)
        except (RuntimeError, IndexError) as exc:  # e.g. inputs of the wrong shape, a label out of range
            raise ValueError(f"{type(self.model).__name__} cannot take x of shape {tuple(x.shape)} with y of "
                             f"shape {tuple(y.shape)}: {str(exc).splitlines()[0]}") from exc

    # The parts of a step, separately callable so that fgtutor.bench can time them.

    def gradient_buffers(self) -> dict[str, Tensor]:
        """``p.grad`` of every trainable parameter, as views of one flat buffer allocated
        once: tangents are drawn straight into it (one call for the whole model), so the
        estimator needs no memory beyond the gradients backprop would store."""
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # rebuilt when the parameters changed under us: model.double(), .to(device) or
        # another memory format convert the parameters and swap the storage of their
        # gradients, so the old views would no longer be in the buffer tangents go to
        if self._views is None or self._views.keys() != named.keys() or any(
                (p.shape, p.dtype, p.device, p.stride()) != (v.shape, v.dtype, v.device, v.stride())
                or v.untyped_storage().data_ptr() != self._flat.untyped_storage().data_ptr()
                for n, p in named.items() for v in [self._views[n]]):
            self._flat, self._views = flat_buffer(named)
        for name, p in named.items():
            if p.grad is not self._views[name]:  # e.g. optimizer.zero_grad() set it to None
                p.grad = self._views[name]
        return self._views

    def sample(self) -> dict[str, Tensor]:
        """Draw a fresh tangent into the gradient buffers; returns them by parameter name.
        With ``sampler="rank1"`` the tangent is returned as factors (``RankOne`` for each
        weight, signs for the rest) and the gradient buffers are left alone."""
        grads = self.gradient_buffers()
        if self.sampler == "rank1":
            return self._rank_one_tangents()
        sample_(self._flat, self.sampler, self.generator)
        return grads

    def _rank_one_tangents(self) -> dict[str, Union[RankOne, Tensor]]:
        """A rank-one tangent for every trainable parameter, all its signs drawn in one call."""
        sizes = {n: sum(rank_one_sizes(v.shape)) for n, v in self._views.items()}
        total = -(-sum(sizes.values()) // 64) * 64
        if self._signs is None or self._signs.numel() != total or self._signs.dtype != self._flat.dtype \
                or self._signs.device != self._flat.device:
            self._signs = torch.empty(total, dtype=self._flat.dtype, device=self._flat.device)
        rademacher_(self._signs, self.generator)
        tangents, offset = {}, 0
        for name, view in self._views.items():
            tangents[name] = rank_one(view.shape, view, signs=self._signs[offset:offset + sizes[name]])
            offset += sizes[name]
        self._last = tangents
        return tangents

    def descend_(self, scale: float) -> None:
        """``θ ← θ − scale · v`` along the last rank-one tangent, without forming it: a
        weight matrix takes a rank-one update (``addr_``). The fused SGD step of
        ``fgtutor.optim.forward_step`` with ``scale = lr · dd``."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in self._last.items():
                p = params[name]
                if isinstance(t, RankOne) and t.s is None:
                    p.addr_(t.u, t.w, alpha=-scale)
                else:  # a convolution's weight (small) or a vector of signs
                    p.add_(t.dense() if isinstance(t, RankOne) else t, alpha=-scale)

    def directional_derivative(self, tangents: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The loss on ``(x, y)`` and its derivative along ``tangents`` (one forward-mode pass)."""
        if self.fast:
            logits, dlogits = fastjvp.sequential_jvp(self.model, tangents, x, self._plan)
            return fastjvp.loss_jvp(self.loss_fn, logits, dlogits, y)
        if not tangents:  # nothing trainable: torch.func.jvp needs at least one primal
            return self.loss_fn(self.model(x), y), x.new_zeros(())
        tangents = {n: t.dense() if isinstance(t, RankOne) else t for n, t in tangents.items()}
        params = {n: p.detach() for n, p in self.model.named_parameters() if n in tangents}
        rest = {n: p for n, p in self.model.named_parameters() if n not in tangents}
        buffers = dict(self.model.named_buffers())

        def loss_of(p: dict) -> Tensor:
            return self.loss_fn(functional_call(self.model, (p, rest, buffers), (x,)), y)

        return directional_derivative(loss_of, params, tangents)

    def clip_(self, dd: Tensor) -> Tensor:
        """The directional derivative as the estimate uses it: clamped to ``±clip`` if set."""
        return dd if self.clip is None else dd.clamp(-self.clip, self.clip)

    def scale_(self, dd: Tensor, flat: Optional[Tensor] = None) -> Tensor:
        """Turn a tangent into its share of the estimate in place: ``v ← clip(dd) · v / K``
        (by default the one in the gradient buffers); returns the flat buffer."""
        flat = self._flat if flat is None else flat
        return flat.mul_(self.clip_(dd) / self.num_tangents)

    def __repr__(self) -> str:
        return (f"ForwardGradient(model={type(self.model).__name__}, num_tangents={self.num_tangents}, "
                f"sampler={self.sampler!r}, clip={self.clip}, fast={self.fast})")
