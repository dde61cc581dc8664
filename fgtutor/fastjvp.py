r"""Hand-written forward-mode rules for ``nn.Sequential`` stacks: the estimator's fast path.

``torch.func.jvp`` is general, but on a CPU its per-operator overhead makes a step of the
MLP cost well over a backprop step. The maths is simple enough to write out, one rule per
layer, each mapping a primal and its tangent ``(x, ẋ)`` to ``(y, ẏ)``:

* Linear  :math:`y = xW^\top + b`,  :math:`\dot y = \dot x W^\top + x\dot W^\top + \dot b`
* Conv2d  :math:`y = W * x + b`,   :math:`\dot y = W * \dot x + \dot W * x + \dot b`
* ReLU    :math:`\dot y = \dot x \odot [x > 0]`  (the same subgradient at 0 as autograd)
* MaxPool :math:`\dot y` = :math:`\dot x` at the arg-max of each window
* Flatten reshapes both.

The network's input carries no tangent (``ẋ = None``), so the first layer only needs
:math:`x\dot W^\top + \dot b`: the rules skip every product with a zero tangent.

A weight's tangent may also come as its factors (``fgtutor.tangents.RankOne``,
:math:`\dot W = u w^\top`): then :math:`x\dot W^\top = (x w)\,u^\top` is a matrix-vector
product and an outer product, and a convolution's :math:`\dot W * x` is one
single-output-channel convolution scaled by :math:`u`; no dense :math:`\dot W` is formed.

Forward mode needs no activations for later, so each rule *takes* its input pair out of a
``Dual`` and lets go of each tensor as soon as it has used it: at any moment only about two
layers' values and tangents are alive. ``tests/test_fastjvp.py`` checks each rule against
``torch.func.jvp``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

from .losses import cross_entropy
from .tangents import RankOne

Tangent = Optional[Tensor]  # None stands for an all-zero tangent

# ReLU's derivative applied in place: t ← t·[a > 0]. This is the kernel autograd itself
# uses for ReLU's backward pass, with an out= argument so no mask tensor is allocated.
_mask_by_positive = torch.ops.aten.threshold_backward.grad_input


@dataclass
class Dual:
    """A value and its tangent (``None``: zero), the unit of forward-mode differentiation."""

    value: Tensor
    tangent: Tangent = None

    def take(self) -> tuple[Tensor, Tangent]:
        """Hand both tensors over and forget them, so the taker can free them early."""
        pair = self.value, self.tangent
        self.value = self.tangent = None
        return pair


def _halves(n: int, *shape: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Two (n, *shape) views of one new (2n, *shape) buffer: primal on top, tangent below."""
    both = torch.empty(2 * n, *shape, dtype=like.dtype, device=like.device)
    return both[:n], both[n:]


def _stacked(a: Tensor, t: Tensor) -> Tensor:
    """``[a; t]`` along the batch. Free when ``a`` and ``t`` are the two halves of one
    buffer (what ``linear`` returns), a copy otherwise."""
    n = a.shape[0]
    base = a._base
    if (base is not None and t._base is base and base.is_contiguous() and base.shape[0] == 2 * n
            and a.data_ptr() == base.data_ptr() and t.data_ptr() == base[n:].data_ptr()):
        return base.view(2 * n, *a.shape[1:])
    return torch.cat([a, t])


def _affine(x: Tensor, W: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    return torch.addmm(b, x, W.t(), out=out) if b is not None else torch.mm(x, W.t(), out=out)


def linear(layer: nn.Linear, d: Dual, t: dict) -> Dual:
    W, b, dW, db = layer.weight, layer.bias, t.get("weight"), t.get("bias")
    x, dx = d.take()
    x2 = x.reshape(-1, x.shape[-1])  # addmm wants matrices; Linear acts on the last dimension
    n, out_shape = x2.shape[0], (*x.shape[:-1], W.shape[0])
    if dx is None:
        if dW is None and db is None:
            return Dual(F.linear(x, W, b))
        # the network's input has no tangent: ẏ = x Ẇᵀ + ḃ, written below y in one buffer
        y, dy = _halves(n, W.shape[0], like=x)
        _affine(x2, W, b, out=y)
        if isinstance(dW, RankOne):  # x Ẇᵀ = (x w) uᵀ
            torch.outer(x2 @ dW.w, dW.u, out=dy)
            if db is not None:
                dy.add_(db)
        elif dW is not None:
            _affine(x2, dW, db, out=dy)
        else:
            dy.copy_(db.expand_as(dy))
        return Dual(y.view(out_shape), dy.view(out_shape))
    # one matmul of the stacked [x; ẋ] gives x Wᵀ + b and ẋ Wᵀ + b together, reading W once
    both = F.linear(_stacked(x2, dx.reshape(-1, dx.shape[-1])), W, b)
    y, dy = both[:n], both[n:]
    if isinstance(dW, RankOne):
        dy.addr_(x2 @ dW.w, dW.u)
    elif dW is not None:
        dy.addmm_(x2, dW.t())
    if b is not None:  # the stacked matmul gave the tangent half b as well...
        dy.sub_(b)
    if db is not None:  # ...where it needs ḃ
        dy.add_(db)
    return Dual(y.view(out_shape), dy.view(out_shape))


def conv2d(layer: nn.Conv2d, d: Dual, t: dict) -> Dual:
    W, b, dW, db = layer.weight, layer.bias, t.get("weight"), t.get("bias")

    def conv(inp: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return F.conv2d(inp, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    # three separate convolutions measured faster here than stacking [x; ẋ] along the batch;
    # the order lets ẋ go first, so at most x, ẏ and one more map are alive at once
    x, dx = d.take()
    dy = None if dx is None else conv(dx, W)
    del dx
    if isinstance(dW, RankOne) and layer.groups == 1:  # Ẇ * x = u · ((w ⊗ s) * x): one output channel
        part = conv(x, dW.kernel().to(memory_format=_format(x))).mul(dW.u.view(1, -1, 1, 1))
        if db is not None:
            part.add_(db.view(1, -1, 1, 1))
        dy, dW, db = (part if dy is None else dy.add_(part)), None, None
    elif isinstance(dW, RankOne):
        dW = dW.dense()
    if dW is not None:  # Ẇ * x + ḃ in one call
        dy = conv(x, dW, db) if dy is None else dy.add_(conv(x, dW, db))
    y = conv(x, W, b)
    if dW is None and db is not None:
        db = db.view(1, -1, 1, 1)
        dy = db.expand_as(y).clone() if dy is None else dy.add_(db)
    return Dual(y, dy)


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format


def relu(layer: nn.ReLU, d: Dual, t: dict) -> Dual:
    x, dx = d.take()
    if dx is None:  # x may be the caller's input: leave it alone
        return Dual(F.relu(x))
    # x and ẋ were made by the layers before, so both are ours to overwrite
    y = x.clamp_min_(0)
    return Dual(y, _mask_by_positive(dx, y, 0, grad_input=dx))  # y > 0 exactly where x > 0


def max_pool2d(layer: nn.MaxPool2d, d: Dual, t: dict) -> Dual:
    x, dx = d.take()
    y, idx = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          ceil_mode=layer.ceil_mode, return_indices=True)
    del x
    if dx is None:
        return Dual(y)
    # the indices address each (sample, channel) plane flattened, as autograd routes them
    if dx.is_contiguous():
        return Dual(y, dx.flatten(2).gather(2, idx.flatten(2)).view_as(y))
    # channels-last: gather in an (N, H·W, C) view instead of copying to NCHW first
    n, c = y.shape[:2]
    nhwc = dx.permute(0, 2, 3, 1).reshape(n, -1, c)
    dy = nhwc.gather(1, idx.permute(0, 2, 3, 1).reshape(n, -1, c))
    return Dual(y, dy.view(n, *y.shape[2:], c).permute(0, 3, 1, 2))


def flatten(layer: nn.Flatten, d: Dual, t: dict) -> Dual:
    x, dx = d.take()
    return Dual(layer(x), None if dx is None else layer(dx))


RULES: dict[type, Callable] = {
    nn.Linear: linear,
    nn.Conv2d: conv2d,
    nn.ReLU: relu,
    nn.MaxPool2d: max_pool2d,
    nn.Flatten: flatten,
}


def _supported(layer: nn.Module) -> bool:
    if type(layer) not in RULES:
        return False
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return False
    if isinstance(layer, nn.MaxPool2d) and layer.return_indices:
        return False
    return True


def supports(model: nn.Module) -> bool:
    """True when ``model`` is an ``nn.Sequential`` of distinct layers with a rule and no buffers.

    A layer instance used twice is listed once by ``named_children``, so such a model
    falls back to ``torch.func`` instead.
    """
    return (isinstance(model, nn.Sequential) and len(model) > 0
            and len({id(m) for m in model}) == len(model)
            and all(_supported(m) for m in model) and next(model.buffers(), None) is None)


Plan = list[tuple[Callable, nn.Module, dict[str, str]]]


def plan(model: nn.Sequential) -> Plan:
    """For every layer in order: its rule, the layer, and its parameters' full names.
    Worked out once per model, so a step spends no time on it."""
    return [(RULES[type(layer)], layer, {p: f"{name}.{p}" for p, _ in layer.named_parameters(recurse=False)})
            for name, layer in model.named_children()]


def sequential_jvp(model: nn.Sequential, tangents: dict, x: Tensor,
                   layers: Optional[Plan] = None) -> tuple[Tensor, Tangent]:
    """``(model(x), d model(x)[v])`` where ``tangents`` maps parameter names to ``v``.

    Parameters missing from ``tangents`` (frozen ones) get a zero tangent. ``layers`` is
    ``plan(model)``, computed here when not given. Run it under ``torch.no_grad()``:
    nothing here needs autograd.
    """
    d = Dual(x)
    del x  # from here on, the rules decide when a tensor is no longer needed
    for rule, layer, names in layers if layers is not None else plan(model):
        d = rule(layer, d, {p: tangents.get(full) for p, full in names.items()})
    return d.take()


def cross_entropy_jvp(logits: Tensor, dlogits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean cross-entropy and its directional derivative
    :math:`\frac1B\sum_b \big(\sum_k \mathrm{softmax}(z_b)_k \dot z_{bk} - \dot z_{b t_b}\big)`."""
    log_p = F.log_softmax(logits, dim=1)
    loss = F.nll_loss(log_p, targets)
    # nll_loss(ż, t) = -mean_b ż_{b t_b}
    dd = torch.dot(log_p.exp_().view(-1), dlogits.reshape(-1)) / len(targets) + F.nll_loss(dlogits, targets)
    return loss, dd


def loss_jvp(loss_fn: Callable, logits: Tensor, dlogits: Tangent, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Loss value and directional derivative, with the closed form for cross-entropy."""
    if dlogits is None:  # nothing is trainable
        return loss_fn(logits, targets), logits.new_zeros(())
    if loss_fn is cross_entropy or loss_fn is F.cross_entropy:
        return cross_entropy_jvp(logits, dlogits, targets)
    return jvp(lambda z: loss_fn(z, targets), (logits,), (dlogits,))
