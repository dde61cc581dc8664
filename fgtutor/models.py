"""The networks of the original study, as ``nn.Sequential`` stacks of standard layers.

Sequential stacks keep the models readable and let the forward-mode fast path
(``fgtutor.forward``) walk them layer by layer. Each is a subclass only so that it
carries its name (``type(model).__name__``) into printed models and run histories.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import check_choice, check_positive, check_type


class LogisticRegression(nn.Sequential):
    """Multinomial logistic regression on flattened 28×28 images: 784 → 10 (7,850 parameters)."""

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(784, 10))


class MLP(nn.Sequential):
    """The original ``Net``: 784 → 1024 → ReLU → 1024 → ReLU → 10 (1,863,690 parameters)."""

    def __init__(self, hidden: int = 1024, init: str = "pytorch") -> None:
        check_positive("hidden", hidden, integer=True)  # True is an int too, but no width
        super().__init__(
            nn.Flatten(),
            nn.Linear(784, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        init_(self, init)


#: the initialisations ``init_`` knows
INITS = ("pytorch", "kaiming")


def init_(model: nn.Module, scheme: str = "pytorch") -> nn.Module:
    r"""Initialise every linear and convolutional layer of ``model`` in place; returns it.

    - ``"pytorch"`` keeps PyTorch's default: weight and bias entries uniform on
      :math:`\pm 1/\sqrt{n_\text{in}}`, a weight standard deviation of :math:`1/\sqrt{3 n_\text{in}}`.
    - ``"kaiming"`` is He et al.'s initialisation for ReLU networks: weights
      :math:`\mathcal N(0, 2/n_\text{in})` and zero biases, :math:`\sqrt 6 \approx 2.45` times
      the default's scale, so that activations keep their size through the ReLUs.

    The new weights come from the global generator, which ``train_model`` seeds.
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_choice("init", scheme, INITS)
    if scheme == "kaiming":
        for layer in model.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return model


Net = MLP  # the original repository's name


class ConvNet(nn.Sequential):
    """The original (and Baydin et al.'s) ConvNet: four 3×3 convolutions with 64 channels,
    two 2×2 max-pools, then 1024 → 1024 → 10.

    With ``padding=0`` (the original) the flatten is 64·4·4 = 1024 wide and the model has
    1,171,274 parameters; ``padding=1`` (other reproductions) flattens 64·7·7 = 3136.

    The convolution weights are stored channels-last (NHWC), the layout in which CPU
    (oneDNN) convolutions and max-pooling run fastest; both training methods use the same
    model, so the comparison stays fair. ``.to(memory_format=torch.contiguous_format)``
    turns it back.
    """

    def __init__(self, padding: int = 0) -> None:
        if padding not in (0, 1):
            raise ValueError(f"padding={padding!r} is not allowed: use 0 (the original) or 1.")
        side = 4 if padding == 0 else 7
        super().__init__(
            nn.Conv2d(1, 64, 3, padding=padding), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=padding), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=padding), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=padding), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, 1024), nn.ReLU(),
            nn.Linear(1024, 10),
        )
        self.to(memory_format=torch.channels_last)


def normalize(h: Tensor) -> Tensor:
    """Layer normalization without learned scale or shift: each row to mean 0, variance 1."""
    return F.layer_norm(h, h.shape[-1:])


def _group_losses(h: Tensor, head: nn.Linear, groups: int, classes: int, y: Tensor) -> Tensor:
    r""":math:`\sum_g \mathrm{CE}(H_g\,\mathrm{norm}(\bar h_g) + c_g, y)` for a batch of vectors
    ``h``: group :math:`g`'s loss sees every unit, those outside group :math:`g` detached."""
    width, loss = h.shape[1] // groups, h.new_zeros(())
    for g in range(groups):
        units = slice(g * width, (g + 1) * width)
        h_g = torch.cat([h[:, :units.start].detach(), h[:, units], h[:, units.stop:].detach()], 1)
        logits = head(normalize(h_g))[:, g * classes:(g + 1) * classes]
        loss = loss + F.cross_entropy(logits, y)
    return loss


class LocalMLP(nn.Module):
    r"""The MLP with a local loss per group of units (Ren et al. 2023): the model that
    local-loss forward gradients (``fgtutor.activity``) train.

    Two blocks ``h_l = relu(W_l·norm(h_{l-1}) + b_l)`` (784 → 1024 → 1024) and an output
    layer ``out(norm(h_2))`` → 10, where ``norm`` is layer normalization without learned
    parameters (``normalize``). Each block's units fall into ``groups`` groups; group
    :math:`g` of block :math:`l` has its own linear head on the normalized block output,
    ``heads[l]`` outputs :math:`10g … 10g+9`, and its own cross-entropy

    .. math:: L_{l,g} = \mathrm{CE}\big(H_{l,g}\,\mathrm{norm}(\bar h_{l,g}) + c_{l,g},\ y\big),

    where :math:`\bar h_{l,g}` is :math:`h_l` with every unit outside group :math:`g`
    detached (a stop-gradient: the value is unchanged, only group :math:`g` is trained by
    this loss). Each block's input is detached too, so no gradient flows between blocks.
    ``local_losses`` returns :math:`\sum_g L_{l,g}` for every block and the output loss;
    ``forward`` returns the output layer's logits (the heads only train, they never
    predict). Backprop of ``model(x)`` trains it as a plain MLP (the heads get no gradient).
    """

    def __init__(self, hidden: int = 1024, groups: int = 64, classes: int = 10) -> None:
        super().__init__()
        for name, value in (("hidden", hidden), ("groups", groups), ("classes", classes)):
            check_positive(name, value, integer=True)
        if hidden % groups:
            raise ValueError(f"groups={groups} does not divide hidden={hidden}: use a divisor, e.g. 64 for 1024.")
        self.groups, self.classes = groups, classes
        self.blocks = nn.ModuleList([nn.Linear(784, hidden), nn.Linear(hidden, hidden)])
        self.heads = nn.ModuleList([nn.Linear(hidden, groups * classes) for _ in self.blocks])
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for block in self.blocks:
            h = F.relu(block(normalize(h)))
        return self.out(normalize(h))

    def local_losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """``[Σ_g L_1g, Σ_g L_2g, L_out]`` with the stop-gradients of the definition, for
        autograd: the reference that the forward-mode estimator must match on average."""
        losses, h = [], x.flatten(1)
        for block, head in zip(self.blocks, self.heads):
            h = F.relu(block(normalize(h.detach())))
            losses.append(_group_losses(h, head, self.groups, self.classes, y))
        losses.append(F.cross_entropy(self.out(normalize(h.detach())), y))
        return losses


def normalize_maps(h: Tensor) -> Tensor:
    """``normalize`` for feature maps: each example's C×H×W entries to mean 0, variance 1.
    Normalized as H×W×C, which is a view of a channels-last ``h``, so that it stays
    channels-last and takes one pass (the entries, and so the result, are the same)."""
    return F.layer_norm(h.permute(0, 2, 3, 1), (*h.shape[2:], h.shape[1])).permute(0, 3, 1, 2)


def patch_ids(side: int, patches: int) -> Tensor:
    """The patch (0 … ``patches``−1) of each of ``side`` rows: ``patches`` runs of
    consecutive rows, the first ``side % patches`` one row longer (``numpy.array_split``)."""
    sizes = [side // patches + (i < side % patches) for i in range(patches)]
    return torch.repeat_interleave(torch.arange(patches), torch.tensor(sizes))


@functools.lru_cache(maxsize=None)
def patch_index(height: int, width: int, patches: int) -> Tensor:
    """The patch ``q = row·patches + column`` of each position of a height×width map, as
    one row after the other (``patch_ids`` of its row and of its column). Cached: do not
    modify it."""
    return (patch_ids(height, patches)[:, None] * patches + patch_ids(width, patches)).flatten()


@functools.lru_cache(maxsize=None)
def _patch_averages(side: int, patches: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``patches``×``side`` matrix that averages each run of ``patch_ids`` (cached)."""
    average = F.one_hot(patch_ids(side, patches), patches).t().to(device, dtype)
    return average / average.sum(1, keepdim=True)


def patch_means(h: Tensor, patches: int) -> Tensor:
    """Each channel's mean over each of the ``patches``×``patches`` spatial patches of
    ``h`` (B×C×H×W): a B×Q×C tensor, Q = patches², patch ``q = row·patches + column``.
    Columns first, then rows: two small products, read from channels-last ``h`` in place."""
    B, C, H, W = h.shape
    rows, columns = (_patch_averages(side, patches, h.dtype, h.device) for side in (H, W))
    across = columns @ h.permute(0, 2, 3, 1)  # B×H×P×C: each row averaged over each patch's columns
    return (rows @ across.reshape(B, H, patches * C)).view(B, patches * patches, C)


class LocalConvNet(nn.Module):
    r"""The ConvNet with local losses (Ren et al. 2023): the model that local-loss forward
    gradients on convolutions (``fgtutor.activity``) train.

    Five blocks, ConvNet's layers: four 3×3 convolutions with 64 ``channels`` and ReLU
    (the second and fourth followed by a 2×2 max-pool) and a 1024 → 1024 (``hidden``)
    ReLU layer, then an output layer → 10. Every block's input is the previous block's
    output detached and normalized (``normalize_maps``: over C, H and W per example, no
    learned parameters), so no gradient flows between blocks. A convolutional block's
    output :math:`h_l` (C×H×W, after the ReLU and pool) falls into ``groups`` groups of
    C/``groups`` channels and a grid of ``patches``×``patches`` spatial patches (uneven
    ones where the side does not divide, ``patch_ids``); group :math:`g` and patch
    :math:`q` have their own cross-entropy

    .. math:: L_{l,g,q} = \mathrm{CE}\big(H_{l,g}\,\mathrm{mean}_q\,\mathrm{norm}(\bar h_{l,g,q})
              + c_{l,g},\ y\big),

    where :math:`\bar h_{l,g,q}` is :math:`h_l` with every entry outside group :math:`g`
    and patch :math:`q` detached and :math:`\mathrm{mean}_q` averages each channel over
    patch :math:`q`: a C-vector, which group :math:`g`'s head (10×C, shared by the
    patches; ``heads[l]`` outputs :math:`10g … 10g+9`) maps to logits. The fully connected
    block has ``LocalMLP``'s losses with ``fc_groups`` groups of units. ``local_losses``
    returns :math:`\sum_{g,q} L_{l,g,q}` for every block and the output loss;
    ``forward`` returns the output layer's logits (the heads only train, they never
    predict; backprop of ``model(x)`` trains it as a plain ConvNet).

    With ``padding=0`` it has ConvNet's 1,171,274 weights, and the default heads add
    697,600 (656,000 of them the fully connected block's). With the defaults, 16 groups
    of 4 channels, 2×2 patches and 64 groups of 16 units, an LG-FG-A step took about
    1.4× a backprop step of the ConvNet (batch 64, one CPU thread); 4×4 patches doubled
    the cosine of the convolutions' estimates with the gradient but trained about as
    well in 1,500 Adam steps, at a dearer step (a more local objective, with a higher
    validation loss). Channels-last, like ConvNet.
    """

    def __init__(self, padding: int = 0, groups: int = 16, patches: int = 2, fc_groups: int = 64,
                 channels: int = 64, hidden: int = 1024, classes: int = 10) -> None:
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"padding={padding!r} is not allowed: use 0 (the original) or 1.")
        for name, value in (("groups", groups), ("patches", patches), ("fc_groups", fc_groups),
                            ("channels", channels), ("hidden", hidden), ("classes", classes)):
            check_positive(name, value, integer=True)
        side = 4 if padding == 0 else 7  # the last convolutional block's output
        if patches > side:
            raise ValueError(f"patches={patches} is not allowed with padding={padding}: the last convolutional "
                             f"block's output is {side}×{side}, so use 1 to {side}.")
        if channels % groups:
            divisors = ", ".join(str(d) for d in range(1, channels + 1) if channels % d == 0)
            raise ValueError(f"groups={groups} does not divide channels={channels}: use one of {divisors}.")
        if hidden % fc_groups:
            raise ValueError(f"fc_groups={fc_groups} does not divide hidden={hidden}: use a divisor, e.g. 16 for 1024.")
        self.groups, self.patches, self.fc_groups, self.classes = groups, patches, fc_groups, classes
        convs = [nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=padding) for i in range(4)]
        self.blocks = nn.ModuleList([*convs, nn.Linear(channels * side * side, hidden)])
        self.pools = (False, True, False, True)  # which convolutional blocks end in a 2×2 max-pool
        self.heads = nn.ModuleList([nn.Linear(channels, groups * classes) for _ in self.pools]
                                   + [nn.Linear(hidden, fc_groups * classes)])
        self.out = nn.Linear(hidden, classes)
        self.to(memory_format=torch.channels_last)

    def conv_block(self, i: int, h: Tensor) -> Tensor:
        """Convolutional block ``i`` on the previous block's output (or the images)."""
        h = F.relu(self.blocks[i](normalize_maps(h)))
        return F.max_pool2d(h, 2) if self.pools[i] else h

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(len(self.pools)):
            h = self.conv_block(i, h)
        h = F.relu(self.blocks[-1](normalize_maps(h).flatten(1)))
        return self.out(normalize(h))

    def _patch_losses(self, h: Tensor, head: nn.Linear, y: Tensor) -> Tensor:
        r""":math:`\sum_{g,q} L_{l,g,q}` of one convolutional block's output ``h``."""
        P, k, K = self.patches, h.shape[1] // self.groups, self.classes
        rows, columns = patch_ids(h.shape[2], P).to(h.device), patch_ids(h.shape[3], P).to(h.device)
        loss = h.new_zeros(())
        for g in range(self.groups):
            for q in range(P * P):
                own = torch.zeros(h.shape[1:], dtype=torch.bool, device=h.device)
                own[g * k:(g + 1) * k] = ((rows == q // P)[:, None] & (columns == q % P))
                h_gq = torch.where(own, h, h.detach())  # the value of h, the gradient of (g, q) only
                logits = head(patch_means(normalize_maps(h_gq), P)[:, q])[:, g * K:(g + 1) * K]
                loss = loss + F.cross_entropy(logits, y)
        return loss

    def local_losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """``[Σ_gq L_1gq, …, Σ_gq L_4gq, Σ_g L_5g, L_out]`` with the stop-gradients of the
        definition, for autograd: the reference that the forward-mode estimator must match
        on average."""
        losses, h = [], x
        for i in range(len(self.pools)):
            h = self.conv_block(i, h.detach())
            losses.append(self._patch_losses(h, self.heads[i], y))
        h = F.relu(self.blocks[-1](normalize_maps(h.detach()).flatten(1)))
        losses.append(_group_losses(h, self.heads[-1], self.fc_groups, self.classes, y))
        losses.append(F.cross_entropy(self.out(normalize(h.detach())), y))
        return losses


MODELS = {"logreg": LogisticRegression, "mlp": MLP, "convnet": ConvNet, "local_mlp": LocalMLP,
          "local_convnet": LocalConvNet}


def make_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: ``"logreg"``, ``"mlp"``, ``"convnet"``, ``"local_mlp"`` or ``"local_convnet"``."""
    check_choice("model", name, tuple(MODELS))
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} does not take {', '.join(map(repr, kwargs))}: {exc}") from exc


def train_only_last_layer(model: nn.Module) -> nn.Module:
    """Freeze every weight but those of the model's last ``nn.Linear`` (``requires_grad``
    off), as fine-tuning only the head does; returns the model."""
    check_type("model", model, nn.Module, "a torch.nn.Module, e.g. fgtutor.models.MLP()")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to train on its own.")
    model.requires_grad_(False)
    linears[-1].requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
