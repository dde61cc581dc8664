"""Tests for fgtutor.tangents: the random directions of the forward gradient."""

from __future__ import annotations

import pytest
import torch

from fgtutor.tangents import RankOne, flat_buffer, rademacher_, rank_one, sample_tangents

F64 = torch.float64

@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
def test_sample_tangents_match_the_structure_shapes_and_dtypes_of_params(sampler):
    params = {"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=F64)}
    v = sample_tangents(params, sampler, torch.Generator().manual_seed(0))
    assert set(v) == {"w", "b"}
    for n in params:
        assert v[n].shape == params[n].shape and v[n].dtype == params[n].dtype
    pair = sample_tangents((torch.zeros(2), torch.zeros(2, 3)), sampler)
    assert isinstance(pair, tuple) and [t.shape for t in pair] == [(2,), (2, 3)]


def test_sample_tangents_does_not_touch_the_params():
    params = {"w": torch.zeros(3, 4)}
    sample_tangents(params, "gaussian", torch.Generator().manual_seed(0))
    assert torch.equal(params["w"], torch.zeros(3, 4))


def test_rademacher_tangents_are_exactly_plus_or_minus_one_with_both_signs():
    v = sample_tangents(torch.zeros(10_000, dtype=F64), "rademacher", torch.Generator().manual_seed(0))
    assert torch.all(v.abs() == 1)
    assert abs(v.mean().item()) < 0.05  # 5 standard errors of a fair ±1 coin


def test_gaussian_tangents_have_zero_mean_and_unit_variance():
    v = sample_tangents(torch.zeros(10_000, dtype=F64), "gaussian", torch.Generator().manual_seed(0))
    assert abs(v.mean().item()) < 0.05
    assert abs(v.var().item() - 1) < 0.05
    assert (v.abs() != 1).all()


def test_same_generator_seed_gives_the_same_tangents():
    a = sample_tangents(torch.zeros(50), "gaussian", torch.Generator().manual_seed(7))
    b = sample_tangents(torch.zeros(50), "gaussian", torch.Generator().manual_seed(7))
    c = sample_tangents(torch.zeros(50), "gaussian", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)



def test_rademacher_signs_are_balanced_and_uncorrelated_at_every_bit_position():
    n = 1 << 20
    v = rademacher_(torch.empty(n), torch.Generator().manual_seed(0))
    se = 5 / n ** 0.5  # five standard errors of a mean of n independent ±1
    assert abs(v.mean().item()) < se
    # each sign comes from one bit of a byte: every bit position must be a fair coin...
    assert (v.view(-1, 8).mean(0).abs() < 5 / (n / 8) ** 0.5).all()
    # ...independent of its neighbours, within a byte and across bytes and words
    for lag in (1, 7, 8, 63, 64):
        assert abs((v[:-lag] * v[lag:]).mean().item()) < se, lag


@pytest.mark.parametrize("make", [lambda: torch.empty(64, 32, 3, 3).to(memory_format=torch.channels_last),
                                  lambda: torch.empty(10, 12).t(), lambda: torch.empty(3, 5, 7)],
                         ids=["channels_last", "transposed", "odd_size"])
def test_rademacher_fills_any_layout_with_signs(make):
    t = make()
    strides = t.stride()
    rademacher_(t, torch.Generator().manual_seed(1))
    assert set(t.unique().tolist()) == {-1.0, 1.0} and t.stride() == strides


def test_flat_buffer_views_share_one_buffer_and_keep_each_layout():
    like = {"w": torch.empty(64, 32, 3, 3).to(memory_format=torch.channels_last), "b": torch.empty(5)}
    flat, views = flat_buffer(like)
    assert flat.numel() % 64 == 0 and flat.numel() >= 64 * 32 * 9 + 5
    assert all(v.shape == like[n].shape and v.stride() == like[n].stride() for n, v in views.items())
    flat.fill_(3.0)
    assert all((v == 3.0).all() for v in views.values())


# rank-one tangents: u ⊗ w for a matrix, u ⊗ w ⊗ s for a convolution's weight


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 2), (5,)], ids=["matrix", "conv", "vector"])
def test_rank_one_tangents_are_signs_with_identity_covariance(shape):
    g = torch.Generator().manual_seed(0)
    n = 4000
    v = torch.stack([sample_tangents(torch.zeros(shape, dtype=F64), "rank1", g).flatten() for _ in range(n)])
    assert torch.all(v.abs() == 1)
    cov = v.T @ v / n  # E[v vᵀ] = I: unit diagonal, uncorrelated entries
    off = cov - torch.eye(v.shape[1], dtype=F64)
    assert off.abs().max() < 5 / n ** 0.5  # five standard errors of a mean of n ±1 products


def test_a_rank_one_tangent_is_an_outer_product_of_its_factors():
    g = torch.Generator().manual_seed(1)
    t = rank_one(torch.Size((4, 3, 2, 2)), torch.zeros(1, dtype=F64), g)
    assert isinstance(t, RankOne) and t.dense().shape == (4, 3, 2, 2)
    torch.testing.assert_close(t.dense(), torch.einsum("i,j,k->ijk", t.u, t.w, t.s).view(4, 3, 2, 2))
    assert torch.linalg.matrix_rank(t.dense().flatten(1)) == 1
    torch.testing.assert_close(t.kernel()[0], (t.w[:, None] * t.s).view(3, 2, 2))
