r"""Random tangents: how the forward gradient's directions :math:`v` are drawn.

The estimator (``fgtutor.forward``) needs tangents with :math:`\mathbb E[v v^\top] = I`:
independent, zero-mean, unit-variance entries. This module draws them, and draws them
fast, because on a CPU drawing 1.86 M random numbers per step is a visible share of a
forward-gradient step:

* ``"gaussian"``: :math:`N(0, 1)` entries (``Tensor.normal_``);
* ``"rademacher"``: :math:`\pm 1` entries, one random *bit* each (``rademacher_``), an
  order of magnitude cheaper than a float per entry;
* ``"rank1"``: for every weight matrix an outer product :math:`\dot W = u w^\top` of two
  independent Rademacher vectors (for a convolution's weight :math:`u \otimes w \otimes s`
  over output channels, input channels and kernel positions), i.i.d. signs for the rest.
  Every entry is still a fair :math:`\pm 1` and any two entries are uncorrelated
  (:math:`\mathbb E[\dot W_{ij}\dot W_{kl}] = \mathbb E[u_i u_k]\,\mathbb E[w_j w_l]
  = \delta_{ik}\delta_{jl}`), so :math:`\mathbb E[v v^\top] = I` holds; but a layer's
  tangent term :math:`x\dot W^\top = (x w)\,u^\top` costs :math:`O(p + q)` per sample
  instead of :math:`O(pq)`. ``RankOne`` keeps the factors.

``flat_buffer`` lays all of a model's tangents out in one buffer, so that one call fills
them all. Nothing here is needed to understand the estimator; it is what makes it quick.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .utils import check_choice, check_generator

SAMPLERS = ("gaussian", "rademacher", "rank1")
Params = Union[dict, tuple, list, Tensor]


def tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """Apply ``fn`` leaf-wise over a tensor, or a dict / tuple / list of tensors."""
    if isinstance(tree, Tensor):
        return fn(tree, *rest)
    if isinstance(tree, dict):
        return {k: tree_map(fn, tree[k], *(r[k] for r in rest)) for k in tree}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, t, *(r[i] for r in rest)) for i, t in enumerate(tree))
    raise ValueError(
        f"params of type {type(tree).__name__} are not allowed: use a tensor, or a dict, "
        "tuple or list of tensors."
    )


def check_sampler(sampler: str) -> None:
    """``ValueError`` unless ``sampler`` is one of ``SAMPLERS``."""
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
    """Fill ``tangent`` in place with zero-mean, unit-variance entries and return it:
    ``"gaussian"`` draws i.i.d. N(0, 1), ``"rademacher"`` i.i.d. ±1 (``rademacher_``) and
    ``"rank1"`` a dense ``RankOne`` tangent of ``tangent``'s shape."""
    if sampler == "gaussian":
        return tangent.normal_(generator=generator)
    check_sampler(sampler)
    if sampler == "rank1":
        t = rank_one(tangent.shape, tangent, generator)
        return tangent.copy_(t.dense() if isinstance(t, RankOne) else t)
    return rademacher_(tangent, generator)


def sample_tangents(params: Params, sampler: str = "gaussian", generator: Optional[torch.Generator] = None) -> Params:
    """A random tangent with the structure, shapes, dtypes and devices of ``params``
    (dense tensors, also for ``"rank1"``)."""
    check_sampler(sampler)
    check_generator(generator)
    check_params(params)
    return tree_map(lambda p: sample_(torch.empty_like(p), sampler, generator), params)


@dataclass
class RankOne:
    r"""The tangent :math:`u \otimes w` (or :math:`u \otimes w \otimes s`) of a weight of
    ``shape``, kept as its factors: ``u`` over ``shape[0]``, ``w`` over ``shape[1]`` and
    ``s`` over the remaining dimensions flattened (a convolution's kernel positions)."""

    u: Tensor
    w: Tensor
    s: Optional[Tensor]
    shape: torch.Size

    def dense(self) -> Tensor:
        """The full tangent, as a tensor of ``shape`` (for checking, and for optimizers
        that need the estimate in ``p.grad``)."""
        uw = torch.outer(self.u, self.w)
        return uw.view(self.shape) if self.s is None else (uw[:, :, None] * self.s).view(self.shape)

    def kernel(self) -> Tensor:
        r""":math:`w \otimes s` as a one-output-channel weight: ``Ẇ * x = u · (kernel * x)``."""
        return (self.w[:, None] * self.s).view(1, *self.shape[1:])


def rank_one_sizes(shape: torch.Size) -> list[int]:
    """The lengths of the factors of a rank-one tangent of ``shape``: ``[q, p]`` for a
    matrix, ``[out, in, positions]`` for more dimensions, ``[n]`` (i.i.d.) for a vector."""
    if len(shape) < 2:
        return [math.prod(shape)]
    return [shape[0], shape[1]] + ([math.prod(shape[2:])] if len(shape) > 2 else [])


def rank_one(shape: torch.Size, like: Tensor, generator: Optional[torch.Generator] = None,
             signs: Optional[Tensor] = None) -> Union[RankOne, Tensor]:
    """A rank-one Rademacher tangent of ``shape`` (``RankOne``; i.i.d. signs for a vector),
    with the dtype and device of ``like``. Its signs are drawn, or taken from ``signs``
    (a 1-d tensor of ``sum(rank_one_sizes(shape))`` ±1 entries)."""
    sizes = rank_one_sizes(shape)
    if signs is None:
        signs = rademacher_(torch.empty(-(-sum(sizes) // 64) * 64, dtype=like.dtype, device=like.device), generator)
    parts = signs[:sum(sizes)].split(sizes)
    if len(shape) < 2:
        return parts[0].view(shape)
    return RankOne(parts[0], parts[1], parts[2] if len(parts) > 2 else None, torch.Size(shape))


def check_params(params: Params) -> None:
    """``ValueError`` unless ``params`` is a floating-point tensor or a non-empty dict, tuple
    or list of them."""
    leaves = [params] if isinstance(params, Tensor) else list(params.values()) if isinstance(params, dict) else (
        list(params) if isinstance(params, (tuple, list)) else None)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise ValueError(f"params must be a tensor or a non-empty dict, tuple or list of tensors, got "
                         f"{type(params).__name__}.")
    bad = [t.dtype for t in leaves if not t.is_floating_point()]
    if bad:
        raise ValueError(f"params must be floating-point tensors (a derivative needs real numbers), got {bad[0]}: "
                         "convert them with .float().")


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
