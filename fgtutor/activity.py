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

Convolutions (``fgtutor.models.ConvNet``) are perturbed the same way. A ``Conv2d``
layer's output :math:`z_l` is :math:`B\times C\times H\times W`, and its tangent has
one independent entry per example, channel and position. The one forward-mode pass
pushes the tangent through ReLU (:math:`\dot h\,[h > 0]`), MaxPool2d (each window's
tangent at its argmax; of entries tied up to rounding, the first: ``tied_max_pool2d``), Flatten, Linear and Conv2d
(:math:`\dot z = W \star \dot h + u`, the convolution without its bias), and then,
with :math:`A_{bp}` the input patch under output position :math:`p`,

.. math:: \hat g_{W_l} = \sum_{b,p} \hat g_{z_{lb}}[:, p]\, A_{l,bp}^\top, \qquad
          \hat g_{b_l} = \sum_{b,p} \hat g_{z_{lb}}[:, p],

the correlation of :math:`\hat g_z` with the layer's input, exactly as backprop forms
:math:`\partial L/\partial W` (``torch.nn.grad.conv2d_weight``). Variance: for one example
with Gaussian tangents, writing :math:`A'_l` for the :math:`P_l \times (k_l + 1)` matrix
of layer :math:`l`'s input patches (a 1 appended to each, for the bias; a Linear layer has
:math:`P = 1` patch, its input) and :math:`C_l` for its output channels,

.. math:: \mathbb E\lVert\hat g - \nabla_\theta L\rVert^2
          = \lVert\nabla_z L\rVert^2 \sum_l C_l \lVert A'_l\rVert_F^2 + \lVert\nabla_\theta L\rVert^2,

with :math:`\nabla_z L` over every perturbed output (Rademacher tangents subtract
:math:`2\sum_{l,c,p} (\partial L/\partial z_{lcp})^2 \lVert A'_{lp}\rVert^2`). For one
Linear layer :math:`\lVert\nabla_W L\rVert^2 = \lVert\nabla_z L\rVert^2 \lVert A'\rVert^2`
and this is the :math:`(q+1)\,\lVert\nabla_W L\rVert^2` above. For one convolution
Cauchy–Schwarz only gives :math:`\lVert\nabla_\theta L\rVert^2 \le \lVert\nabla_z L\rVert^2 \lVert A'\rVert^2`:
the variance is at least :math:`(C + 1)\,\lVert\nabla_\theta L\rVert^2`, and about
:math:`(C H W + 1)\,\lVert\nabla_\theta L\rVert^2` when the positions' contributions to
:math:`\nabla_\theta L` do not line up. It grows with the size of the layer's output,
:math:`C H W` entries per example, not with its :math:`C (C_{in} k^2 + 1)` weights:
ConvNet's first convolution has 64·26·26 = 43,264 output entries per example and 640
weights. Over the whole network the tangent has 91,658 entries per example against
1,171,274 weights, but that does not make the estimate better by as much: every layer's
term is weighted by :math:`C_l \lVert A'_l\rVert^2`, largest for the first convolutions,
whose estimates carry most of the noise. ``activity_jvp`` is the hand-written
forward-mode pass on its own, for checking it against ``torch.func.jvp``.

With a model that defines *local losses* (``fgtutor.models.LocalMLP``, "LG-FG-A") each
group of units is perturbed only for its own loss, so an estimate covers one group of one
block. The local heads and the output layer are linear layers on inputs that carry no
gradient (a stop-gradient), so their exact gradients are one outer product each,
:math:`\nabla_H L = e^\top a` with :math:`e = \partial L/\partial(\text{logits})` =
(softmax − one-hot)/B in closed form: still no backward pass through the network.

A ``fgtutor.models.LocalConvNet`` takes this to convolutions, where the global estimate is
worst (above: ConvNet's first convolution alone has 43,264 output entries per example).
Each block's output :math:`h = \mathrm{pool}(\mathrm{relu}(z))` falls into :math:`G`
groups of channels and :math:`P \times P` spatial patches, and loss :math:`L_{g,q}` sees
group :math:`g` in patch :math:`q` only. The per-example tangent :math:`u` on :math:`z`
goes through the ReLU and each pooling window's argmax, :math:`\dot h = J u` with
:math:`J = \partial h/\partial z` (a 0/1 selection: the entry of :math:`z` that each entry
of :math:`h` is, none where the ReLU is off), and then through the block's normalization,
the patch means and the heads in closed form, as for a LocalMLP. Loss :math:`L_{g,q}`'s
derivative :math:`d_{g,q} = \nabla_h L_{g,q} \cdot \dot h_{g,q}` uses only the part
:math:`\dot h_{g,q}` of the tangent in its own group and patch, and

.. math:: \hat g_z = J^\top(\dot h \odot d), \qquad
          \mathbb E[\hat g_z] = \sum_{g,q} J^\top J_{g,q} J_{g,q}^\top \nabla_h L_{g,q}
          = \nabla_z \sum_{g,q} L_{g,q},

with :math:`d` of each entry's own (group, patch): :math:`u \cdot d` on the entries of
:math:`z` that :math:`h` depends on, 0 on the others (where :math:`\partial L/\partial z`
is 0 too: a tangent there would only add noise). Then :math:`\hat g_W` is the correlation
of :math:`\hat g_z` with the block's input, as above. Each estimate covers the
:math:`C/G` channels of one patch, about :math:`CHW/(GP^2)` entries per example instead
of the :math:`CHW` of the whole output, and blocks pass no tangent to each other (their
inputs are detached), so the forward-mode pass needs no convolution of tangents at all.

``ActivityGradient(model)`` writes the estimate into ``p.grad``, like
``fgtutor.forward.ForwardGradient``, so any ``torch.optim`` optimizer applies it and
``fgtutor.train.fit(perturb="activities")`` trains with it.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import cross_entropy
from .models import LocalConvNet, LocalMLP, normalize, normalize_maps, patch_index, patch_means
from .tangents import rademacher_
from .utils import check_batch, check_callable, check_choice, check_generator, check_positive, check_type

SAMPLERS = ("gaussian", "rademacher")
#: the layers whose outputs are perturbed, and every layer a Sequential may have
_WEIGHTED = (nn.Linear, nn.Conv2d)
_LAYERS = (nn.Flatten, nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d)
#: the models with local losses (``local_losses``), which LG-FG-A trains
_LOCAL = (LocalMLP, LocalConvNet)


#: entries of a pooling window within this many units of rounding (times the largest |entry|
#: of the tensor) of the window's maximum count as tied with it: see ``tied_max_pool2d``
TIE_ULPS = 256


def _pairs(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _tied_max_pool_2x2(h: Tensor) -> tuple[Tensor, Tensor]:
    """``tied_max_pool2d(h, 2)`` of a B×C×H×W ``h`` in a few passes over its channels-last
    view (4× faster than the general way; ConvNet pools this way)."""
    B, C, H, W = h.shape
    Ho, Wo = H // 2, W // 2
    x = h.permute(0, 2, 3, 1)[:, :2 * Ho, :2 * Wo].reshape(B, Ho, 2, Wo, 2, C)
    e0, e1, e2, e3 = x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0], x[:, :, 1, :, 1]
    out = torch.maximum(torch.maximum(e0, e1), torch.maximum(e2, e3))
    near = out - TIE_ULPS * torch.finfo(h.dtype).eps * out.abs().amax()
    first = (e2 < near).to(torch.uint8).add_(1).mul_(e1 < near).add_(1).mul_(e0 < near)  # 0..3, row by row
    offset = (first >> 1).mul_(W - 2).add_(first)  # 0, 1, W, W + 1 from the window's corner
    corner = torch.arange(Ho, device=h.device).view(-1, 1, 1) * 2 * W + torch.arange(Wo, device=h.device).view(1, -1, 1) * 2
    return out.permute(0, 3, 1, 2), offset.long().add_(corner).permute(0, 3, 1, 2)


def tied_max_pool2d(h: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False) -> tuple[Tensor, Tensor]:
    r"""``F.max_pool2d(h, ..., return_indices=True)``, except that among the entries of a
    window that equal its maximum up to rounding (within ``TIE_ULPS`` units of rounding of
    the largest :math:`|h|`) the index is always the first, row by row.

    Why: MNIST's constant background makes whole windows of a convolution's output equal
    up to their last bits, and which of them is the argmax then depends on the CPU's
    rounding. Backprop and FG-W do not care (those entries see identical input patches),
    but FG-A routes each window's *own* random tangent from the argmax, so a different
    argmax is a different estimate: runs would not replay on another CPU. Any entry of a
    tie is an equally valid (sub)gradient route; this makes the choice one that rounding
    cannot change."""
    kh, kw = _pairs(kernel_size)
    sh, sw = _pairs(kernel_size if stride is None or stride == [] else stride)
    ph, pw = _pairs(padding)
    dh, dw = _pairs(dilation)
    if (kh, kw, sh, sw, ph, pw, dh, dw) == (2, 2, 2, 2, 0, 0, 1, 1) and not ceil_mode and h.dim() == 4 and h.shape[-1] >= 2:
        return _tied_max_pool_2x2(h)
    out, indices = F.max_pool2d(h, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode, return_indices=True)
    Ho, Wo = out.shape[-2:]
    H, W = h.shape[-2:]
    # every entry of a window, padded with -inf where a window overhangs (padding, ceil_mode)
    bottom, right = max(0, (Ho - 1) * sh + (kh - 1) * dh + 1 - H - ph), max(0, (Wo - 1) * sw + (kw - 1) * dw + 1 - W - pw)
    padded = F.pad(h, (pw, right, ph, bottom), value=-math.inf) if ph or pw or bottom or right else h
    near = out - TIE_ULPS * torch.finfo(h.dtype).eps * h.abs().amax()
    rows = torch.arange(Ho, device=h.device).view(-1, 1) * sh - ph
    cols = torch.arange(Wo, device=h.device).view(1, -1) * sw - pw
    for i in reversed(range(kh)):  # from the last entry of the window to the first: the first tie wins
        for j in reversed(range(kw)):
            entry = padded[..., i * dh:i * dh + (Ho - 1) * sh + 1:sh, j * dw:j * dw + (Wo - 1) * sw + 1:sw]
            indices = torch.where(entry >= near, (rows + i * dh) * W + cols + j * dw, indices)
    return out, indices


def _unsupported(model: nn.Module) -> Optional[str]:
    """Why activity perturbation cannot take ``model``, naming the layer; None if it can."""
    if isinstance(model, _LOCAL):
        return None
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return f"{type(model).__name__} is not a LocalMLP, a LocalConvNet or a non-empty nn.Sequential"
    for i, layer in enumerate(model):
        if type(layer) not in _LAYERS:
            return f"layer {i}, {layer}, is none of {', '.join(t.__name__ for t in _LAYERS)}"
        if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            return f"layer {i}, {layer}, is not zero-padded by a number of pixels"
    if not isinstance(model[-1], nn.Linear):
        return f"its last layer, {model[-1]}, is not a Linear layer (the logits)"
    return None


def supports(model: nn.Module) -> bool:
    """True for a ``LocalMLP`` or ``LocalConvNet``, or an ``nn.Sequential`` of Flatten / Linear / Conv2d (zero
    padding) / ReLU / MaxPool2d layers that ends in a Linear layer (the logits)."""
    return _unsupported(model) is None


def reference_gradient(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """autograd's gradient of what the estimators estimate, one tensor per parameter: the
    mean cross-entropy of ``model(x)``, or for a ``LocalMLP`` or ``LocalConvNet`` the sum of its local losses
    (zeros for a parameter the loss does not reach). For checking, not for training."""
    check_type("model", model, nn.Module, "a torch.nn.Module, e.g. fgtutor.models.MLP()")
    check_batch(x, y)
    with torch.enable_grad():
        loss = sum(model.local_losses(x, y)) if isinstance(model, _LOCAL) else F.cross_entropy(model(x), y)
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
    """``p.grad = value``, into the existing buffer when there is one (no allocation); a
    new one is laid out like ``p`` (e.g. channels-last), as autograd lays it out."""
    if not p.requires_grad:
        return
    if p.grad is None or p.grad.shape != p.shape:
        p.grad = torch.empty_like(p).copy_(value.reshape(p.shape))
    else:
        p.grad.copy_(value.view(p.shape))


def _conv_weight_grad(layer: nn.Conv2d, a: Tensor, g_z: Tensor) -> Tensor:
    """``torch.nn.grad.conv2d_weight(a, W.shape, g_z, ...)``: the correlation of ∂L/∂z
    with the input, by the kernel it calls, shown the layer's weight rather than only its
    shape so that it picks the weight's memory layout (channels-last) as autograd does
    (with a one-channel input ``conv2d_weight`` converts ∂L/∂z first: 10× slower)."""
    return torch.ops.aten.convolution_backward(g_z, a, layer.weight, None, layer.stride, layer.padding, layer.dilation,
                                               False, (0, 0), layer.groups, (False, True, False))[1]


def _set_weight_grads(layer: nn.Module, a: Tensor, g_z: Tensor) -> None:
    """``.grad`` of a Linear or Conv2d layer from (an estimate of) ∂L/∂z and its input
    ``a``, exactly as backprop forms them."""
    if isinstance(layer, nn.Conv2d):  # the correlation of ∂L/∂z with the input
        _set_grad(layer.weight, _conv_weight_grad(layer, a, g_z))
        bias = g_z.sum((0, 2, 3))  # over the batch and the positions
    else:
        _set_grad(layer.weight, g_z.t() @ a)
        bias = g_z.sum(0)
    if layer.bias is not None:
        _set_grad(layer.bias, bias)


class _Step(NamedTuple):
    """One layer of the primal pass: its input and what its tangent rule needs (the
    output of a Linear, Conv2d or ReLU layer, the argmax indices of a MaxPool2d)."""
    layer: nn.Module
    input: Tensor
    saved: Optional[Tensor]


def _primal(model: nn.Sequential, x: Tensor) -> tuple[Tensor, list[_Step]]:
    """The logits of ``model`` at ``x``, and every layer's ``_Step``."""
    h, steps = x, []
    for layer in model:
        if isinstance(layer, nn.MaxPool2d):
            out, saved = tied_max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                         layer.ceil_mode)
        else:
            out = F.relu(h) if isinstance(layer, nn.ReLU) else layer(h)
            saved = None if isinstance(layer, nn.Flatten) else out
        steps.append(_Step(layer, h, saved))
        h = out
    return h, steps


def _tangent(step: _Step, dh: Optional[Tensor], u: Optional[Tensor]) -> Optional[Tensor]:
    """The tangent after ``step.layer`` from ``dh``, the one before it (None: zero), plus
    the layer's own tangent ``u`` on the output of a Linear or Conv2d layer."""
    layer = step.layer
    if isinstance(layer, nn.Linear):  # ż = W ḣ + u
        return u if dh is None else torch.addmm(u, dh, layer.weight.t())
    if isinstance(layer, nn.Conv2d):  # ż = W ⋆ ḣ + u: the convolution without its bias
        return u if dh is None else F.conv2d(dh, layer.weight, None, layer.stride, layer.padding, layer.dilation,
                                             layer.groups).add_(u)
    if dh is None:
        return None
    if isinstance(layer, nn.ReLU):  # ḣ·[h > 0]; relu's output is ≥ 0, so its sign is that mask
        return dh * step.saved.sign()  # (and a float one: a bool mask is 4× slower)
    if isinstance(layer, nn.MaxPool2d):  # each window's output is its input at the argmax
        return dh.flatten(2).gather(2, step.saved.flatten(2)).view(step.saved.shape)
    return layer(dh)  # Flatten


def _push(steps: list[_Step], tangents: Sequence[Tensor]) -> Tensor:
    """The tangent pass: the logits' derivative along ``tangents``, one per Linear and
    Conv2d output, in the order of the layers."""
    us, dh = iter(tangents), None
    for step in steps:
        dh = _tangent(step, dh, next(us) if isinstance(step.layer, _WEIGHTED) else None)
    return dh


@torch.no_grad()
def activity_jvp(model: nn.Sequential, x: Tensor, tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The logits of a Sequential ``model`` at ``x`` and their derivative when the output
    of every Linear and Conv2d layer moves along its tangent (``tangents``, one per such
    layer in order, each shaped like the output): the forward-mode pass of
    ``ActivityGradient``, by hand, with no autograd."""
    reason = f"a {type(model).__name__} has local losses" if isinstance(model, _LOCAL) else _unsupported(model)
    if reason is not None:
        raise ValueError(f"activity_jvp takes an nn.Sequential that activity perturbation supports: {reason}.")
    logits, steps = _primal(model, x)
    perturbed = [s for s in steps if isinstance(s.layer, _WEIGHTED)]
    shapes = [tuple(t.shape) for t in tangents]
    if shapes != [tuple(s.saved.shape) for s in perturbed]:
        raise ValueError(f"tangents of shapes {shapes} do not match the outputs of the Linear and Conv2d layers, "
                         f"{[tuple(s.saved.shape) for s in perturbed]}.")
    return logits, _push(steps, tangents)


def _layout(flat: Tensor, like: Tensor) -> Tensor:
    """``flat`` (``like.numel()`` entries) with ``like``'s shape, channels-last if it is."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        B, C, H, W = like.shape
        return flat.view(B, H, W, C).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def _output_error(logits: Tensor, y: Tensor, fast: bool = False) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and its exact gradient w.r.t. the logits, (softmax − one-hot)/B,
    over the last dimension (logits of shape B×C or B×G×C). ``fast``: the log-softmax of
    a transposed view, 10× faster over a last dimension of 10 classes but rounded a little
    differently for some shapes (stored runs of the other models keep the first way)."""
    log_p = F.log_softmax(logits.transpose(0, -1), 0).transpose(0, -1).contiguous() if fast \
        else F.log_softmax(logits, -1)
    one_hot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    if logits.dim() == 3:
        one_hot = one_hot[:, None, :]
    loss = -(log_p * one_hot).sum(-1).mean(0).sum()  # Σ over groups of each group's mean CE
    return loss, log_p.exp_().sub_(one_hot).div_(len(y))


def _local_linear(block: nn.Linear, head: nn.Linear, groups: int, a: Tensor, z: Tensor, u: Tensor,
                  y: Tensor) -> Tensor:
    """LG-FG-A for one LocalMLP-style block: ``.grad`` of ``block`` (input ``a``,
    pre-activation ``z``, which it overwrites, tangent ``u``) and of its group heads;
    returns the normalized block output, the next block's input."""
    B, D = z.shape
    G, k = groups, D // groups
    C = head.out_features // G
    dh = u * (z > 0)
    h = F.relu_(z)
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
    _set_linear_grads(head, a_next, error.view(B, G * C))
    return a_next


def _set_linear_grads(layer: nn.Linear, a: Tensor, error: Tensor) -> None:
    """The exact ``.grad`` of a linear layer on an input ``a`` that carries no gradient:
    ``error`` = ∂L/∂(its output), B×out (or B×Q×out: summed over both)."""
    error, a = error.reshape(-1, error.shape[-1]), a.reshape(-1, a.shape[-1])
    _set_grad(layer.weight, error.t() @ a)
    _set_grad(layer.bias, error.sum(0))


def _output_layer(out: nn.Linear, a: Tensor, y: Tensor) -> Tensor:
    """The output layer's loss on the normalized features ``a``, and its exact ``.grad``."""
    loss, error = _output_error(F.linear(a, out.weight, out.bias), y)
    _set_linear_grads(out, a, error)
    return loss


class _ConvBlock(NamedTuple):
    """One convolutional block of a LocalConvNet's primal pass: its layer and head, its
    (normalized) input, its ReLU output, the max-pool's argmax indices (None: no pool),
    its output and that normalized (the heads' and the next block's input) with its 1/std."""
    layer: nn.Conv2d
    head: nn.Linear
    input: Tensor
    relu: Tensor
    indices: Optional[Tensor]
    output: Tensor
    normalized: Tensor
    rstd: Tensor


def _conv_primal(layer: nn.Conv2d, head: nn.Linear, pool: bool, a: Tensor) -> _ConvBlock:
    """``LocalConvNet.conv_block`` on the normalized input ``a``, keeping what the
    estimate needs."""
    relu = F.relu_(layer(a))
    h, indices = tied_max_pool2d(relu, 2) if pool else (relu, None)
    # normalize_maps(h), with its statistics
    normalized, _, rstd = torch.native_layer_norm(h.permute(0, 2, 3, 1), (*h.shape[2:], h.shape[1]), None, None, 1e-5)
    return _ConvBlock(layer, head, a, relu, indices, h, normalized.permute(0, 3, 1, 2), rstd.view(-1, 1, 1, 1))


def _nhwc(t: Tensor) -> Tensor:
    """B×C×H×W ``t`` as B×(H·W)×C: a view when ``t`` is channels-last."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])


def _block_tangent(block: _ConvBlock, u: Tensor) -> Tensor:
    """The tangent of the block's output when its convolution's output moves along ``u``:
    through the ReLU (ḣ·[h > 0]) and, if it pools, each window's argmax (where the ReLU
    mask is that of the pooled output: one pass over the smaller tensor)."""
    if block.indices is None:
        return u * block.relu.sign()
    B, C, H, W = block.indices.shape
    routed = _nhwc(u).gather(1, _nhwc(block.indices)).view(B, H, W, C).permute(0, 3, 1, 2)
    return routed * block.output.sign()


def _patch_estimate(block: _ConvBlock, u: Tensor, groups: int, patches: int, y: Tensor) -> None:
    r"""LG-FG-A for one convolutional block of a LocalConvNet: ``.grad`` of its
    convolution from the tangent ``u`` on its output :math:`z`, each (group, patch) loss's
    derivative along the entries of ``u`` in its own group and patch only, and the exact
    ``.grad`` of its heads."""
    head, a = block.head, block.normalized
    B, C, H, W = a.shape
    G, k, Q = groups, C // groups, patches * patches
    K = head.out_features // G
    dh = _block_tangent(block, u)
    features = patch_means(a, patches)  # B×Q×C, what the heads see
    logits = F.linear(features, head.weight, head.bias).view(B, Q, G, K)
    # d(logits of group g, patch q) along the tangent on its own entries only, through the
    # normalization, da = rstd·(ḣ − mean(ḣ) − a·mean(a·ḣ)), and the patch's mean
    ids = patch_index(H, W, patches).to(a.device)
    scale = (torch.bincount(ids, minlength=Q).to(a.dtype) / (C * H * W)).view(1, Q, 1)  # positions / N
    mean_dh = patch_means(dh, patches).view(B, Q, G, k)
    m1 = mean_dh.sum(3) * scale  # B×Q×G: mean(ḣ) over all C·H·W entries, ḣ only on (g, q)
    m2 = patch_means(a * dh, patches).view(B, Q, G, k).sum(3) * scale
    own = head.weight.view(G, K, G, k).diagonal(dim1=0, dim2=2).permute(2, 1, 0)  # H_g on group g: G×k×K
    dlogits = (torch.einsum("bqgj,gjc->bqgc", mean_dh, own) - m1[..., None] * head.weight.view(G, K, C).sum(2)
               - m2[..., None] * (logits - head.bias.view(G, K))) * block.rstd.view(B, 1, 1, 1)
    _, error = _output_error(logits.view(B, Q * G, K), y, fast=True)
    d = (error.view(B, Q, G, K) * dlogits).sum(3)  # B×Q×G: one directional derivative per (patch, group)
    # ĝ_z = J^T(ḣ·d), J = ∂h/∂z: u·d of its (group, patch) on each entry of z that the
    # block's output is (ReLU on, the window's argmax), 0 on the others
    d = d.repeat_interleave(k, 2).index_select(1, ids)  # B×(H·W)×C: d of each output entry's (group, patch)
    g_h = (_nhwc(dh) * d).view(B, H, W, C).permute(0, 3, 1, 2)
    g_z = g_h if block.indices is None else F.max_unpool2d(g_h, block.indices, 2, output_size=block.relu.shape[2:])
    _set_weight_grads(block.layer, block.input, g_z)
    _set_linear_grads(head, features, error.view(B, Q, G * K))


class ActivityGradient:
    r"""Write an activity-perturbation forward gradient into ``p.grad``.

    ``estimate = ActivityGradient(model)``; ``loss = estimate(x, y)`` fills ``p.grad`` of
    every trainable parameter and returns the (detached) loss of the model's output, so
    any ``torch.optim`` optimizer takes the step. For an ``nn.Sequential`` MLP it
    estimates the gradient of the mean cross-entropy (FG-A); for a ``LocalMLP`` or a
    ``LocalConvNet`` that of the sum of its local losses (LG-FG-A, ``local_losses``). One forward-mode
    pass, no autograd graph: everything runs under ``torch.no_grad()``. A Sequential may
    have convolutions (``ConvNet``): their outputs are perturbed too.

    ``sampler`` draws the per-example tangents: ``"rademacher"`` (±1) or ``"gaussian"``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy, *,
                 sampler: str = "rademacher", generator: Optional[torch.Generator] = None) -> None:
        if not isinstance(model, nn.Module) or not supports(model):
            reason = _unsupported(model) if isinstance(model, nn.Module) else f"{type(model).__name__} is no nn.Module"
            raise ValueError(f"activity perturbation supports a LocalMLP, a LocalConvNet or an nn.Sequential of "
                             f"{', '.join(t.__name__ for t in _LAYERS)} layers ending in Linear: {reason}. Use "
                             "perturb='weights' (ForwardGradient) for other models.")
        if loss_fn is not cross_entropy and loss_fn is not F.cross_entropy:
            raise ValueError(f"activity perturbation needs each example's loss derivative, which it has in closed "
                             f"form for cross-entropy only; loss_fn={getattr(loss_fn, '__name__', loss_fn)!r} "
                             "is not supported.")
        check_choice("sampler", sampler, SAMPLERS)
        check_generator(generator)
        self.model, self.loss_fn, self.sampler, self.generator = model, loss_fn, sampler, generator
        self._buffer: Optional[Tensor] = None

    def _draw(self, n: int, like: Tensor) -> Tensor:
        """At least ``n`` fresh tangent entries (``like``'s dtype and device), in one call
        into one reused buffer."""
        total = -(-n // 64) * 64
        if self._buffer is None or self._buffer.numel() != total or self._buffer.dtype != like.dtype \
                or self._buffer.device != like.device:
            self._buffer = torch.empty(total, dtype=like.dtype, device=like.device)
        if self.sampler == "gaussian":
            self._buffer.normal_(generator=self.generator)
        else:
            rademacher_(self._buffer, self.generator)
        return self._buffer

    def tangents(self, batch: int, widths: list[int], like: Tensor) -> list[Tensor]:
        """Fresh per-example tangents, one ``batch × width`` matrix per perturbed layer,
        all drawn in one call into one reused buffer."""
        flat = self._draw(batch * sum(widths), like)
        out, offset = [], 0
        for width in widths:
            out.append(flat[offset:offset + batch * width].view(batch, width))
            offset += batch * width
        return out

    def tangents_like(self, outputs: Sequence[Tensor]) -> list[Tensor]:
        """Fresh per-example tangents, one shaped and laid out (channels-last or not) like
        each of ``outputs``, all drawn in one call into one reused buffer."""
        flat = self._draw(sum(z.numel() for z in outputs), outputs[0])
        out, offset = [], 0
        for z in outputs:
            out.append(_layout(flat[offset:offset + z.numel()], z))
            offset += z.numel()
        return out

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        check_batch(x, y)
        try:
            if isinstance(self.model, LocalMLP):
                return self._local(x, y)
            if isinstance(self.model, LocalConvNet):
                return self._local_conv(x, y)
            return self._global(x, y)
        except (RuntimeError, IndexError) as exc:  # e.g. inputs of the wrong shape, a label out of range
            raise ValueError(f"{type(self.model).__name__} cannot take x of shape {tuple(x.shape)} with y of "
                             f"shape {tuple(y.shape)}: {str(exc).splitlines()[0]}") from exc

    def _global(self, x: Tensor, y: Tensor) -> Tensor:
        """FG-A on a Sequential network: every Linear and Conv2d output perturbed, one
        forward-mode pass, global loss."""
        logits, steps = _primal(self.model, x)
        perturbed = [s for s in steps if isinstance(s.layer, _WEIGHTED)]
        us = self.tangents_like([s.saved for s in perturbed])
        loss, error = _output_error(logits, y)
        d = (error * _push(steps, us)).sum(1)  # each example's directional derivative d_b
        for step, u in zip(perturbed, us):
            g_z = u * d.view(-1, *[1] * (u.dim() - 1))  # the estimate of ∂L/∂z, example by example
            _set_weight_grads(step.layer, step.input, g_z)
        return loss

    def _local(self, x: Tensor, y: Tensor) -> Tensor:
        """LG-FG-A on a LocalMLP: each group of units perturbed for its own local loss."""
        model = self.model
        us = iter(self.tangents(len(x), [block.out_features for block in model.blocks], x))
        a = normalize(x.flatten(1))
        for block, head in zip(model.blocks, model.heads):
            a = _local_linear(block, head, model.groups, a, F.linear(a, block.weight, block.bias), next(us), y)
        return _output_layer(model.out, a, y)

    def _local_conv(self, x: Tensor, y: Tensor) -> Tensor:
        """LG-FG-A on a LocalConvNet: each group of channels in each patch perturbed for
        its own local loss, then the fully connected block as in a LocalMLP."""
        model = self.model
        blocks, a = [], normalize_maps(x)
        for layer, head, pool in zip(model.blocks, model.heads, model.pools):
            blocks.append(_conv_primal(layer, head, pool, a))
            a = blocks[-1].normalized
        fc, a = model.blocks[-1], a.flatten(1)
        z = F.linear(a, fc.weight, fc.bias)
        us = self.tangents_like([block.relu for block in blocks] + [z])  # all drawn in one call
        for block, u in zip(blocks, us):
            _patch_estimate(block, u, model.groups, model.patches, y)
        a = _local_linear(fc, model.heads[-1], model.fc_groups, a, z, us[-1], y)
        return _output_layer(model.out, a, y)

    def __repr__(self) -> str:
        kind = "local losses" if isinstance(self.model, _LOCAL) else "global loss"
        return f"ActivityGradient(model={type(self.model).__name__}, {kind}, sampler={self.sampler!r})"
