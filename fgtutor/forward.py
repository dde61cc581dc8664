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
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from . import fastjvp
from .losses import cross_entropy
from .utils import check_choice, check_positive, check_generator

SAMPLERS = ("gaussian", "rademacher")

# torch 2.14 compiles its own jvp decompositions with the deprecated torch.jit.script on the
# first forward-mode call; the warning is about torch's internals, not about this code.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
Params = Union[dict, tuple, list, Tensor]


def _tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """Apply ``fn`` leaf-wise over a tensor, or a dict / tuple / list of tensors."""
    if isinstance(tree, Tensor):
        return fn(tree, *rest)
    if isinstance(tree, dict):
        return {k: _tree_map(fn, tree[k], *(r[k] for r in rest)) for k in tree}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_tree_map(fn, t, *(r[i] for r in rest)) for i, t in enumerate(tree))
    raise ValueError(
        f"params of type {type(tree).__name__} are not allowed: use a tensor, or a dict, "
        "tuple or list of tensors."
    )


def check_sampler(sampler: str) -> None:
    check_choice("sampler", sampler, SAMPLERS)


_SIGN_TABLES: dict = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Row ``b`` holds the eight signs ``+1 if bit k of b is set else -1``, k = 0..7."""
    key = (dtype, device)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (2 * bits - 1).to(dtype=dtype, device=device)
    return _SIGN_TABLES[key]


_SCRATCH: dict = {}


def _scratch(n_words: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random words and their byte indices, reused from call to call: allocating them anew
    each step costs page faults that show in a step of a few milliseconds."""
    key = (n_words, device)
    if key not in _SCRATCH:
        if len(_SCRATCH) > 8:  # many different sizes: keep the cache small
            _SCRATCH.clear()
        _SCRATCH[key] = (torch.empty(n_words, dtype=torch.int64, device=device),
                         torch.empty(8 * n_words, dtype=torch.int32, device=device))
    return _SCRATCH[key]


def rademacher_(tangent: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fill ``tangent`` in place with independent ±1 signs, each with probability ½.

    One random bit per sign: draw ``n/64`` uniform 64-bit words, view them as bytes, and
    look every byte up in a 256 × 8 table of signs. That is exact (the bits are i.i.d.
    fair coins) and, on a CPU, an order of magnitude cheaper than ``bernoulli_(0.5)`` or
    ``normal_()``, which draw a float per entry (``BENCHMARKS.md`` has the numbers).
    """
    n = tangent.numel()
    words, index = _scratch((n + 63) // 64, tangent.device)
    words.random_(torch.iinfo(torch.int64).min, None, generator=generator)  # all 64 bits uniform
    index = index.copy_(words.view(torch.uint8))[: (n + 7) // 8]
    table = _sign_table(tangent.dtype, tangent.device)
    dense = tangent.is_contiguous() or tangent.is_contiguous(memory_format=torch.channels_last)
    if dense and n % 8 == 0:
        # i.i.d. signs fill memory in any order: write straight into the storage
        torch.index_select(table, 0, index, out=tangent.as_strided((n // 8, 8), (8, 1)))
    else:
        tangent.copy_(table.index_select(0, index).view(-1)[:n].view_as(tangent))
    return tangent


def sample_(tangent: Tensor, sampler: str = "gaussian", generator: Optional[torch.Generator] = None) -> Tensor:
    """Fill ``tangent`` in place with i.i.d. zero-mean, unit-variance entries and return it:
    ``"gaussian"`` draws N(0, 1), ``"rademacher"`` draws ±1 (``rademacher_``)."""
    if sampler == "gaussian":
        return tangent.normal_(generator=generator)
    check_sampler(sampler)
    return rademacher_(tangent, generator)


def sample_tangents(params: Params, sampler: str = "gaussian", generator: Optional[torch.Generator] = None) -> Params:
    """A random tangent with the structure, shapes, dtypes and devices of ``params``."""
    check_sampler(sampler)
    check_generator(generator)
    _check_params(params)
    return _tree_map(lambda p: sample_(torch.empty_like(p), sampler, generator), params)


def directional_derivative(f: Callable[[Params], Tensor], params: Params, tangents: Params) -> tuple[Tensor, Tensor]:
    r"""``(f(params), ∇f(params)·tangents)`` from one forward-mode pass (``torch.func.jvp``)."""
    value, dd = jvp(f, (params,), (tangents,))
    if value.dim() != 0:
        raise ValueError(f"f must return a scalar, but it returned a tensor of shape {tuple(value.shape)}.")
    return value, dd


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
    if not callable(f):
        raise ValueError(f"f={f!r} is not allowed: use a function of params that returns a scalar tensor.")
    _check_params(params)
    grads = None
    for _ in range(num_tangents):
        v = sample_tangents(params, sampler, generator)
        value, dd = directional_derivative(f, params, v)
        if grads is None:
            grads = _tree_map(lambda t: t.mul_(dd / num_tangents), v)
        else:
            grads = _tree_map(lambda g, t: g.add_(t * (dd / num_tangents)), grads, v)
    return value, grads


def _check_params(params: Params) -> None:
    leaves = [params] if isinstance(params, Tensor) else list(params.values()) if isinstance(params, dict) else (
        list(params) if isinstance(params, (tuple, list)) else None)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise ValueError(f"params must be a tensor or a non-empty dict, tuple or list of tensors, got "
                         f"{type(params).__name__}.")
    bad = [t.dtype for t in leaves if not t.is_floating_point()]
    if bad:
        raise ValueError(f"params must be floating-point tensors (a derivative needs real numbers), got {bad[0]}: "
                         "convert them with .float().")


def _check_num_tangents(num_tangents: int) -> None:
    check_positive("num_tangents", num_tangents, integer=True)


def flat_buffer(like: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """One flat buffer and, for every tensor in ``like``, a view of it with that tensor's
    shape and strides (channels-last stays channels-last). The buffer is padded to a
    multiple of 64 elements so that ``rademacher_`` fills it in one call; the padding is
    never read through the views."""
    tensors = list(like.values())
    if not tensors:
        return torch.empty(0), {}
    flat = torch.empty(-(-sum(t.numel() for t in tensors) // 64) * 64, dtype=tensors[0].dtype,
                       device=tensors[0].device)
    views, offset = {}, 0
    for name, t in like.items():
        if t.dtype != flat.dtype or t.device != flat.device:
            raise ValueError(f"all trainable parameters must share one dtype and device; {name} is "
                             f"{t.dtype} on {t.device}, others {flat.dtype} on {flat.device}.")
        dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
        strides = t.stride() if dense else torch.empty(t.shape, device="meta").stride()
        views[name] = flat.as_strided(t.shape, strides, offset)
        offset += t.numel()
    return flat, views


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
        _check_num_tangents(num_tangents)
        check_sampler(sampler)
        check_generator(generator)
        if clip is not None and not clip > 0:
            raise ValueError(f"clip={clip!r} is not allowed: use a positive number, or None for no clipping.")
        self.model, self.loss_fn = model, loss_fn
        self.num_tangents, self.sampler, self.clip, self.generator = num_tangents, sampler, clip, generator
        self.fast = fast and fastjvp.supports(model)
        self._plan = fastjvp.plan(model) if self.fast else None
        self._flat: Optional[Tensor] = None
        self._views: Optional[dict[str, Tensor]] = None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            try:
                loss, dd = self.directional_derivative(self.sample(), x, y)
            except RuntimeError as exc:  # e.g. inputs of the wrong shape: say where, in one line
                raise ValueError(f"{type(self.model).__name__} cannot take x of shape {tuple(x.shape)} with y of "
                                 f"shape {tuple(y.shape)}: {str(exc).splitlines()[0]}") from exc
            self.scale_(dd)
            if self.num_tangents > 1:  # further tangents go to one scratch buffer, added in
                flat, extra = flat_buffer(self._views)
            for _ in range(self.num_tangents - 1):  # p.grad = mean of dd_k v_k
                sample_(flat, self.sampler, self.generator)
                _, dd = self.directional_derivative(extra, x, y)
                self._flat.add_(self.scale_(dd, flat))
        return loss.detach()

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
        """Draw a fresh tangent into the gradient buffers; returns them by parameter name."""
        grads = self.gradient_buffers()
        sample_(self._flat, self.sampler, self.generator)
        return grads

    def directional_derivative(self, tangents: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The loss on ``(x, y)`` and its derivative along ``tangents`` (one forward-mode pass)."""
        if self.fast:
            logits, dlogits = fastjvp.sequential_jvp(self.model, tangents, x, self._plan)
            return fastjvp.loss_jvp(self.loss_fn, logits, dlogits, y)
        if not tangents:  # nothing trainable: torch.func.jvp needs at least one primal
            return self.loss_fn(self.model(x), y), x.new_zeros(())
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
