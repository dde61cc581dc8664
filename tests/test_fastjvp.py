"""Tests for fgtutor.fastjvp: every hand-written forward-mode rule against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from fgtutor import fastjvp
from fgtutor.losses import cross_entropy
from fgtutor.models import MLP, ConvNet, LogisticRegression
from fgtutor.tangents import rank_one
from conftest import seeded


F64 = torch.float64
TOL = dict(rtol=1e-4, atol=1e-10)



def randn(*shape, seed: int = 0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def dense(dy, like):
    """The rules return None for an all-zero tangent."""
    return torch.zeros_like(like) if dy is None else dy


def check_layer_rule(rule, layer, x, dx, tangents):
    """Compare ``rule(layer, Dual(x, dx), tangents)`` with torch.func.jvp of the layer's functional form;
    parameters missing from ``tangents`` (frozen) and a missing input tangent count as zero."""
    params = {n: p.detach() for n, p in layer.named_parameters()}
    full = {n: tangents.get(n, torch.zeros_like(p)) for n, p in params.items()}
    y_ref, dy_ref = jvp(lambda inp, p: functional_call(layer, p, (inp,)), (x, params),
                        (dense(dx, x), full))
    with torch.no_grad():
        y, dy = rule(layer, fastjvp.Dual(x.clone(), None if dx is None else dx.clone()), tangents).take()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dense(dy, y), dy_ref, **TOL)
    return dy


PARAM_SUBSETS = [("weight", "bias"), ("weight",), ("bias",), ()]


@pytest.mark.parametrize("with_input_tangent", [True, False])
@pytest.mark.parametrize("trainable", PARAM_SUBSETS, ids=lambda s: "+".join(s) or "frozen")
def test_linear_rule_agrees_with_torch_func_jvp(with_input_tangent, trainable):
    layer = seeded(lambda: nn.Linear(6, 4))
    x = randn(5, 6, seed=1)
    dx = randn(5, 6, seed=2) if with_input_tangent else None
    t = {n: randn(*p.shape, seed=3 + i) for i, (n, p) in enumerate(layer.named_parameters()) if n in trainable}
    dy = check_layer_rule(fastjvp.linear, layer, x, dx, t)
    if not with_input_tangent and not trainable:
        assert dy is None  # an all-zero tangent stays symbolic


def test_linear_rule_without_bias_agrees_with_torch_func_jvp():
    layer = seeded(lambda: nn.Linear(6, 4, bias=False))
    check_layer_rule(fastjvp.linear, layer, randn(3, 6, seed=1), randn(3, 6, seed=2), {"weight": randn(4, 6, seed=3)})


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("with_input_tangent", [True, False])
@pytest.mark.parametrize("trainable", PARAM_SUBSETS, ids=lambda s: "+".join(s) or "frozen")
def test_conv2d_rule_agrees_with_torch_func_jvp(padding, with_input_tangent, trainable):
    layer = seeded(lambda: nn.Conv2d(3, 4, 3, padding=padding))
    x = randn(2, 3, 8, 8, seed=1)
    dx = randn(2, 3, 8, 8, seed=2) if with_input_tangent else None
    t = {n: randn(*p.shape, seed=3 + i) for i, (n, p) in enumerate(layer.named_parameters()) if n in trainable}
    check_layer_rule(fastjvp.conv2d, layer, x, dx, t)


def test_relu_rule_agrees_with_torch_func_jvp_including_the_subgradient_at_zero():
    x = randn(4, 10, seed=1)
    x[:, :3] = 0.0
    check_layer_rule(fastjvp.relu, nn.ReLU(), x, randn(4, 10, seed=2), {})
    assert fastjvp.relu(nn.ReLU(), fastjvp.Dual(x), {}).tangent is None


@pytest.mark.parametrize("pool, size", [(nn.MaxPool2d(2), 8), (nn.MaxPool2d(2), 7),
                                        (nn.MaxPool2d(3, stride=2, padding=1), 9)],
                         ids=["2x2", "2x2-odd", "3x3-s2-p1"])
def test_max_pool2d_rule_agrees_with_torch_func_jvp(pool, size):
    x = randn(2, 3, size, size, seed=1)
    dy = check_layer_rule(fastjvp.max_pool2d, pool, x, randn(2, 3, size, size, seed=2), {})
    assert dy.shape == pool(x).shape


def test_flatten_rule_agrees_with_torch_func_jvp():
    dy = check_layer_rule(fastjvp.flatten, nn.Flatten(), randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2), {})
    assert dy.shape == (2, 48)


# --------------------------------------------------------------------------- sequential_jvp

MODELS = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "convnet-p0": lambda: ConvNet(padding=0),
    "convnet-p1": lambda: ConvNet(padding=1),
}


FREEZE = {
    "all-trainable": lambda i, n: True,
    "biases-only": lambda i, n: n.endswith("bias"),  # every weight frozen
    "first-layer-frozen": lambda i, n: i >= 2,  # no tangent until the second parametrised layer
}


@pytest.mark.parametrize("freeze", list(FREEZE))
@pytest.mark.parametrize("name", list(MODELS))
def test_sequential_jvp_agrees_with_torch_func_jvp(name, freeze):
    model = seeded(MODELS[name])
    x = randn(4, 1, 28, 28, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: randn(*p.shape, seed=10 + i) for i, (n, p) in enumerate(params.items()) if FREEZE[freeze](i, n)}
    full = {n: tangents.get(n, torch.zeros_like(p)) for n, p in params.items()}
    y_ref, dy_ref = jvp(lambda p: functional_call(model, p, (x,)), (params,), (full,))
    with torch.no_grad():
        y, dy = fastjvp.sequential_jvp(model, tangents, x)
    assert y.shape == (4, 10)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dense(dy, y), dy_ref, **TOL)


def test_sequential_jvp_leaves_the_tangents_unchanged():
    model = seeded(lambda: MLP(hidden=8))
    tangents = {n: randn(*p.shape, seed=i) for i, (n, p) in enumerate(model.named_parameters())}
    before = {n: t.clone() for n, t in tangents.items()}
    with torch.no_grad():
        fastjvp.sequential_jvp(model, tangents, randn(3, 1, 28, 28, seed=1))
    for n in tangents:
        assert torch.equal(tangents[n], before[n]), n


# --------------------------------------------------------------------------- losses

def test_cross_entropy_jvp_agrees_with_jvp_of_f_cross_entropy():
    logits, dlogits = randn(6, 10, seed=1) * 3, randn(6, 10, seed=2)
    targets = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(3))
    loss_ref, dd_ref = jvp(lambda z: F.cross_entropy(z, targets), (logits,), (dlogits,))
    loss, dd = fastjvp.cross_entropy_jvp(logits, dlogits, targets)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(dd, dd_ref, **TOL)


@pytest.mark.parametrize("loss_fn", [cross_entropy, F.cross_entropy,
                                     lambda z, t: F.mse_loss(z, F.one_hot(t, 10).to(z.dtype))],
                         ids=["fgtutor-xent", "torch-xent", "mse"])
def test_loss_jvp_agrees_with_torch_func_jvp(loss_fn):
    logits, dlogits = randn(5, 10, seed=1), randn(5, 10, seed=2)
    targets = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(3))
    loss_ref, dd_ref = jvp(lambda z: loss_fn(z, targets), (logits,), (dlogits,))
    loss, dd = fastjvp.loss_jvp(loss_fn, logits, dlogits, targets)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(dd, dd_ref, **TOL)


def test_loss_jvp_without_a_tangent_gives_a_zero_directional_derivative():
    logits = randn(5, 10, seed=1)
    targets = torch.arange(5)
    loss, dd = fastjvp.loss_jvp(cross_entropy, logits, None, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    assert dd.item() == 0.0


# --------------------------------------------------------------------------- supports

@pytest.mark.parametrize("name", list(MODELS))
def test_supports_the_package_models(name):
    assert fastjvp.supports(MODELS[name]())


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Dropout()),
    nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
    nn.Sequential(nn.Linear(4, 4), nn.Tanh()),
    nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
    nn.Sequential(nn.MaxPool2d(2, return_indices=True)),
    nn.Sequential(),
    nn.Linear(4, 4),
], ids=["dropout", "batchnorm", "tanh", "reflect-padding", "pool-indices", "empty", "not-sequential"])
def test_supports_rejects_layers_without_a_rule_and_non_sequential_modules(model):
    assert not fastjvp.supports(model)


def test_a_supported_sequential_that_reuses_an_activation_gets_the_right_jvp():
    """supports() must not accept a model whose forward-mode pass the rules get wrong."""
    act = nn.ReLU()
    model = seeded(lambda: nn.Sequential(nn.Linear(6, 5), act, nn.Linear(5, 5), act, nn.Linear(5, 3)))
    if not fastjvp.supports(model):
        return  # rejected: the estimator falls back to torch.func, which is correct
    x = randn(4, 6, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: randn(*p.shape, seed=10 + i) for i, (n, p) in enumerate(params.items())}
    y_ref, dy_ref = jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))
    with torch.no_grad():
        y, dy = fastjvp.sequential_jvp(model, tangents, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dy, dy_ref, **TOL)


@pytest.mark.parametrize("with_input_tangent", [True, False])
@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(6, 5), (4, 6)), (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6))],
                         ids=["linear", "conv2d"])
def test_rules_take_a_rank_one_weight_tangent_as_factors(make, shape, with_input_tangent):
    layer = seeded(make).double()
    g = torch.Generator().manual_seed(4)
    factored = {"weight": rank_one(layer.weight.shape, layer.weight, g), "bias": randn(*layer.bias.shape, seed=5)}
    x, dx = randn(*shape, seed=1), (randn(*shape, seed=2) if with_input_tangent else None)
    rule = fastjvp.linear if isinstance(layer, nn.Linear) else fastjvp.conv2d
    with torch.no_grad():
        y, dy = rule(layer, fastjvp.Dual(x.clone(), None if dx is None else dx.clone()), factored).take()
    dense_tangents = {"weight": factored["weight"].dense(), "bias": factored["bias"]}
    check_layer_rule(rule, layer, x, dx, dense_tangents)  # the dense rule agrees with torch.func...
    with torch.no_grad():
        _, dy_dense = rule(layer, fastjvp.Dual(x.clone(), None if dx is None else dx.clone()), dense_tangents).take()
    torch.testing.assert_close(dy, dy_dense, **TOL)  # ...and the factored one with the dense one
