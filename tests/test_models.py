"""Tests for fgtutor.models: the networks of the original study."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtutor.models import (MLP, MODELS, ConvNet, LocalConvNet, LogisticRegression, Net, count_parameters, init_,
                            make_model, patch_ids, patch_means, train_only_last_layer)


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


def heads(channels: int, hidden: int, groups: int, fc_groups: int) -> int:
    """Parameters of a LocalConvNet's heads: four 10·groups × channels, one 10·fc_groups × hidden."""
    return 4 * (10 * groups * channels + 10 * groups) + 10 * fc_groups * hidden + 10 * fc_groups


@pytest.mark.parametrize("kwargs, weights", [
    ({}, 1_171_274),
    ({"padding": 1}, 3_333_962),
    ({"groups": 8, "patches": 4, "fc_groups": 64}, 1_171_274),
], ids=["default", "padding 1", "groups 8, patches 4"])
def test_local_convnet_has_the_convnets_weights_and_small_heads(kwargs, weights):
    model = LocalConvNet(**kwargs)
    convnet = [p.numel() for p in model.blocks.parameters()] + [p.numel() for p in model.out.parameters()]
    assert sum(convnet) == weights  # the ConvNet's layers, as blocks
    assert count_parameters(model) == weights + heads(64, 1024, model.groups, model.fc_groups)


@pytest.mark.parametrize("padding", [0, 1])
def test_local_convnet_predicts_ten_logits_with_its_output_layer_channels_last(padding):
    model = LocalConvNet(padding=padding)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert model.blocks[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert type(make_model("local_convnet")) is LocalConvNet and MODELS["local_convnet"] is LocalConvNet


def test_local_convnet_local_losses_are_one_per_block_and_the_output_loss():
    model = LocalConvNet(channels=4, hidden=8, groups=2, patches=2, fc_groups=2)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    losses = model.local_losses(x, y)
    assert len(losses) == 6  # four convolutional blocks, the fully connected one, the output layer
    assert all(loss.dim() == 0 and loss.item() > 0 for loss in losses)  # sums of cross-entropies
    torch.testing.assert_close(losses[5], F.cross_entropy(model(x), y))


def test_local_losses_stop_the_gradient_between_blocks():
    # block l's loss trains block l and its heads only; the output loss the output layer only
    model = LocalConvNet(channels=4, hidden=8, groups=2, patches=2, fc_groups=2)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    names = [n for n, _ in model.named_parameters()]
    for i, loss in enumerate(model.local_losses(x, y)):
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        reached = {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
        own = {f"out.{p}" for p in ("weight", "bias")} if i == 5 else \
            {f"{part}.{i}.{p}" for part in ("blocks", "heads") for p in ("weight", "bias")}
        assert reached == own, i


def test_each_patch_loss_reaches_its_own_group_and_patch_only():
    # the gradient of a block's summed loss w.r.t. its output h, on group g and patch q, is
    # that of L_gq alone without any stop-gradient: every loss reaches its own entries only
    model = LocalConvNet(channels=4, hidden=8, groups=2, patches=2, fc_groups=2).double()
    h = torch.rand(2, 4, 6, 6, dtype=torch.double, requires_grad=True)
    y = torch.tensor([3, 7])
    head = model.heads[0]
    total = torch.autograd.grad(model._patch_losses(h, head, y), h)[0]
    for g in range(2):
        for q in range(4):
            logits = head(patch_means(F.layer_norm(h, h.shape[1:]), 2)[:, q])[:, 10 * g:10 * g + 10]
            alone = torch.autograd.grad(F.cross_entropy(logits, y), h)[0]
            rows, columns = slice(3 * (q // 2), 3 * (q // 2) + 3), slice(3 * (q % 2), 3 * (q % 2) + 3)
            region = (slice(None), slice(2 * g, 2 * g + 2), rows, columns)
            torch.testing.assert_close(total[region], alone[region])


def test_patch_means_average_each_channel_over_uneven_patches():
    h = torch.arange(2 * 3 * 7 * 5, dtype=torch.double).view(2, 3, 7, 5)
    rows, columns = [(0, 4), (4, 7)], [(0, 3), (3, 5)]  # patch_ids: the first patches one longer
    assert patch_ids(7, 2).tolist() == [0, 0, 0, 0, 1, 1, 1]
    want = torch.stack([h[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in rows for c0, c1 in columns], 1)
    torch.testing.assert_close(patch_means(h, 2), want)
    torch.testing.assert_close(patch_means(h.to(memory_format=torch.channels_last), 2), want)


def test_backprop_of_the_output_trains_a_local_convnet_as_a_convnet():
    model = LocalConvNet(channels=4, hidden=8, groups=2, fc_groups=2)
    F.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([0, 1])).backward()
    assert all(p.grad is None for p in model.heads.parameters())
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_kaiming_init_works_on_a_local_convnet():
    model = init_(LocalConvNet(channels=8, hidden=16, groups=2, fc_groups=2), "kaiming")
    assert torch.count_nonzero(model.blocks[0].bias) == 0 and torch.count_nonzero(model.heads[4].bias) == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"groups": 3}, "groups=3 does not divide channels=64: use one of 1, 2, 4, 8, 16, 32, 64"),
    ({"groups": 0}, "groups=0 is not allowed"),
    ({"fc_groups": 3}, "fc_groups=3 does not divide hidden=1024"),
    ({"patches": 0}, "patches=0 is not allowed"),
    ({"patches": 2.5}, "patches=2.5 is not allowed"),
    ({"patches": 5}, "patches=5 is not allowed with padding=0: .* 4×4, so use 1 to 4"),
    ({"patches": 8, "padding": 1}, "patches=8 is not allowed with padding=1: .* use 1 to 7"),
    ({"padding": 2}, "padding=2 is not allowed"),
    ({"channels": 6, "groups": 4}, "groups=4 does not divide channels=6: use one of 1, 2, 3, 6"),
], ids=["groups", "zero groups", "fc groups", "zero patches", "fractional patches", "too many patches",
        "too many padded patches", "padding", "groups of few channels"])
def test_local_convnet_refuses_bad_arguments_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalConvNet(**kwargs)


@pytest.mark.parametrize("factory, head", [(MLP, "5."), (ConvNet, "13.")])
def test_train_only_last_layer_freezes_all_but_the_last_linear_layer(factory, head):
    model = train_only_last_layer(factory())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{head}weight", f"{head}bias"]
    assert count_parameters(model) == 10_250


def test_train_only_last_layer_needs_a_linear_layer():
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        train_only_last_layer(nn.Sequential(nn.Flatten()))
