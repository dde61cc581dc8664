"""Tests for fgtutor.models: the networks of the original study."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fgtutor.models import MLP, ConvNet, LogisticRegression, Net, count_parameters, make_model


@pytest.mark.parametrize("factory", [LogisticRegression, MLP, lambda: ConvNet(padding=0), lambda: ConvNet(padding=1)],
                         ids=["logreg", "mlp", "convnet-p0", "convnet-p1"])
def test_models_map_a_batch_of_images_to_ten_logits(factory):
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = factory()(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("factory, expected", [
    (LogisticRegression, 7_850),
    (MLP, 1_863_690),
    (ConvNet, 1_171_274),
    (lambda: ConvNet(padding=0), 1_171_274),
    (lambda: ConvNet(padding=1), 3_333_962),
], ids=["logreg", "mlp", "convnet-default", "convnet-p0", "convnet-p1"])
def test_parameter_counts_match_the_paper(factory, expected):
    model = factory()
    assert count_parameters(model) == expected == sum(p.numel() for p in model.parameters())


def test_count_parameters_skips_frozen_parameters():
    model = LogisticRegression()
    model[1].bias.requires_grad_(False)
    assert count_parameters(model) == 7_840


def test_net_is_the_mlp_alias():
    assert Net is MLP


def test_mlp_hidden_width_is_configurable():
    assert count_parameters(MLP(hidden=8)) == 784 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10


@pytest.mark.parametrize("hidden", [0, -3, 2.5])
def test_mlp_rejects_a_bad_hidden_width(hidden):
    with pytest.raises(ValueError, match="hidden"):
        MLP(hidden=hidden)


@pytest.mark.parametrize("factory", [LogisticRegression, lambda: MLP(hidden=4), ConvNet], ids=["logreg", "mlp", "convnet"])
def test_models_are_sequential_and_carry_their_name(factory):
    model = factory()
    assert isinstance(model, nn.Sequential)
    assert type(model).__name__ in repr(model)


@pytest.mark.parametrize("name, cls", [("logreg", LogisticRegression), ("mlp", MLP), ("convnet", ConvNet)])
def test_make_model_builds_by_name(name, cls):
    assert type(make_model(name)) is cls


def test_make_model_passes_keyword_arguments():
    assert count_parameters(make_model("convnet", padding=1)) == 3_333_962


@pytest.mark.parametrize("name", ["resnet", "MLP", ""])
def test_make_model_with_an_unknown_name_raises_value_error_naming_it(name):
    with pytest.raises(ValueError, match=f"model={name!r}"):
        make_model(name)


@pytest.mark.parametrize("padding", [2, -1, "same"])
def test_convnet_rejects_a_bad_padding(padding):
    with pytest.raises(ValueError, match="padding"):
        ConvNet(padding=padding)


def test_kaiming_init_draws_weights_with_variance_two_over_fan_in_and_zero_biases():
    torch.manual_seed(0)
    model = MLP(init="kaiming")
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        fan_in = layer.in_features
        assert abs(layer.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.05, fan_in
        assert torch.count_nonzero(layer.bias) == 0


def test_the_default_init_is_pytorchs_so_stored_runs_keep_their_weights():
    torch.manual_seed(0)
    default = MLP()
    torch.manual_seed(0)
    named = MLP(init="pytorch")
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), named.parameters()))
    # PyTorch's default: U(±1/√fan_in), sd 1/√(3 fan_in), 2.45 times smaller than Kaiming's
    assert abs(default[1].weight.std().item() * (3 * 784) ** 0.5 - 1) < 0.02


def test_an_unknown_init_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="init='he' is not allowed: use one of 'pytorch', 'kaiming'"):
        MLP(init="he")
