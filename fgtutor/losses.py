r"""One cross-entropy for both methods, for training and for scoring.

``cross_entropy`` is the numerically stable mean of :math:`\log\sum_k e^{z_k} - z_t`
(``F.cross_entropy``). The original repository's hand-written version is kept as
``functional_xent`` (with ``softmax`` and ``clamp_probs``) so readers can compare: it
clamps probabilities to :math:`[\epsilon, 1-\epsilon]`, which caps one sample's loss at
:math:`-\log\epsilon \approx 15.94` and gives a saturated network *zero* gradient, so a
diverged run can never recover and looks like a plateau instead of an error.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import check_callable


def _check_scores(name: str, t: Tensor) -> None:
    """The original's helpers index the last dimension and read the dtype's epsilon: say
    what they need instead of failing inside torch (``cross_entropy``, on every step, is
    left to ``F.cross_entropy``'s own checks)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() == 0 or t.shape[-1] == 0:
        shown = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor with at least one class in its last dimension, "
                         f"got {shown}.")


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Mean over the batch of :math:`-\log \mathrm{softmax}(z)_{t}` (stable, unclamped)."""
    return F.cross_entropy(logits, targets)


def softmax(logits: Tensor) -> Tensor:
    """Row-wise softmax, shifted by the row maximum for stability (the original's helper)."""
    _check_scores("logits", logits)
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def clamp_probs(probs: Tensor) -> Tensor:
    """Clamp to [eps, 1 - eps] with eps the dtype's machine epsilon, as the original did."""
    _check_scores("probs", probs)
    eps = torch.finfo(probs.dtype).eps
    return probs.clamp(min=eps, max=1 - eps)


def functional_xent(params, model: Callable, x: Tensor, targets: Tensor) -> Tensor:
    r"""The original loss: :math:`\frac1B\sum_b -\sum_k \mathrm{onehot}(t_b)_k \log \mathrm{clamp}(\mathrm{softmax}(z_b))_k`.

    ``model(params, x)`` returns logits (a functional model, as with ``torch.func``).
    Equals ``cross_entropy`` whenever no probability is clamped.
    """
    check_callable("model", model, "a functional model: model(params, x) returns logits")
    logits = model(params, x)
    one_hot = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    return -(one_hot * torch.log(clamp_probs(softmax(logits)))).sum(-1).mean()
