"""The networks of the original study, as ``nn.Sequential`` stacks of standard layers.

Sequential stacks keep the models readable and let the forward-mode fast path
(``fgtutor.forward``) walk them layer by layer. Each is a subclass only so that it
carries its name (``type(model).__name__``) into printed models and run histories.
"""
from __future__ import annotations

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
            width = h.shape[1] // self.groups
            loss = h.new_zeros(())
            for g in range(self.groups):
                units = slice(g * width, (g + 1) * width)
                h_g = torch.cat([h[:, :units.start].detach(), h[:, units], h[:, units.stop:].detach()], 1)
                logits = head(normalize(h_g))[:, g * self.classes:(g + 1) * self.classes]
                loss = loss + F.cross_entropy(logits, y)
            losses.append(loss)
        losses.append(F.cross_entropy(self.out(normalize(h.detach())), y))
        return losses


MODELS = {"logreg": LogisticRegression, "mlp": MLP, "convnet": ConvNet, "local_mlp": LocalMLP}


def make_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: ``"logreg"``, ``"mlp"``, ``"convnet"`` or ``"local_mlp"``."""
    check_choice("model", name, tuple(MODELS))
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} does not take {', '.join(map(repr, kwargs))}: {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
