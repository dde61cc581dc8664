"""Specification of fgtutor.activity: activity-perturbed forward gradients (FG-A, LG-FG-A)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import seeded
from fgtutor.activity import ActivityGradient, activity_jvp, reference_gradient, supports, tied_max_pool2d
from fgtutor.data import load_mnist
from fgtutor.forward import ForwardGradient
from fgtutor.models import MLP, ConvNet, LocalConvNet, LocalMLP, make_model, normalize_maps, patch_means
from fgtutor.store import model_constructor, run_config
from fgtutor.train import fit, train_model


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)).double()


def small_local() -> LocalMLP:
    torch.manual_seed(0)
    return LocalMLP(hidden=8, groups=2).double()


def small_local_conv(padding: int = 0, patches: int = 2) -> LocalConvNet:
    """LocalConvNet's blocks with 4 channels and 8 hidden units, two groups each: 4×26×26 →
    4×12×12 → 4×10×10 → 4×4×4 → 8 with padding 0 (2×2 patches of 13, 6, 5 and 2 rows);
    4×28×28 → 4×14×14 → 4×14×14 → 4×7×7 with padding 1 (3×3 patches, of uneven sizes)."""
    torch.manual_seed(0)
    return LocalConvNet(padding=padding, groups=2, patches=patches, fc_groups=2, channels=4, hidden=8).double()


def small_convnet(padding: int) -> nn.Sequential:
    """Every kind of layer ConvNet has (and a strided convolution), small enough for many
    draws: 12×12 images → 3×12×12 → pool → 4×3×3 → 10 with padding 1; 3×10×10 and 4×2×2
    with padding 0."""
    torch.manual_seed(0)
    side = 3 if padding else 2
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=2, padding=padding), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * side * side, 10)).double()


def convnet(padding: int) -> ConvNet:
    return seeded(lambda: ConvNet(padding=padding))


def batch(model: nn.Module, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if isinstance(model, LocalMLP):
        shape = (784,)
    elif isinstance(model, LocalConvNet):
        shape = (1, 28, 28)
    elif isinstance(model[0], nn.Conv2d):
        shape = (1, 28, 28) if isinstance(model, ConvNet) else (1, 12, 12)
    else:
        shape = (12,)
    return torch.randn(n, *shape, generator=g, dtype=torch.double), torch.randint(0, 10, (n,), generator=g)


def perturbed(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs activity perturbation moves, in order."""
    return [layer for layer in model if isinstance(layer, (nn.Linear, nn.Conv2d))]


def record(model: nn.Module, x: torch.Tensor, moves=None) -> tuple[torch.Tensor, list, list]:
    """``model(x)`` by autograd, with the input and output of every perturbed layer (each
    output moved by the next of ``moves``, if given): the reference for the hand-written pass."""
    inputs, outputs, moves = [], [], iter(moves or ())

    def hook(layer, args, out):
        out = out + next(moves, 0)
        inputs.append(args[0])
        outputs.append(out)
        return out

    handles = [layer.register_forward_hook(hook) for layer in perturbed(model)]
    try:
        return model(x), inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def estimates(model: nn.Module, x, y, n: int, sampler: str = "rademacher") -> list[torch.Tensor]:
    """``n`` estimates of every parameter's gradient, stacked: one tensor per parameter."""
    estimate = ActivityGradient(model, sampler=sampler, generator=torch.Generator().manual_seed(2))
    out = [[] for _ in model.parameters()]
    for _ in range(n):
        estimate(x, y)
        for store, p in zip(out, model.parameters()):
            store.append(p.grad.clone())
    return [torch.stack(s) for s in out]


@pytest.mark.parametrize("make", [small_mlp, small_local, lambda: small_convnet(0), lambda: small_convnet(1),
                                  small_local_conv, lambda: small_local_conv(padding=1, patches=3)],
                         ids=["FG-A global loss", "LG-FG-A local losses", "FG-A convolutions", "FG-A padded convs",
                              "LG-FG-A local conv losses", "LG-FG-A uneven patches"])
@pytest.mark.parametrize("sampler", ["rademacher", "gaussian"])
def test_the_estimate_is_unbiased(make, sampler):
    # the mean of many estimates is within 5 standard errors of autograd's gradient, entry by
    # entry, and so is its projection on the gradient, ⟨ĝ, g⟩/‖g‖² (1 in expectation); for a
    # LocalConvNet, autograd's gradient of the sum of its local losses (fewer draws: a
    # LocalConvNet's call is slower, and the tolerance follows the spread of the draws)
    model = make()
    x, y = batch(model, 3 if isinstance(model, LocalConvNet) else 5)
    reference = reference_gradient(model, x, y)
    draws = 800 if isinstance(model, LocalConvNet) else 3000
    for (name, _), samples, true in zip(model.named_parameters(), estimates(model, x, y, draws, sampler), reference):
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
        exact = se.max() < 1e-12  # heads and output layer: exact gradients, no noise
        assert torch.all((mean - true).abs() <= 5 * se + 1e-9 * (1 + true.abs())), (name, exact)
        projections = (samples * true).flatten(1).sum(1) / true.pow(2).sum()
        assert abs(projections.mean() - 1) <= 5 * projections.std() / math.sqrt(len(samples)) + 1e-9, name


@pytest.mark.parametrize("make", [small_local, small_local_conv, lambda: small_local_conv(padding=1, patches=3)],
                         ids=["LocalMLP", "LocalConvNet", "uneven patches"])
def test_local_heads_and_output_layer_get_their_exact_gradients(make):
    model = make()
    x, y = batch(model)
    reference = dict(zip([n for n, _ in model.named_parameters()], reference_gradient(model, x, y)))
    ActivityGradient(model)(x, y)
    for name, p in model.named_parameters():
        if name.startswith(("heads.", "out.")):
            torch.testing.assert_close(p.grad, reference[name])


def test_no_autograd_graph_is_built():
    # the estimator runs under no_grad: nothing it computes could be backpropagated
    for model in (small_mlp(), small_local(), convnet(0), small_local_conv()):
        x, y = batch(model)
        x.requires_grad_(True)
        loss = ActivityGradient(model)(x, y)
        assert loss.grad_fn is None and not loss.requires_grad
        assert all(p.grad.grad_fn is None for p in model.parameters())


@pytest.mark.parametrize("make", [small_mlp, lambda: convnet(0), lambda: seeded(LocalConvNet)],
                         ids=["mlp", "convnet", "local convnet"])
def test_no_backward_pass_runs(make):
    # a hook on autograd's engine would see any backward pass; the estimator triggers none
    model = make()
    x, y = batch(model, 2)
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


class Recording(ActivityGradient):
    """An ActivityGradient that keeps a copy of the tangents it draws."""

    def tangents_like(self, outputs):
        tangents = super().tangents_like(outputs)
        self.drawn = [u.clone() for u in tangents]
        return tangents


class AlongOne(ActivityGradient):
    """An ActivityGradient whose tangent is one basis vector e_i of one layer's output,
    zero on every other layer: a deterministic term of the expectation."""
    layer, index = 0, 0

    def tangents_like(self, outputs):
        tangents = [torch.zeros_like(z) for z in outputs]
        tangents[self.layer].view(-1)[self.index] = 1
        return tangents


@pytest.mark.parametrize("padding", [0, 1])
def test_the_tangent_pass_is_the_jvp_of_the_network_with_moved_activities(padding):
    # through Conv2d, ReLU, MaxPool2d, Flatten and Linear, by hand, equals torch.func's
    # forward mode applied to ConvNet with every Linear and Conv2d output moved along u
    model = convnet(padding)
    x, _ = batch(model, 3)
    zeros = [torch.zeros_like(z) for z in record(model, x)[2]]
    g = torch.Generator().manual_seed(2)
    tangents = [torch.randn(z.shape, generator=g, dtype=z.dtype) for z in zeros]
    logits, dlogits = activity_jvp(model, x, tangents)
    ref_logits, ref_dlogits = torch.func.jvp(lambda *moves: record(model, x, moves)[0], tuple(zeros), tuple(tangents))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(dlogits, ref_dlogits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("padding", [0, 1])
def test_given_its_tangents_the_estimate_is_backprop_with_dL_dz_replaced_by_d_times_u(padding):
    # ĝ_θ = what backprop forms from ∂L/∂z_lb := d_b u_lb at every perturbed layer, with
    # d_b = e_b·(∂logits_b along u) from torch.func's jvp; with E[uu^T] = I this is unbiased
    model = convnet(padding)
    x, y = batch(model, 3)
    estimate = Recording(model, generator=torch.Generator().manual_seed(2))
    estimate(x, y)
    us = estimate.drawn
    _, inputs, zeros = record(model, x)
    logits, dlogits = torch.func.jvp(lambda *moves: record(model, x, moves)[0],
                                     tuple(torch.zeros_like(z) for z in zeros), tuple(us))
    error = torch.autograd.grad(F.cross_entropy(logits, y), logits)[0]  # (softmax − one-hot)/B
    d = (error * dlogits).sum(1).detach()  # a number per example, not a function of θ
    surrogate = sum((layer(a.detach()) * (d.view(-1, *[1] * (u.dim() - 1)) * u)).sum()
                    for layer, a, u in zip(perturbed(model), inputs, us))
    expected = torch.autograd.grad(surrogate, list(model.parameters()))
    for (name, p), want in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("padding", [0, 1])
def test_with_tangents_on_one_layer_the_exact_expectation_is_the_gradient(padding):
    # ĝ is quadratic in u, so E[ĝ] = Σ_i ĝ(e_i) for any tangent with E[uu^T] = I: summed
    # over a basis of one layer's output (every example, channel and position), the
    # estimate of that layer's weight and bias is autograd's gradient
    model = small_convnet(padding)
    x, y = batch(model, 2)
    reference = dict(zip([n for n, _ in model.named_parameters()], reference_gradient(model, x, y)))
    sizes = [z.numel() for z in record(model, x)[2]]
    positions = [i for i, layer in enumerate(model) if isinstance(layer, (nn.Linear, nn.Conv2d))]
    estimate = AlongOne(model)
    for layer, (position, size) in enumerate(zip(positions, sizes)):
        weight, bias = model[position].weight, model[position].bias
        total_weight, total_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for index in range(size):
            estimate.layer, estimate.index = layer, index
            estimate(x, y)
            total_weight += weight.grad
            total_bias += bias.grad
        torch.testing.assert_close(total_weight, reference[f"{position}.weight"], rtol=0, atol=1e-10)
        torch.testing.assert_close(total_bias, reference[f"{position}.bias"], rtol=0, atol=1e-10)


class AlongBasis(ActivityGradient):
    """An ActivityGradient on B copies of one example whose tangent on copy b is the basis
    vector e_{start+b} of one layer's output (zero past its size and on every other layer):
    the estimate is the mean over the copies of the one-example estimates ĝ(e_i)."""
    layer, start = 0, 0

    def tangents_like(self, outputs):
        self.sizes = [z[0].numel() for z in outputs]
        tangents = [torch.zeros_like(z) for z in outputs]
        flat = tangents[self.layer].reshape(len(outputs[0]), -1)  # a copy when channels-last
        rows = torch.arange(max(0, min(len(flat), flat.shape[1] - self.start)))
        flat[rows, self.start + rows] = 1
        tangents[self.layer].copy_(flat.view(outputs[self.layer].shape))
        return tangents


class AlongSome(ActivityGradient):
    """An ActivityGradient whose tangent is a sum of basis vectors of one layer's output
    (``indices`` into it in C×H×W order, of the first example), zero on every other layer."""
    layer, indices = 0, ()

    def tangents_like(self, outputs):
        tangents = [torch.zeros_like(z) for z in outputs]
        for index in self.indices:
            tangents[self.layer][(0, *torch.unravel_index(torch.tensor(index), outputs[self.layer].shape[1:]))] = 1
        return tangents


@pytest.mark.parametrize("padding,patches", [(0, 2), (1, 3)], ids=["even patches", "uneven patches"])
def test_local_conv_estimate_over_a_basis_of_each_block_is_the_gradient_of_its_local_losses(padding, patches):
    # ĝ is quadratic in u, so E[ĝ] = Σ_i ĝ(e_i) for any tangent with E[uu^T] = I: summed over
    # a basis of one block's pre-activation z (every channel and position), the estimate of
    # that block's weight and bias is autograd's gradient of Σ local losses, exactly. The
    # basis vectors go 32 at a time, on 32 copies of the example (each copy adds 1/32 of
    # its one-example estimate, the loss being the batch mean).
    model = small_local_conv(padding, patches)
    x, y = batch(model, 1)
    reference = dict(zip([n for n, _ in model.named_parameters()], reference_gradient(model, x, y)))
    copies = 32
    estimate = AlongBasis(model)
    xs, ys = x.repeat(copies, 1, 1, 1), y.repeat(copies)
    estimate(xs, ys)
    for layer, size in enumerate(estimate.sizes):
        weight, bias = model.blocks[layer].weight, model.blocks[layer].bias
        total_weight, total_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for start in range(0, size, copies):
            estimate.layer, estimate.start = layer, start
            estimate(xs, ys)
            total_weight += copies * weight.grad
            total_bias += copies * bias.grad
        torch.testing.assert_close(total_weight, reference[f"blocks.{layer}.weight"], rtol=0, atol=1e-10)
        torch.testing.assert_close(total_bias, reference[f"blocks.{layer}.bias"], rtol=0, atol=1e-10)


def block_output(model: LocalConvNet, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``i``'s pre-activation z (a leaf, for autograd) and its output h = pool(relu(z))."""
    h = x
    for j in range(i):
        h = model.conv_block(j, h)
    z = model.blocks[i](normalize_maps(h)).detach().requires_grad_(True)
    h = F.relu(z)
    return z, F.max_pool2d(h, 2) if model.pools[i] else h


@pytest.mark.parametrize("block", [0, 1], ids=["relu", "relu and max-pool"])
def test_local_conv_estimate_is_zero_where_the_block_output_does_not_depend_on_z(block):
    # ĝ_z = J^T(ḣ·d), J = ∂h/∂z: u·d on the entries of z that the block's output is (ReLU on,
    # its pooling window's argmax) and 0 on the others, where ∂L/∂z is 0 too. A tangent on
    # such an entry, beside one on an entry the output is, changes nothing: no bias, less noise
    model = small_local_conv()
    x, y = batch(model, 1)
    z, h = block_output(model, x, block)
    reaches = torch.autograd.grad(h.sum(), z)[0][0] != 0  # C×H×W
    # an entry the output is, and the one right of it, in its group (channel) and patch (2×2
    # patches: rows and columns of z below the middle are patch 0), that the output is not
    C, H, W = reaches.shape
    c, i, j = next((c, i, j) for c, i, j in reaches.nonzero().tolist()
                   if i < H // 2 and j + 1 < W // 2 and not reaches[c, i, j + 1])
    on, off = (c * H + i) * W + j, (c * H + i) * W + j + 1
    estimate = AlongSome(model)
    estimate.layer = block
    estimate.indices = (on,)
    estimate(x, y)
    alone = model.blocks[block].weight.grad.clone()
    estimate.indices = (on, off)
    estimate(x, y)
    assert alone.abs().sum() > 0
    torch.testing.assert_close(model.blocks[block].weight.grad, alone, rtol=0, atol=0)


def test_local_conv_estimate_uses_each_loss_on_its_own_group_and_patch_only():
    # with the tangent on one entry i of z (group g, patch q), the estimate of the block's
    # weight is what backprop forms from ∂L/∂z = e_i·(∂L_gq/∂z_i), L_gq the one loss of that
    # group and patch without any stop-gradient: no other loss sees the entry
    model = small_local_conv()
    x, y = batch(model, 1)
    z, h = block_output(model, x, 0)
    estimate = AlongSome(model)
    reaches = (z[0] > 0).flatten()
    # z is 4×26×26: group g is channels 2g and 2g+1, patch q rows 13·(q//2)… and columns 13·(q%2)…
    for g, q in ((0, 0), (1, 3)):
        rows, columns = range(13 * (q // 2), 13 * (q // 2) + 13), range(13 * (q % 2), 13 * (q % 2) + 13)
        index = next(i for i in ((2 * g + 1) * 676 + r * 26 + c for r in rows for c in columns) if reaches[i])
        estimate.indices = (index,)
        estimate(x, y)
        logits = model.heads[0](patch_means(normalize_maps(h), 2)[:, q])[:, 10 * g:10 * g + 10]
        dz = torch.autograd.grad(F.cross_entropy(logits, y), z, retain_graph=True)[0]
        only = torch.zeros_like(dz).flatten()
        only[index] = dz.flatten()[index]
        want = torch.nn.grad.conv2d_weight(normalize_maps(x), model.blocks[0].weight.shape, only.view_as(dz))
        assert want.abs().sum() > 0
        torch.testing.assert_close(model.blocks[0].weight.grad, want, rtol=1e-10, atol=1e-12)


def closed_form_variance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sampler: str) -> float:
    """E‖ĝ − ∇L‖² for one example: ‖∇_z L‖² Σ_l C_l ‖A'_l‖² + ‖∇_θ L‖² with Gaussian
    tangents, less 2 Σ_{l,c,p} (∂L/∂z_lcp)² ‖A'_lp‖² with Rademacher ones, where A'_lp is
    the input patch under output position p with a 1 appended (fgtutor.activity)."""
    logits, inputs, outputs = record(model, x)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), outputs + list(model.parameters()))
    dz, dtheta = grads[:len(outputs)], grads[len(outputs):]
    norm_dz = sum(g.pow(2).sum() for g in dz)
    variance = sum(g.pow(2).sum() for g in dtheta)
    for layer, a, g in zip(perturbed(model), inputs, dz):
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # 1 × k × P
            patch_norms = patches.pow(2).sum(1).flatten() + 1
        else:
            patch_norms = a.pow(2).sum(1) + 1
        g = g.reshape(g.shape[1], -1)  # C × P
        variance = variance + norm_dz * g.shape[0] * patch_norms.sum()
        if sampler == "rademacher":
            variance = variance - 2 * (g.pow(2) * patch_norms).sum()
    return variance.item()


# --- max-pooling: ties that rounding cannot break differently -------------------------------

@pytest.mark.parametrize("args", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True),
                                  dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), ceil_mode=True)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_tied_max_pool2d_is_max_pool2d_where_nothing_ties(args, layout):
    h = torch.randn(3, 4, 12, 13, generator=torch.Generator().manual_seed(0), dtype=torch.double)
    h = h.contiguous(memory_format=layout)
    out, indices = tied_max_pool2d(h, **args)
    expected, expected_indices = F.max_pool2d(h, **args, return_indices=True)
    assert torch.equal(out, expected) and torch.equal(indices, expected_indices)


@pytest.mark.parametrize("args", [dict(kernel_size=2), dict(kernel_size=2, ceil_mode=True)])  # fast and general way
def test_tied_max_pool2d_takes_the_first_entry_of_a_window_equal_to_its_maximum_up_to_rounding(args):
    h = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.double)
    h[..., :4, :4] = 0.5  # a constant region, as MNIST's background makes one
    h[..., :4, :4] += 1e-16 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.double)
    out, indices = tied_max_pool2d(h, **args)
    assert torch.equal(out, F.max_pool2d(h, 2))
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
    assert torch.equal(indices[..., :2, :2], (rows * 2 * 8 + cols * 2).expand(2, 3, 2, 2))  # each window's corner
    assert torch.equal(indices[..., 2:, 2:], F.max_pool2d(h, 2, return_indices=True)[1][..., 2:, 2:])


def test_the_convnet_estimate_does_not_change_with_rounding_in_constant_regions():
    # a ConvNet on images with a constant background, and the same ConvNet with its weights
    # moved by rounding (what another CPU's kernels do): the same tangents must give the
    # same estimate to rounding, not a different argmax in every tied pooling window
    g = torch.Generator().manual_seed(0)
    x = torch.full((8, 1, 28, 28), -0.42, dtype=torch.double)
    x[:, :, 8:20, 10:18] += torch.rand(8, 1, 12, 8, generator=g, dtype=torch.double) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    model = convnet(0).double()
    moved = convnet(0).double()
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1 + 1e-15 * torch.randn(p.shape, generator=g, dtype=torch.double))
    grads = []
    for m in (model, moved):
        ActivityGradient(m, sampler="gaussian", generator=torch.Generator().manual_seed(2))(x, y)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert (grads[0] - grads[1]).norm() <= 1e-9 * grads[0].norm()


@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
@pytest.mark.parametrize("padding", [0, 1])
def test_variance_with_convolutions_is_the_closed_form(padding, sampler):
    # one example: E‖ĝ − ∇L‖² = ‖∇_z L‖² Σ_l C_l ‖A'_l‖² + ‖∇_θ L‖² (fgtutor.activity), each
    # layer adding its C output channels times the squared norms of its input patches, one
    # per output position: it grows with the size C·H·W of the output, not with the weights
    model = small_convnet(padding)
    x, y = batch(model, 1)
    g = torch.cat([t.flatten() for t in reference_gradient(model, x, y)])
    samples = torch.cat([s.flatten(1) for s in estimates(model, x, y, 6000, sampler)], 1)
    assert total_variance(samples, g) == pytest.approx(closed_form_variance(model, x, y, sampler), rel=0.05)


def test_fit_trains_with_activity_perturbation_through_any_optimizer():
    torch.manual_seed(0)
    X, Y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    for model in (MLP(hidden=32), make_model("local_mlp", hidden=32, groups=4),
                  make_model("local_convnet", channels=8, hidden=32, groups=4, fc_groups=4)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        history = fit(model, "forward", optimizer, (X, Y), {"train": (X, Y)}, epochs=3, progress=False,
                      perturb="activities")
        assert history.meta["perturb"] == "activities"
        assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]


def test_train_model_trains_a_convnet_with_activity_perturbation():
    # 32 Adam steps on 256 MNIST images: the training loss goes down (with the estimate's
    # sign flipped it goes up). FG-A is noisy on a ConvNet, its first convolutions most,
    # so the decrease is small, but the seed fixes it.
    X, Y = load_mnist()
    X, Y = X[:256], Y[:256]
    _, history = train_model(ConvNet, "forward", (X, Y), {"train": (X, Y)}, optimizer="adam", lr=1e-4, epochs=2,
                             batch_size=16, perturb="activities", progress=False)
    losses = [row["train_loss"] for row in history.epochs]
    assert history.meta["perturb"] == "activities" and len(history.step_loss) == 32
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_a_local_convnet_run_is_a_valid_stored_configuration():
    config = run_config(model="local_convnet", method="forward", perturb="activities", sampler="gaussian",
                        optimizer="adam", lr=1e-4, model_kwargs={"groups": 8, "patches": 4})
    model = model_constructor(config)()
    assert isinstance(model, LocalConvNet) and (model.groups, model.patches) == (8, 4)
    assert supports(model)


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


def test_convnets_are_supported():
    assert supports(small_mlp()) and supports(small_local()) and supports(small_local_conv())
    assert supports(ConvNet(padding=0)) and supports(ConvNet(padding=1)) and supports(small_convnet(0))


@pytest.mark.parametrize("model,layer", [
    (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "Tanh"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)), "BatchNorm2d"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(8, 2)), "reflect"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(8, 2)), "padding=same"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "last layer"),
], ids=["tanh", "batchnorm", "reflect padding", "same padding", "no logits"])
def test_unsupported_models_are_refused_naming_the_layer_and_the_alternative(model, layer):
    assert not supports(model)
    with pytest.raises(ValueError, match=f"{layer}.*perturb='weights'"):
        ActivityGradient(model)


def test_wrong_input_shapes_are_named():
    with pytest.raises(ValueError, match="cannot take x of shape"):
        ActivityGradient(small_mlp())(torch.randn(4, 7, dtype=torch.double), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cannot take x of shape \(4, 1, 20, 20\)"):
        ActivityGradient(convnet(0))(torch.randn(4, 1, 20, 20, dtype=torch.double), torch.zeros(4, dtype=torch.long))
    model = small_convnet(0)
    with pytest.raises(ValueError, match="do not match the outputs"):
        activity_jvp(model, batch(model)[0], [torch.zeros(5, 3, 10, 10, dtype=torch.double)])
    with pytest.raises(ValueError, match=r"cannot take x of shape \(4, 1, 20, 20\)"):
        ActivityGradient(small_local_conv())(torch.randn(4, 1, 20, 20, dtype=torch.double),
                                             torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="LocalConvNet has local losses"):
        activity_jvp(small_local_conv(), torch.randn(2, 1, 28, 28, dtype=torch.double), [])


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
