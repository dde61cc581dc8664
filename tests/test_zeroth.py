"""Specifications of fgtutor.zeroth: two-point (SPSA) estimates, taken on perturbed copies or
the MeZO way (in place, restored bit for bit), as a training method of fit and the store."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fgtutor import bench, store
from fgtutor.data import load_mnist
from fgtutor.forward import directional_derivative
from fgtutor.losses import cross_entropy
from fgtutor.models import MLP, count_parameters
from fgtutor.replay import check_replay
from fgtutor.store import LATER_DEFAULTS, describe, fit_kwargs, run_config, run_key, run_path, train_and_save
from fgtutor.train import fit, train_model
from fgtutor.zeroth import CHUNK, ZerothOrderGradient, directional_difference, zeroth_step
from conftest import quadratic, seeded

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]




def smooth(dtype):
    """A smooth non-quadratic f (cubic, exponential and quadratic terms), a point and 16
    directions; returns (f, θ, V, exact directional derivatives ∇f·v in float64)."""
    g = torch.Generator().manual_seed(0)
    c, theta = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    V = torch.randn(16, 6, generator=g, dtype=F64)

    def f(t):
        return (c.to(t.dtype) * t**3).sum() / 6 + torch.exp(0.5 * t).sum() + t @ t / 2

    grad = c * theta**2 / 2 + 0.5 * torch.exp(0.5 * theta) + theta
    return f, theta.to(dtype), V.to(dtype), V @ grad


def difference_error(dtype, eps: float) -> float:
    """Mean over 16 directions of |central difference − ∇f·v| on ``smooth`` in ``dtype``."""
    f, theta, V, exact = smooth(dtype)
    return sum(abs(directional_difference(f, theta, v, eps).item() - d.item()) for v, d in zip(V, exact)) / len(V)


class Quadratic(nn.Module):
    """A 'model' whose output is its parameter; with ``loss_fn=self.loss`` the loss is f(θ)."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.f, theta, self.grad = quadratic(dtype=dtype)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta

    def loss(self, out, y):
        return self.f(out)


def mnist_batch(n: int, dtype=torch.float32):
    X, Y = load_mnist()
    return X[:n].to(dtype), Y[:n]


def bits(model: nn.Module) -> dict:
    """Every parameter's bits, as integers (equal exactly when the floats are equal bit for bit)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {n: p.detach().clone().view(ints[p.element_size()]) for n, p in model.named_parameters()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def estimator(model, *, in_place, seed=0, **kwargs) -> ZerothOrderGradient:
    return ZerothOrderGradient(model, generator=torch.Generator().manual_seed(seed), in_place=in_place, **kwargs)


# --------------------------------------------------------------------------- the central difference

@pytest.mark.parametrize("eps", [1.0, 1e-1, 1e-3])
def test_on_a_quadratic_the_central_difference_is_the_directional_derivative_for_any_eps(eps):
    f, theta, grad = quadratic()
    v = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=F64)
    # no truncation error at all, even at eps = 1: only rounding, ~1e-16 |f| / eps
    assert abs(directional_difference(f, theta, v, eps).item() - (grad @ v).item()) < 1e-12 * abs(grad @ v) / eps


@pytest.mark.parametrize("in_place", [False, True])
def test_on_a_quadratic_the_spsa_estimate_with_its_v_is_the_forward_gradient(in_place):
    model = Quadratic()
    estimate = estimator(model, in_place=in_place, eps=0.5, loss_fn=model.loss)
    estimate(torch.zeros(1), torch.zeros(1))
    v = estimate.directions()[0]["theta"]
    grad = estimate.write_grad_()["theta"] if in_place else model.theta.grad
    torch.testing.assert_close(grad, (model.grad @ v) * v, rtol=1e-12, atol=1e-12)


def test_on_a_smooth_function_the_bias_is_order_eps_squared_in_float64_until_rounding_takes_over():
    eps = [0.1 * 2.0**-k for k in range(12)]  # 0.1 down to 5e-5
    errors = [difference_error(F64, e) for e in eps]
    for e, big, small in zip(eps, errors, errors[1:]):
        assert 3.8 < big / small < 4.2, f"halving eps={e:.3g} divided the error by {big / small:.3g}, not 4"
    # far below, rounding (~1e-16 |f| / eps) is larger than what eps² would leave
    assert difference_error(F64, 1e-8) > 100 * errors[-1] * (1e-8 / eps[-1]) ** 2
    assert difference_error(F64, 1e-8) > difference_error(F64, 1e-5)


def test_in_float32_too_small_an_eps_makes_the_error_grow_again():
    eps = [0.1 * 2.0**-k for k in range(17)]  # 0.1 down to 1.5e-6
    errors = [difference_error(torch.float32, e) for e in eps]
    best = min(range(len(eps)), key=errors.__getitem__)
    print(f"float32: smallest mean error {errors[best]:.2g} at eps={eps[best]:.3g}")
    assert 3.5 < errors[0] / errors[1] < 4.5  # large eps: still the eps² bias
    assert 1e-3 <= eps[best] <= 5e-2  # (u |f| / |f'''|)^(1/3) with u = 6e-8
    assert errors[-1] > 30 * errors[best]  # cancellation: the difference of two nearly equal float32 losses
    assert all(later > 2 * errors[best] for later in errors[-5:])


# --------------------------------------------------------------------------- against the forward gradient

def relu_kink_distance(model: MLP, x, v: dict) -> float:
    """How far along v (to first order) the nearest hidden pre-activation of the MLP is
    from changing sign: below it, the piecewise-linear network is smooth on θ ± εv."""
    lin = [m for m in model if isinstance(m, nn.Linear)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    a, da, distance = x.flatten(1), torch.zeros_like(x.flatten(1)), math.inf
    for name, layer in zip(names[:-1], lin[:-1]):
        z = a @ layer.weight.T + layer.bias
        dz = da @ layer.weight.T + a @ v[f"{name}.weight"].T + v[f"{name}.bias"]
        distance = min(distance, (z.abs() / dz.abs()).min().item())
        a, da = z.relu(), dz * (z > 0)
    return distance


def along_one_direction(model, x, y, eps: float, **kwargs) -> tuple[float, dict]:
    """An estimate with one direction, the same for every eps (from a generator seeded 0):
    its projection p = (L(θ+εv) − L(θ−εv)) / 2ε, after checking that p.grad = p·v, and v."""
    estimate = estimator(model, in_place=False, eps=eps, **kwargs)
    estimate(x, y)
    v = estimate.directions()[0]
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, estimate.projections[0] * v[n], rtol=1e-14, atol=0)
    return estimate.projections[0], v


@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
def test_on_the_mlp_spsa_equals_the_forward_gradient_with_the_same_v_below_the_relu_kinks(sampler):
    model = seeded(MLP)
    x, y = mnist_batch(8, F64)
    _, v = along_one_direction(model, x, y, 1e-3, sampler=sampler)
    params = {n: p.detach() for n, p in model.named_parameters()}
    _, dd = directional_derivative(lambda p: cross_entropy(functional_call(model, p, (x,)), y), params, v)
    kink = relu_kink_distance(model, x, v)

    def relative_error(eps: float) -> float:
        return abs(along_one_direction(model, x, y, eps, sampler=sampler)[0] - dd.item()) / abs(dd.item())

    assert relative_error(kink / 10) < 1e-6  # the smooth piece: bias ~ eps², rounding ~ 1e-16/eps
    # a ReLU network is only piecewise smooth: crossing kinks costs far more than eps² would
    assert relative_error(1e-3) > 1e3 * relative_error(kink / 10)


def test_on_the_mlps_smooth_last_layer_spsa_minus_the_forward_gradient_is_order_eps_squared():
    model = seeded(MLP)
    for p in list(model.parameters())[:-2]:
        p.requires_grad_(False)  # only the last Linear layer: the loss is smooth in it
    x, y = mnist_batch(8, F64)
    _, v = along_one_direction(model, x, y, 1e-3)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    _, dd = directional_derivative(lambda p: cross_entropy(functional_call(model, (p, frozen), (x,)), y), params, v)
    errors = [abs(along_one_direction(model, x, y, 0.1 * 2.0**-k)[0] - dd.item()) for k in range(6)]
    for big, small in zip(errors, errors[1:]):
        assert 3.7 < big / small < 4.3


def test_the_mean_of_many_estimates_approaches_the_autograd_gradient():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    grads = torch.autograd.grad(cross_entropy(model(x), y), list(model.parameters()))
    grad = torch.cat([t.flatten() for t in grads])
    estimate = estimator(model, in_place=True, eps=1e-3)
    draws = []
    for _ in range(3000):
        estimate(x, y)
        draws.append(torch.cat([t.flatten() for t in estimate.write_grad_().values()]).clone())
    draws = torch.stack(draws)
    other = torch.randn(grad.numel(), generator=g, dtype=F64)
    for u in (grad / grad.norm(), other / other.norm()):  # along the gradient and across it
        s = draws @ u
        assert abs(s.mean() - grad @ u) < 5 * s.std() / len(s) ** 0.5
    assert (draws[0] - grad).norm() > 0.3 * grad.norm()  # and the tolerance is meaningful: one draw is far off


# --------------------------------------------------------------------------- exact restoration

SPECIALS = torch.tensor([-0.0, 0.0, 1e-30, -1e-38, 1e-45, 3e38, -3e38, float("inf"), float("nan"), 1.0])


@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
@pytest.mark.parametrize("eps", [1e-2, 1e-3])
@pytest.mark.parametrize("in_place", [False, True])
def test_after_an_estimate_the_weights_are_bitwise_unchanged(in_place, eps, sampler):
    model = seeded(MLP).float()
    x, y = mnist_batch(16)
    before = bits(model)
    estimate = estimator(model, in_place=in_place, eps=eps, sampler=sampler, num_directions=2)
    estimate(x, y)
    assert same_bits(before, bits(model))
    assert estimate._log == {}  # nothing is held between estimates
    if in_place:  # where the naive θ + εv − 2εv + εv would have left many weights a bit off
        naive = {}
        for name, p in model.named_parameters():
            b = estimate.direction(estimate.seeds[0])[name] * eps
            naive[name] = (((p.detach() + b) - 2 * b) + b).view(torch.int32)
        assert not same_bits(before, naive)


def test_signed_zeros_tiny_huge_infinite_and_nan_weights_come_back_bit_for_bit():
    model = nn.Linear(5, 2)
    with torch.no_grad():
        model.weight.view(-1).copy_(SPECIALS)
    before = bits(model)
    for eps in (1e-3, 1.0):
        estimate = estimator(model, in_place=True, eps=eps, num_directions=3)
        estimate(torch.ones(4, 5), torch.zeros(4, dtype=torch.long))
        assert same_bits(before, bits(model))


def test_a_failing_evaluation_in_place_leaves_the_weights_as_they_were():
    model = seeded(MLP).float()
    before = bits(model)
    calls = []

    def fails_at_the_second_point(logits, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory, say")
        return cross_entropy(logits, y)

    with pytest.raises(ValueError, match="cannot take x of shape"):
        estimator(model, in_place=True)(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    estimate = estimator(model, in_place=True, loss_fn=fails_at_the_second_point)
    with pytest.raises(ValueError, match="out of memory, say"):
        estimate(*mnist_batch(4))
    assert len(calls) == 2 and same_bits(before, bits(model))
    with pytest.raises(ValueError, match="call estimate"):  # and no half estimate is left to apply
        estimate.step_(0.1)


def seen_weights(model: nn.Module) -> list:
    """Record, at every forward pass, the bits of the weights each Linear layer computes with."""
    seen = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone().view(torch.int32)))
    return seen


@pytest.mark.parametrize("k", [1, 3])
def test_both_modes_see_the_same_weights_and_losses_and_leave_the_same_estimate(k):
    model = seeded(MLP).float()
    x, y = mnist_batch(16)
    seen = seen_weights(model)
    copies, in_place = estimator(model, in_place=False, num_directions=k), estimator(model, in_place=True, num_directions=k)
    loss = copies(x, y)
    on_copies, seen[:] = list(seen), []
    assert torch.equal(loss, in_place(x, y))
    assert len(seen) == 3 * 2 * k and all(torch.equal(a, b) for a, b in zip(on_copies, seen))  # θ ± εv, bitwise
    assert copies.seeds == in_place.seeds and copies.projections == in_place.projections
    on_copies = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    assert same_bits(on_copies, in_place.write_grad_())


class Allocations(TorchDispatchMode):
    """The largest new storage (bytes) any operation allocates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_in_place_never_allocates_a_tangent_or_a_copy_of_the_weights():
    model = seeded(MLP).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = mnist_batch(64)
    largest_weight = max(p.numel() for p in model.parameters()) * 4
    for in_place in (True, False):
        estimate = estimator(model, in_place=in_place)
        with Allocations() as seen:
            for _ in range(2):
                zeroth_step(estimate, optimizer, x, y)
        if in_place:  # two CHUNK-sized scratch rows, the batch's activations, a few % of entries logged
            assert seen.largest <= 2 * CHUNK * 4 < largest_weight
            assert all(p.grad is None for p in model.parameters())
            assert estimate._grads is None and estimate._spares == {}
        else:  # the contrast: the gradient buffer and a perturbed copy, each the size of the model
            assert seen.largest >= count_parameters(model) * 4


def test_a_mezo_step_needs_less_memory_than_a_forward_gradient_or_a_backprop_step():
    memory = bench.measure_memory(["mlp"], (64,), device="cpu", progress=None, methods=("forward", "zeroth"))
    row = memory.loc[("mlp", 64)]
    print(f"peak extra MB at batch 64: {row.to_dict()}")
    assert row["zeroth MB"] < row["forward MB"] and row["zeroth MB"] < row["backprop MB"]
    assert row["zeroth / backprop"] == pytest.approx(row["zeroth MB"] / row["backprop MB"])


# --------------------------------------------------------------------------- using the estimate

def test_the_fused_step_is_sgd_on_the_written_estimate():
    model = seeded(MLP)
    x, y = mnist_batch(8, F64)
    estimate = estimator(model, in_place=True, num_directions=2)
    estimate(x, y)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: g.clone() for n, g in estimate.write_grad_().items()}
    estimate.step_(0.1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[n] - 0.1 * grads[n], rtol=0, atol=1e-15)
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters())


def test_zeroth_step_fuses_with_plain_sgd_and_writes_p_grad_for_other_optimizers():
    for optimizer_of, fused in [(lambda m: torch.optim.SGD(m.parameters(), lr=0.1), True),
                                (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), False),
                                (lambda m: torch.optim.Adam(m.parameters(), lr=0.1), False)]:
        model = nn.Linear(4, 3).double()
        estimate = estimator(model, in_place=True)
        before = bits(model)
        zeroth_step(estimate, optimizer_of(model), torch.randn(5, 4, dtype=F64), torch.zeros(5, dtype=torch.long))
        assert (model.weight.grad is None) == fused
        assert not same_bits(before, bits(model))


def test_step_needs_an_estimate_first():
    with pytest.raises(ValueError, match="call estimate"):
        ZerothOrderGradient(nn.Linear(2, 2), in_place=True).step_(0.1)


def test_the_returned_loss_is_the_mean_of_the_perturbed_losses_close_to_the_loss_at_theta():
    model = seeded(MLP).float()
    x, y = mnist_batch(64)
    loss = estimator(model, in_place=True)(x, y)
    assert loss.dim() == 0 and not loss.requires_grad
    assert abs(loss.item() - cross_entropy(model(x), y).item()) < 1e-4


# --------------------------------------------------------------------------- training and the store

def test_train_model_with_method_zeroth_lowers_the_loss_of_the_mlp():
    data = mnist_batch(256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the LR schedule's "step() before optimizer.step()"
        model, history = train_model("mlp", "zeroth", data, {"train": data}, lr=1e-3, batch_size=8, seed=0,
                                     progress=False, device="cpu")
    first, last = history.epochs[0]["train_loss"], history.epochs[-1]["train_loss"]
    print(f"zeroth, 32 steps: train loss {first:.4f} -> {last:.4f}")
    assert len(history.step_loss) == 32 and not history.diverged
    assert last < first - 5e-4
    assert history.meta["method"] == "zeroth" and history.meta["eps"] == LATER_DEFAULTS["eps"]
    assert history.meta["sampler"] == "rademacher" and history.meta["num_tangents"] == 1
    assert all(p.grad is None for p in model.parameters())  # MeZO's fused step never wrote p.grad


def test_the_same_seed_gives_the_same_zeroth_run():
    data = mnist_batch(64)
    runs = [train_model("logreg", "zeroth", data, lr=1e-2, batch_size=16, seed=3, eps=1e-2, num_tangents=2,
                        sampler="gaussian", progress=False, device="cpu")[1].step_loss for _ in range(2)]
    assert runs[0] == runs[1]


def test_committed_style_configs_keep_their_keys():
    # computed before method="zeroth" and its eps setting existed
    assert run_key(run_config()) == "6a7787ca653cba55"
    assert run_key(run_config(method="backprop")) == "bf7df82e2b300c91"
    assert run_key(run_config(model="convnet", method="forward", sampler="rank1", num_tangents=4, clip=1.0,
                              optimizer="adam", inputs="standardized")) == "fd9a383fef1b182d"
    for method in ("forward", "backprop"):  # eps is no setting of theirs: it never splits their runs
        config = run_config(method=method, eps=0.5)
        assert "eps" not in config and config == run_config(method=method)
        assert "eps" not in fit_kwargs(config) and "eps" not in describe(config)
    for path in store.stored_paths(ROOT / "results"):
        config = store.read(path)["config"]  # read() checks that run_config keeps it and its file name
        assert "eps" not in config or config["method"] == "zeroth", path  # only zeroth-order runs split on eps
        assert run_path(config, "x").name == path.name


def test_a_zeroth_config_round_trips_through_the_store():
    config = run_config(method="zeroth", eps=1e-2, sampler="gaussian", num_tangents=4)
    assert config["eps"] == 0.01 and config["sampler"] == "gaussian" and config["clip"] is None
    assert run_config(**config) == config
    forward = run_config(method="forward", sampler="gaussian", num_tangents=4)
    assert run_key(config) != run_key(forward) and run_path(config, "x").name.startswith("zeroth-")
    assert "zeroth" in describe(config) and "eps=0.01" in describe(config) and "gaussian×4" in describe(config)
    assert fit_kwargs(config)["eps"] == 0.01 and fit_kwargs(config)["num_tangents"] == 4
    default = run_config(method="zeroth")
    assert "eps" not in default and "eps=0.001" in describe(default)
    assert run_key(default) != run_key(run_config(method="zeroth", eps=1e-2))


def test_a_zeroth_run_trains_stores_and_replays(tmp_path):
    config = run_config(model="logreg", method="zeroth", lr=1e-2, eps=1e-2, epochs=1, n_train=256, n_val=1000,
                        eval_sets=["val"])
    path, trained = train_and_save(config, tmp_path, progress=False)
    assert trained and path.name.startswith("zeroth-")
    record = store.read(path)
    assert record["config"] == config and record["history"]["meta"]["eps"] == 0.01
    assert check_replay(path, steps=3)["exact"]


# --------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("eps", [0, -1e-3, float("nan"), float("inf"), True, "1e-3", None])
def test_a_bad_eps_is_named_with_what_is_allowed(eps):
    with pytest.raises(ValueError, match=r"eps=.* is not allowed: use a finite positive number"):
        ZerothOrderGradient(nn.Linear(2, 2), eps=eps)
    with pytest.raises(ValueError, match=r"eps=.* is not allowed"):
        directional_difference(lambda t: t.sum(), torch.ones(2), torch.ones(2), eps)
    with pytest.raises(ValueError, match=r"eps=.* is not allowed"):
        run_config(method="zeroth", eps=eps)


@pytest.mark.parametrize("k", [0, -1, 1.5, 2.0, True])
def test_a_bad_number_of_directions_is_named_with_what_is_allowed(k):
    with pytest.raises(ValueError, match=r"num_directions=.* is not allowed: use a positive integer"):
        ZerothOrderGradient(nn.Linear(2, 2), num_directions=k)
    with pytest.raises(ValueError, match=r"num_tangents=.* is not allowed: use a positive integer"):
        run_config(method="zeroth", num_tangents=k)


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "rank1"}, "sampler='rank1' is not allowed: use one of 'gaussian', 'rademacher'"),
    ({"in_place": "yes"}, "in_place='yes' is not allowed"),
    ({"generator": 0}, "generator=0 is not allowed"),
    ({"loss_fn": None}, "loss_fn=None is not allowed"),
])
def test_other_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZerothOrderGradient(nn.Linear(2, 2), **kwargs)
    with pytest.raises(ValueError, match="model=.* is not allowed"):
        ZerothOrderGradient("mlp")


@pytest.mark.parametrize("settings, message", [
    ({"method": "zeroth", "clip": 1.0}, "clips nothing"),
    ({"method": "zeroth", "perturb": "activities"}, "perturbs the weights"),
    ({"method": "zeroth", "sampler": "rank1"}, "sampler='rank1' is not allowed"),
    ({"method": "forward", "eps": 1e-2}, "eps=0.01 is the finite-difference step of method='zeroth'"),
])
def test_fit_refuses_settings_of_other_methods(settings, message):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = (torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        fit(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train=data, progress=False, **settings)
