"""Tests for fgtutor.forward: the forward-gradient estimator, checked against autograd and torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from fgtutor.forward import ForwardGradient, directional_derivative, forward_gradient
from fgtutor.tangents import RankOne, flat_buffer, sample_, sample_tangents
from fgtutor.losses import cross_entropy
from fgtutor.models import MLP, ConvNet
from conftest import quadratic, seeded


F64 = torch.float64



def batch(n: int = 4, seed: int = 0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, 10, (n,), generator=g)




def xent_of(model: nn.Module, x, y, frozen=None):
    frozen = frozen or {}
    return lambda p: cross_entropy(functional_call(model, (p, frozen), (x,)), y)


def reference_estimate(model, x, y, seed, *, num_tangents=1, sampler="rademacher", loss_fn=cross_entropy):
    """(1/K) Σ_k (∇L·v_k) v_k with the v_k reproduced from a generator seeded like the estimator's."""
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss_of(p):
        return loss_fn(functional_call(model, (p, frozen), (x,)), y)

    g = torch.Generator().manual_seed(seed)
    est = {n: torch.zeros_like(p) for n, p in named.items()}
    ds = []
    for _ in range(num_tangents):
        flat, v = flat_buffer(named)  # the estimator draws each tangent into one flat buffer
        sample_(flat, sampler, g)
        loss, d = jvp(loss_of, (named,), (v,))
        ds.append(d)
        for n in est:
            est[n] += d * v[n] / num_tangents
    return loss, ds, est


def grads_of(model: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- directional_derivative

def test_directional_derivative_equals_autograd_gradient_dot_tangent_on_a_quadratic():
    f, theta, grad = quadratic()
    v = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=F64)
    value, dd = directional_derivative(f, theta, v)
    torch.testing.assert_close(value, f(theta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dd, grad @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", [MLP, ConvNet], ids=["mlp", "convnet"])
def test_directional_derivative_equals_autograd_gradient_dot_tangent_for_the_models(factory):
    model = seeded(factory)
    x, y = batch()
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    f = xent_of(model, x, y)
    grads = torch.autograd.grad(f(params), list(params.values()))
    tangents = sample_tangents(params, "gaussian", torch.Generator().manual_seed(2))
    expected = sum((g * tangents[n]).sum() for g, n in zip(grads, params))
    _, dd = directional_derivative(f, {n: p.detach() for n, p in params.items()}, tangents)
    torch.testing.assert_close(dd, expected, atol=1e-5, rtol=1e-5)


def test_directional_derivative_rejects_a_function_that_is_not_scalar():
    with pytest.raises(ValueError, match="scalar"):
        directional_derivative(lambda t: 2 * t, torch.ones(3), torch.ones(3))


# --------------------------------------------------------------------------- forward_gradient

def test_forward_gradient_returns_a_dict_for_dict_params():
    params = {"a": torch.ones(2, 3, dtype=F64), "b": torch.ones(4, dtype=F64)}
    value, grads = forward_gradient(lambda p: (p["a"] ** 2).sum() + p["b"].sum(), params)
    assert isinstance(grads, dict) and set(grads) == {"a", "b"}
    assert grads["a"].shape == (2, 3) and grads["b"].shape == (4,) and grads["a"].dtype == F64
    assert value.item() == 10.0


def test_forward_gradient_returns_a_tuple_for_tuple_params():
    params = (torch.ones(2), torch.ones(3, 1))
    _, grads = forward_gradient(lambda p: p[0].sum() * p[1].sum(), params)
    assert isinstance(grads, tuple) and [g.shape for g in grads] == [(2,), (3, 1)]


def test_forward_gradient_returns_a_tensor_for_a_single_tensor():
    _, grad = forward_gradient(lambda t: (t**2).sum(), torch.ones(3, 2))
    assert isinstance(grad, torch.Tensor) and grad.shape == (3, 2)


def test_forward_gradient_is_the_directional_derivative_times_the_tangent():
    f, theta, grad = quadratic()
    _, est = forward_gradient(f, theta, sampler="rademacher", generator=torch.Generator().manual_seed(3))
    v = sample_tangents(theta, "rademacher", torch.Generator().manual_seed(3))
    torch.testing.assert_close(est, (grad @ v) * v)


@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
def test_forward_gradient_is_unbiased(sampler):
    f, theta, grad = quadratic()
    g = torch.Generator().manual_seed(0)
    n = 2000
    estimates = torch.stack([forward_gradient(f, theta, sampler=sampler, generator=g)[1] for _ in range(n)])
    standard_error = estimates.std(0) / n**0.5
    assert torch.all((estimates.mean(0) - grad).abs() < 5 * standard_error)
    # and the tolerance is meaningful: each estimate alone is far off
    assert (estimates[0] - grad).norm() > 0.1 * grad.norm()


def test_averaging_k_tangents_divides_the_variance_by_k():
    f, theta, _ = quadratic()
    g = torch.Generator().manual_seed(0)

    def total_variance(k: int, n: int) -> float:
        est = torch.stack([forward_gradient(f, theta, num_tangents=k, generator=g)[1] for _ in range(n)])
        return est.var(0).sum().item()

    ratio = total_variance(8, 150) / total_variance(1, 400)
    assert 1 / 16 < ratio < 1 / 4


@pytest.mark.parametrize("sampler", ["uniform", "Gaussian", ""])
def test_unknown_sampler_raises_value_error_naming_it(sampler):
    with pytest.raises(ValueError, match="sampler"):
        forward_gradient(lambda t: t.sum(), torch.ones(2), sampler=sampler)
    with pytest.raises(ValueError, match="sampler"):
        sample_tangents(torch.ones(2), sampler)
    with pytest.raises(ValueError, match="sampler"):
        ForwardGradient(nn.Linear(2, 2), sampler=sampler)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_non_positive_or_non_integer_num_tangents_raise_value_error_naming_it(k):
    with pytest.raises(ValueError, match="num_tangents"):
        forward_gradient(lambda t: t.sum(), torch.ones(2), num_tangents=k)
    with pytest.raises(ValueError, match="num_tangents"):
        ForwardGradient(nn.Linear(2, 2), num_tangents=k)


@pytest.mark.parametrize("clip", [0, -1.0])
def test_non_positive_clip_raises_value_error_naming_it(clip):
    with pytest.raises(ValueError, match="clip"):
        ForwardGradient(nn.Linear(2, 2), clip=clip)


# --------------------------------------------------------------------------- ForwardGradient

def small_mlp() -> nn.Module:
    return seeded(lambda: MLP(hidden=16))


@pytest.mark.parametrize("fast", [True, False])
def test_forward_gradient_module_fills_grad_of_trainable_parameters_only(fast):
    model = small_mlp()
    model[1].requires_grad_(False)  # freeze the first Linear layer
    x, y = batch()
    ForwardGradient(model, generator=torch.Generator().manual_seed(0), fast=fast)(x, y)
    assert model[1].weight.grad is None and model[1].bias.grad is None
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape, n
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("fast", [True, False])
def test_forward_gradient_module_returns_the_cross_entropy_of_the_model_output(fast):
    model = small_mlp()
    x, y = batch()
    loss = ForwardGradient(model, fast=fast)(x, y)
    assert loss.dim() == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach())


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("sampler", ["rademacher", "gaussian"])
@pytest.mark.parametrize("freeze", [False, True])
def test_forward_gradient_module_estimate_is_jvp_directional_derivative_times_tangent(fast, sampler, freeze):
    model = small_mlp()
    if freeze:
        model[3].requires_grad_(False)
    x, y = batch()
    loss = ForwardGradient(model, sampler=sampler, generator=torch.Generator().manual_seed(5), fast=fast)(x, y)
    ref_loss, _, expected = reference_estimate(model, x, y, 5, sampler=sampler)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grads_of(model), expected)


@pytest.mark.parametrize("sampler, k", [("rademacher", 1), ("rank1", 1), ("rank1", 2)])
def test_fast_and_slow_paths_give_the_same_estimate_from_the_same_seed(sampler, k):
    model = small_mlp()
    x, y = batch()
    ForwardGradient(model, sampler=sampler, num_tangents=k, generator=torch.Generator().manual_seed(9), fast=True)(x, y)
    fast = grads_of(model)
    ForwardGradient(model, sampler=sampler, num_tangents=k, generator=torch.Generator().manual_seed(9), fast=False)(x, y)
    torch.testing.assert_close(grads_of(model), fast)


def test_forward_gradient_module_works_on_a_convnet():
    model = seeded(ConvNet)
    x, y = batch()
    estimate = ForwardGradient(model, generator=torch.Generator().manual_seed(4))
    assert estimate.fast
    estimate(x, y)
    _, _, expected = reference_estimate(model, x, y, 4)
    torch.testing.assert_close(grads_of(model), expected)


@pytest.mark.parametrize("fast", [True, False])
def test_clip_clamps_the_directional_derivative(fast):
    model = small_mlp()
    x, y = batch()
    clip = 1e-3
    _, (d,), _ = reference_estimate(model, x, y, 6)
    assert abs(d.item()) > clip  # so the clip is active
    ForwardGradient(model, clip=clip, generator=torch.Generator().manual_seed(6), fast=fast)(x, y)
    flat, v = flat_buffer({n: p.detach() for n, p in model.named_parameters()})
    sample_(flat, "rademacher", torch.Generator().manual_seed(6))
    for n, g in grads_of(model).items():
        torch.testing.assert_close(g / v[n], torch.full_like(g, clip * d.sign().item()), atol=0, rtol=1e-12)


def test_a_large_clip_leaves_the_estimate_unchanged():
    model = small_mlp()
    x, y = batch()
    ForwardGradient(model, clip=1e6, generator=torch.Generator().manual_seed(6))(x, y)
    _, _, expected = reference_estimate(model, x, y, 6)
    torch.testing.assert_close(grads_of(model), expected)


@pytest.mark.parametrize("fast", [True, False])
def test_num_tangents_averages_k_directional_estimates(fast):
    model = small_mlp()
    x, y = batch()
    ForwardGradient(model, num_tangents=3, generator=torch.Generator().manual_seed(2), fast=fast)(x, y)
    _, ds, expected = reference_estimate(model, x, y, 2, num_tangents=3)
    assert len({round(d.item(), 12) for d in ds}) == 3  # three different directions
    torch.testing.assert_close(grads_of(model), expected)


def test_num_tangents_fast_and_slow_paths_agree():
    model = small_mlp()
    x, y = batch()
    ForwardGradient(model, num_tangents=4, generator=torch.Generator().manual_seed(3), fast=True)(x, y)
    fast = grads_of(model)
    ForwardGradient(model, num_tangents=4, generator=torch.Generator().manual_seed(3), fast=False)(x, y)
    torch.testing.assert_close(grads_of(model), fast)


class TwoLayer(nn.Module):
    """Not a Sequential: the estimator must fall back to torch.func."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_forward_gradient_module_falls_back_to_torch_func_for_other_modules():
    model = seeded(TwoLayer)
    x, y = batch(shape=(12,))
    estimate = ForwardGradient(model, generator=torch.Generator().manual_seed(1))
    assert estimate.fast is False
    loss = estimate(x, y)
    ref_loss, _, expected = reference_estimate(model, x, y, 1)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grads_of(model), expected)


def mse_on_one_hot(logits, targets):
    return F.mse_loss(logits, F.one_hot(targets, logits.shape[-1]).to(logits.dtype))


@pytest.mark.parametrize("fast", [True, False])
def test_forward_gradient_module_with_a_custom_loss_matches_torch_func(fast):
    model = small_mlp()
    x, y = batch()
    loss = ForwardGradient(model, mse_on_one_hot, generator=torch.Generator().manual_seed(8), fast=fast)(x, y)
    ref_loss, _, expected = reference_estimate(model, x, y, 8, loss_fn=mse_on_one_hot)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grads_of(model), expected)


def test_forward_gradient_module_reuses_the_grad_buffers():
    model = small_mlp()
    x, y = batch()
    estimate = ForwardGradient(model, generator=torch.Generator().manual_seed(0))
    estimate(x, y)
    buffers = [p.grad for p in model.parameters()]
    first = grads_of(model)
    estimate(x, y)
    assert all(p.grad is b for p, b in zip(model.parameters(), buffers))
    assert any(not torch.equal(first[n], p.grad) for n, p in model.named_parameters())


def mlp_with_a_shared_relu() -> nn.Module:
    act = nn.ReLU()  # one activation instance used twice: a common way to write a stack
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 10))


def test_forward_gradient_module_is_exact_when_a_sequential_reuses_an_activation():
    model = seeded(mlp_with_a_shared_relu)
    x, y = batch()
    loss = ForwardGradient(model, generator=torch.Generator().manual_seed(3))(x, y)
    ref_loss, _, expected = reference_estimate(model, x, y, 3)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grads_of(model), expected)


@pytest.mark.parametrize("fast", [True, False])
def test_forward_gradient_module_with_nothing_trainable_returns_the_loss_and_writes_no_grad(fast):
    model = small_mlp().requires_grad_(False)
    x, y = batch()
    loss = ForwardGradient(model, fast=fast)(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    assert all(p.grad is None for p in model.parameters())



@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(memory_format=torch.contiguous_format)],
                         ids=["double", "contiguous_format"])
def test_converting_the_model_after_the_first_step_keeps_fresh_tangents_in_p_grad(convert):
    from fgtutor.models import ConvNet
    torch.manual_seed(0)
    model = ConvNet()
    estimate = ForwardGradient(model, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    estimate(x, y)
    convert(model)
    x = x.to(next(model.parameters()).dtype)
    grads = []
    for _ in range(2):
        estimate(x, y)
        grads.append([p.grad.clone() for p in model.parameters()])
        assert all(p.grad.dtype == p.dtype and p.grad.stride() == p.stride() for p in model.parameters())
    assert not torch.equal(grads[0][0], grads[1][0]), "each call draws a new tangent into p.grad"


# rank-one tangents (sampler="rank1"): same mean and same per-coordinate second moment


def matrix_quadratic(seed: int = 0):
    """f(W) = ½‖A W B − C‖², a function of a 4×3 matrix; returns (f, W, ∇f(W))."""
    g = torch.Generator().manual_seed(seed)
    A, B, C, W = (torch.randn(*s, generator=g, dtype=F64) for s in ((5, 4), (3, 2), (5, 2), (4, 3)))
    f = lambda w: 0.5 * (A @ w @ B - C).pow(2).sum()  # noqa: E731
    return f, W, A.T @ (A @ W @ B - C) @ B.T


def rank_one_estimates(seed: int, n: int = 4000):
    """n rank-one forward gradients (∇f·v) v of the matrix quadratic, and its gradient."""
    f, W, grad = matrix_quadratic(seed)
    g = torch.Generator().manual_seed(seed)
    v = torch.stack([sample_tangents(W, "rank1", g) for _ in range(n)])
    return (v * grad).sum((1, 2))[:, None, None] * v, grad


def test_forward_gradient_with_rank_one_tangents_is_the_directional_derivative_times_the_tangent():
    f, W, grad = matrix_quadratic()
    _, est = forward_gradient(f, W, sampler="rank1", generator=torch.Generator().manual_seed(5))
    v = sample_tangents(W, "rank1", torch.Generator().manual_seed(5))
    assert torch.linalg.matrix_rank(v) == 1
    torch.testing.assert_close(est, (grad * v).sum() * v)


def test_rank_one_forward_gradients_average_to_the_gradient():
    est, grad = rank_one_estimates(0)
    se = est.std(0) / len(est) ** 0.5
    assert ((est.mean(0) - grad).abs() < 5 * se).all()


def test_rank_one_tangents_keep_every_coordinates_second_moment_at_the_squared_gradient_norm():
    # each entry of a rank-one tangent is ±1, so g_ij² = (∇f·v)² and E[g_ij²] = ‖∇f‖², as for i.i.d. signs
    est, grad = rank_one_estimates(1)
    second = est.pow(2).mean(0)
    assert torch.allclose(second, second[0, 0].expand_as(second))  # the same for every coordinate
    assert abs(second[0, 0].item() / grad.pow(2).sum().item() - 1) < 0.1


@pytest.mark.parametrize("make", [lambda: small_mlp(), lambda: seeded(ConvNet).double()], ids=["mlp", "convnet"])
def test_rank_one_estimate_in_p_grad_is_the_directional_derivative_times_the_dense_tangent(make):
    model = make()
    x, y = batch(2)
    estimate = ForwardGradient(model, sampler="rank1", generator=torch.Generator().manual_seed(3))
    loss = estimate(x, y)
    tangent = {n: t.dense() if isinstance(t, RankOne) else t.clone() for n, t in estimate._last.items()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    ref_loss, dd = jvp(xent_of(model, x, y), (params,), (tangent,))
    torch.testing.assert_close(loss, ref_loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, dd * tangent[n])
