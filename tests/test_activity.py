"""Specification of fgtutor.activity: activity-perturbed forward gradients (FG-A, LG-FG-A)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtutor.activity import ActivityGradient, reference_gradient, supports
from fgtutor.forward import ForwardGradient
from fgtutor.models import MLP, LocalMLP, make_model
from fgtutor.train import fit


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)).double()


def small_local() -> LocalMLP:
    torch.manual_seed(0)
    return LocalMLP(hidden=8, groups=2).double()


def batch(model: nn.Module, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    width = 784 if isinstance(model, LocalMLP) else 12
    return torch.randn(n, width, generator=g, dtype=torch.double), torch.randint(0, 10, (n,), generator=g)


def estimates(model: nn.Module, x, y, n: int, sampler: str = "rademacher") -> list[torch.Tensor]:
    """``n`` estimates of every parameter's gradient, stacked: one tensor per parameter."""
    estimate = ActivityGradient(model, sampler=sampler, generator=torch.Generator().manual_seed(2))
    out = [[] for _ in model.parameters()]
    for _ in range(n):
        estimate(x, y)
        for store, p in zip(out, model.parameters()):
            store.append(p.grad.clone())
    return [torch.stack(s) for s in out]


@pytest.mark.parametrize("make", [small_mlp, small_local], ids=["FG-A global loss", "LG-FG-A local losses"])
@pytest.mark.parametrize("sampler", ["rademacher", "gaussian"])
def test_the_estimate_is_unbiased(make, sampler):
    # the mean of many estimates is within 5 standard errors of autograd's gradient, entry by entry
    model = make()
    x, y = batch(model)
    reference = reference_gradient(model, x, y)
    for (name, _), samples, true in zip(model.named_parameters(), estimates(model, x, y, 3000, sampler), reference):
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
        exact = se.max() < 1e-12  # heads and output layer: exact gradients, no noise
        assert torch.all((mean - true).abs() <= 5 * se + 1e-9 * (1 + true.abs())), (name, exact)


def test_local_heads_and_output_layer_get_their_exact_gradients():
    model = small_local()
    x, y = batch(model)
    reference = dict(zip([n for n, _ in model.named_parameters()], reference_gradient(model, x, y)))
    ActivityGradient(model)(x, y)
    for name, p in model.named_parameters():
        if name.startswith(("heads.", "out.")):
            torch.testing.assert_close(p.grad, reference[name])


def test_no_autograd_graph_is_built():
    # the estimator runs under no_grad: nothing it computes could be backpropagated
    for model in (small_mlp(), small_local()):
        x, y = batch(model)
        x.requires_grad_(True)
        loss = ActivityGradient(model)(x, y)
        assert loss.grad_fn is None and not loss.requires_grad
        assert all(p.grad.grad_fn is None for p in model.parameters())


def test_no_backward_pass_runs():
    # a hook on autograd's engine would see any backward pass; the estimator triggers none
    model = small_mlp()
    x, y = batch(model)
    calls = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: calls.append(p))
    ActivityGradient(model)(x, y)
    assert calls == []


def total_variance(samples: torch.Tensor, true: torch.Tensor) -> float:
    return ((samples - true) ** 2).flatten(1).sum(1).mean().item()


@pytest.mark.parametrize("sampler,extra", [("gaussian", 1), ("rademacher", -1)])
def test_variance_grows_with_the_width_not_the_number_of_weights(sampler, extra):
    # one example, one p→q layer: E‖ĝ − g‖² = (q ± 1)‖g‖² for activity perturbation
    # (Ren et al. 2023, Table 1), against (N ± 1)‖g‖² for weight perturbation, N = pq + q
    torch.manual_seed(0)
    p_, q = 8, 5
    model = nn.Sequential(nn.Linear(p_, q)).double()
    x, y = torch.randn(1, p_, dtype=torch.double), torch.tensor([3])
    g = torch.cat([t.flatten() for t in reference_gradient(model, x, y)])
    samples = torch.cat([s.flatten(1) for s in estimates(model, x, y, 8000, sampler)], 1)
    measured = total_variance(samples, g) / g.pow(2).sum().item()
    assert measured == pytest.approx(q + extra, rel=0.1)

    weights = ForwardGradient(model, sampler=sampler, generator=torch.Generator().manual_seed(3))
    w_samples = []
    for _ in range(8000):
        weights(x, y)
        w_samples.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    n_weights = p_ * q + q
    measured_w = total_variance(torch.stack(w_samples), g) / g.pow(2).sum().item()
    assert measured_w == pytest.approx(n_weights + extra, rel=0.1)


def test_per_example_tangents_are_independent():
    # B copies of one example: independent tangents average the noise, so the variance of
    # the batch's estimate is 1/B of one example's (shared tangents would not reduce it)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5)).double()
    x, y = torch.randn(1, 8, dtype=torch.double), torch.tensor([3])
    g = torch.cat([t.flatten() for t in reference_gradient(model, x, y)])
    one = torch.cat([s.flatten(1) for s in estimates(model, x, y, 4000)], 1)
    four = torch.cat([s.flatten(1) for s in estimates(model, x.repeat(4, 1), y.repeat(4), 4000)], 1)
    ratio = total_variance(four, g) / total_variance(one, g)
    assert ratio == pytest.approx(1 / 4, rel=0.1)


def test_fit_trains_with_activity_perturbation_through_any_optimizer():
    torch.manual_seed(0)
    X, Y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    for model in (MLP(hidden=32), make_model("local_mlp", hidden=32, groups=4)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        history = fit(model, "forward", optimizer, (X, Y), {"train": (X, Y)}, epochs=3, progress=False,
                      perturb="activities")
        assert history.meta["perturb"] == "activities"
        assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]


def test_local_mlp_predicts_with_its_output_layer_and_backprop_trains_it_as_an_mlp():
    model = LocalMLP(hidden=16, groups=4)
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 2])
    assert model(x).shape == (3, 10)
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.heads.parameters())
    assert all(p.grad is not None for p in model.blocks.parameters())
    assert len(model.local_losses(x, y)) == 3


@pytest.mark.parametrize("kwargs,match", [
    ({"sampler": "rank1"}, "sampler"),
    ({"sampler": "uniform"}, "sampler"),
    ({"loss_fn": F.mse_loss}, "cross-entropy"),
    ({"generator": 3}, "generator"),
])
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivityGradient(small_mlp(), **kwargs)


def test_unsupported_models_are_refused_with_the_alternative():
    assert supports(small_mlp()) and supports(small_local())
    with pytest.raises(ValueError, match="perturb='weights'"):
        ActivityGradient(make_model("convnet"))
    with pytest.raises(ValueError, match="perturb='weights'"):
        ActivityGradient(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)))


def test_wrong_input_shapes_are_named():
    with pytest.raises(ValueError, match="cannot take x of shape"):
        ActivityGradient(small_mlp())(torch.randn(4, 7, dtype=torch.double), torch.zeros(4, dtype=torch.long))


def test_fit_refuses_weight_perturbation_settings_with_activities():
    model = MLP(hidden=8)
    X, Y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match="one tangent"):
        fit(model, "forward", torch.optim.SGD(model.parameters(), lr=0.1), (X, Y), perturb="activities",
            num_tangents=4, progress=False)
    with pytest.raises(ValueError, match="perturb"):
        fit(model, "forward", torch.optim.SGD(model.parameters(), lr=0.1), (X, Y), perturb="biases", progress=False)


@pytest.mark.parametrize("bad", [{"groups": 3}, {"hidden": 0}, {"groups": 2.5}])
def test_local_mlp_refuses_bad_shapes(bad):
    with pytest.raises(ValueError, match="not allowed|does not divide"):
        LocalMLP(**bad)
