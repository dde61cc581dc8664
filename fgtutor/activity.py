r"""Forward gradients that perturb *activities* instead of weights (Ren et al. 2023).

Weight perturbation (``fgtutor.forward``, "FG-W") draws one tangent over all
:math:`N` weights; its variance grows with :math:`N`. Activity perturbation ("FG-A")
draws, for every example :math:`b`, an independent tangent :math:`u_{lb}` on the
pre-activation :math:`z_l = W_l a_{l-1} + b_l` of every linear layer, and pushes them
through the network in one forward-mode pass. The pass gives each example's directional
derivative :math:`d_b = \sum_l \nabla_{z_{lb}} L \cdot u_{lb}`, and

.. math:: \hat g_{z_{lb}} = d_b\, u_{lb}, \qquad
          \hat g_{W_l} = \sum_b \hat g_{z_{lb}}\, a_{l-1,b}^\top, \qquad
          \hat g_{b_l} = \sum_b \hat g_{z_{lb}}

estimate :math:`\partial L/\partial z` without bias (:math:`\mathbb E[u u^\top] = I`, and the
other layers' and examples' tangents are independent and zero-mean) and then form the
weight gradient from it exactly as backprop forms :math:`\partial L/\partial W` from
:math:`\partial L/\partial z`: with no backward pass through the network. For one
example and one :math:`p \to q` layer the estimate's variance is
:math:`(q+1)\,\lVert\nabla_W L\rVert^2` with Gaussian tangents (:math:`q-1` with
Rademacher ones) against :math:`(pq+1)\,\lVert\nabla_W L\rVert^2` for weight perturbation:
it grows with the layer's width, not its number of weights.

With a model that defines *local losses* (``fgtutor.models.LocalMLP``, "LG-FG-A") each
group of units is perturbed only for its own loss, so an estimate covers one group of one
block. The local heads and the output layer are linear layers on inputs that carry no
gradient (a stop-gradient), so their exact gradients are one outer product each,
:math:`\nabla_H L = e^\top a` with :math:`e = \partial L/\partial(\text{logits})` =
(softmax − one-hot)/B in closed form: still no backward pass through the network.

``ActivityGradient(model)`` writes the estimate into ``p.grad``, like
``fgtutor.forward.ForwardGradient``, so any ``torch.optim`` optimizer applies it and
``fgtutor.train.fit(perturb="activities")`` trains with it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import cross_entropy
from .models import LocalMLP, normalize
from .tangents import rademacher_
from .utils import check_batch, check_callable, check_choice, check_generator, check_positive, check_type

SAMPLERS = ("gaussian", "rademacher")
_LAYERS = (nn.Flatten, nn.Linear, nn.ReLU)


def supports(model: nn.Module) -> bool:
    """True for a ``LocalMLP``, or an ``nn.Sequential`` of Flatten / Linear / ReLU layers
    that ends in a Linear layer (the logits)."""
    if isinstance(model, LocalMLP):
        return True
    return (isinstance(model, nn.Sequential) and len(model) > 0 and isinstance(model[-1], nn.Linear)
            and all(type(layer) in _LAYERS for layer in model))


def reference_gradient(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """autograd's gradient of what the estimators estimate, one tensor per parameter: the
    mean cross-entropy of ``model(x)``, or for a ``LocalMLP`` the sum of its local losses
    (zeros for a parameter the loss does not reach). For checking, not for training."""
    check_type("model", model, nn.Module, "a torch.nn.Module, e.g. fgtutor.models.MLP()")
    check_batch(x, y)
    with torch.enable_grad():
        loss = sum(model.local_losses(x, y)) if isinstance(model, LocalMLP) else F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def cosines(estimate: Callable[[Tensor, Tensor], Tensor], model: nn.Module, x: Tensor, y: Tensor,
            draws: int, only: str = "") -> list[float]:
    r"""The cosine between ``draws`` fresh estimates (``estimate(x, y)`` filling ``p.grad``,
    e.g. ``ActivityGradient`` or ``ForwardGradient``) and ``reference_gradient``, over all
    parameters whose name starts with ``only`` (default: all) at once. For weight perturbation with :math:`K` Rademacher tangents over
    :math:`N` weights it is about :math:`1/\sqrt{1 + (N-1)/K}` (``weight_cosine``)."""
    check_callable("estimate", estimate, "an estimator that fills p.grad when called with (x, y), "
                                         "e.g. ForwardGradient(model) or ActivityGradient(model)")
    check_type("model", model, nn.Module, "the torch.nn.Module the estimator fills p.grad of")
    check_positive("draws", draws, integer=True)
    check_type("only", only, str, 'a prefix of parameter names, or "" for all of them')
    names = [n for n, _ in model.named_parameters()]
    if not any(n.startswith(only) for n in names):
        raise ValueError(f"only={only!r} matches no parameter of {type(model).__name__}; names start with "
                         f"{', '.join(sorted({n.split('.')[0] for n in names}))}.")
    keep = [n.startswith(only) for n in names]
    true = torch.cat([g.flatten() for g, k in zip(reference_gradient(model, x, y), keep) if k])
    out = []
    for _ in range(draws):
        estimate(x, y)
        g = torch.cat([p.grad.flatten() for p, k in zip(model.parameters(), keep) if k])
        out.append(F.cosine_similarity(g, true, dim=0).item())
    return out


def weight_cosine(num_weights: int, num_tangents: int = 1) -> float:
    r"""The cosine weight perturbation's estimate has with the gradient, in expectation to
    first order: :math:`\lVert g\rVert / \sqrt{\mathbb E\lVert\hat g\rVert^2}
    = 1/\sqrt{1 + (N-1)/K}` for :math:`K` Rademacher tangents over :math:`N` weights."""
    check_positive("num_weights", num_weights, integer=True)
    check_positive("num_tangents", num_tangents, integer=True)
    return (1 + (num_weights - 1) / num_tangents) ** -0.5


def _set_grad(p: Tensor, value: Tensor) -> None:
    """``p.grad = value``, into the existing buffer when there is one (no allocation)."""
    if not p.requires_grad:
        return
    if p.grad is None or p.grad.shape != p.shape:
        p.grad = value.reshape(p.shape).contiguous()
    else:
        p.grad.copy_(value.view(p.shape))


def _output_error(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and its exact gradient w.r.t. the logits, (softmax − one-hot)/B,
    over the last dimension (logits of shape B×C or B×G×C)."""
    log_p = F.log_softmax(logits, -1)
    one_hot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    if logits.dim() == 3:
        one_hot = one_hot[:, None, :]
    loss = -(log_p * one_hot).sum(-1).mean(0).sum()  # Σ over groups of each group's mean CE
    return loss, log_p.exp_().sub_(one_hot).div_(len(y))


class ActivityGradient:
    r"""Write an activity-perturbation forward gradient into ``p.grad``.

    ``estimate = ActivityGradient(model)``; ``loss = estimate(x, y)`` fills ``p.grad`` of
    every trainable parameter and returns the (detached) loss of the model's output, so
    any ``torch.optim`` optimizer takes the step. For an ``nn.Sequential`` MLP it
    estimates the gradient of the mean cross-entropy (FG-A); for a ``LocalMLP`` that of
    the sum of its local losses (LG-FG-A, ``LocalMLP.local_losses``). One forward-mode
    pass, no autograd graph: everything runs under ``torch.no_grad()``.

    ``sampler`` draws the per-example tangents: ``"rademacher"`` (±1) or ``"gaussian"``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy, *,
                 sampler: str = "rademacher", generator: Optional[torch.Generator] = None) -> None:
        if not isinstance(model, nn.Module) or not supports(model):
            raise ValueError(f"activity perturbation supports a LocalMLP or an nn.Sequential of Flatten, Linear "
                             f"and ReLU layers ending in Linear, not {type(model).__name__}; use perturb='weights' "
                             "(ForwardGradient) for other models.")
        if loss_fn is not cross_entropy and loss_fn is not F.cross_entropy:
            raise ValueError(f"activity perturbation needs each example's loss derivative, which it has in closed "
                             f"form for cross-entropy only; loss_fn={getattr(loss_fn, '__name__', loss_fn)!r} "
                             "is not supported.")
        check_choice("sampler", sampler, SAMPLERS)
        check_generator(generator)
        self.model, self.loss_fn, self.sampler, self.generator = model, loss_fn, sampler, generator
        self._buffer: Optional[Tensor] = None

    def tangents(self, batch: int, widths: list[int], like: Tensor) -> list[Tensor]:
        """Fresh per-example tangents, one ``batch × width`` matrix per perturbed layer,
        all drawn in one call into one reused buffer."""
        total = -(-batch * sum(widths) // 64) * 64
        if self._buffer is None or self._buffer.numel() != total or self._buffer.dtype != like.dtype \
                or self._buffer.device != like.device:
            self._buffer = torch.empty(total, dtype=like.dtype, device=like.device)
        if self.sampler == "gaussian":
            self._buffer.normal_(generator=self.generator)
        else:
            rademacher_(self._buffer, self.generator)
        out, offset = [], 0
        for width in widths:
            out.append(self._buffer[offset:offset + batch * width].view(batch, width))
            offset += batch * width
        return out

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        check_batch(x, y)
        try:
            if isinstance(self.model, LocalMLP):
                return self._local(x, y)
            return self._global(x, y)
        except (RuntimeError, IndexError) as exc:  # e.g. inputs of the wrong shape, a label out of range
            raise ValueError(f"{type(self.model).__name__} cannot take x of shape {tuple(x.shape)} with y of "
                             f"shape {tuple(y.shape)}: {str(exc).splitlines()[0]}") from exc

    def _global(self, x: Tensor, y: Tensor) -> Tensor:
        """FG-A on a Sequential MLP: every pre-activation perturbed, one pass, global loss."""
        linears = [layer for layer in self.model if isinstance(layer, nn.Linear)]
        us = iter(self.tangents(len(x), [layer.out_features for layer in linears], x))
        h, dh, inputs = x, None, []
        for layer in self.model:
            if isinstance(layer, nn.Linear):
                u = next(us)
                inputs.append((layer, h, u))
                # ż = W ḣ + u: the tangent from the layers below plus this layer's own
                h, dh = F.linear(h, layer.weight, layer.bias), (u if dh is None else torch.addmm(u, dh, layer.weight.t()))
            elif isinstance(layer, nn.ReLU):
                dh = dh * (h > 0)
                h = F.relu(h)
            else:
                h, dh = layer(h), (None if dh is None else layer(dh))
        loss, error = _output_error(h, y)
        d = (error * dh).sum(1, keepdim=True)  # each example's directional derivative d_b
        for layer, a, u in inputs:
            g_z = u * d  # the estimate of ∂L/∂z, example by example
            _set_grad(layer.weight, g_z.t() @ a)
            if layer.bias is not None:
                _set_grad(layer.bias, g_z.sum(0))
        return loss

    def _local(self, x: Tensor, y: Tensor) -> Tensor:
        """LG-FG-A on a LocalMLP: each group of units perturbed for its own local loss."""
        model, B = self.model, len(x)
        G, C = model.groups, model.classes
        us = iter(self.tangents(B, [block.out_features for block in model.blocks], x))
        a = normalize(x.flatten(1))
        for block, head in zip(model.blocks, model.heads):
            u = next(us)
            z = F.linear(a, block.weight, block.bias)
            dh = u * (z > 0)
            h = F.relu_(z)
            D, k = h.shape[1], h.shape[1] // G
            # the normalization the heads and the next block see, with its statistics
            centred = h - h.mean(1, keepdim=True)
            rstd = centred.pow(2).mean(1, keepdim=True).add_(1e-5).rsqrt_()
            a_next = centred * rstd
            logits = F.linear(a_next, head.weight, head.bias).view(B, G, C)
            # d(logits of group g) along the tangent on group g's units only, through the
            # normalization: da = rstd·(ḣ − mean(ḣ) − a·mean(a·ḣ)), ḣ zero outside group g
            dh_g = dh.view(B, G, k)
            own = head.weight.view(G, C, G, k).diagonal(dim1=0, dim2=2).permute(2, 1, 0)  # H_g on group g: G×k×C
            m1 = dh_g.sum(2, keepdim=True) / D
            m2 = (a_next.view(B, G, k) * dh_g).sum(2, keepdim=True) / D
            dlogits = (torch.bmm(dh_g.transpose(0, 1), own).transpose(0, 1)
                       - m1 * head.weight.view(G, C, D).sum(2) - m2 * (logits - head.bias.view(G, C))) * rstd[:, :, None]
            _, error = _output_error(logits, y)
            d = (error * dlogits).sum(2, keepdim=True)  # B×G×1: one directional derivative per group
            g_z = (u.view(B, G, k) * d).view(B, D)
            _set_grad(block.weight, g_z.t() @ a)
            _set_grad(block.bias, g_z.sum(0))
            # the heads' exact gradients: linear layers on inputs that carry no gradient
            error = error.view(B, G * C)
            _set_grad(head.weight, error.t() @ a_next)
            _set_grad(head.bias, error.sum(0))
            a = a_next
        logits = F.linear(a, model.out.weight, model.out.bias)
        loss, error = _output_error(logits, y)
        _set_grad(model.out.weight, error.t() @ a)
        _set_grad(model.out.bias, error.sum(0))
        return loss

    def __repr__(self) -> str:
        kind = "local losses" if isinstance(self.model, LocalMLP) else "global loss"
        return f"ActivityGradient(model={type(self.model).__name__}, {kind}, sampler={self.sampler!r})"
