"""The networks of the original study, as ``nn.Sequential`` stacks of standard layers.

Sequential stacks keep the models readable and let the forward-mode fast path
(``fgtutor.forward``) walk them layer by layer. Each is a subclass only so that it
carries its name (``type(model).__name__``) into printed models and run histories.
"""
from __future__ import annotations

import torch
from torch import nn

from .utils import check_choice


class LogisticRegression(nn.Sequential):
    """Multinomial logistic regression on flattened 28×28 images: 784 → 10 (7,850 parameters)."""

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(784, 10))


class MLP(nn.Sequential):
    """The original ``Net``: 784 → 1024 → ReLU → 1024 → ReLU → 10 (1,863,690 parameters)."""

    def __init__(self, hidden: int = 1024) -> None:
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden={hidden!r} is not allowed: use a positive integer.")
        super().__init__(
            nn.Flatten(),
            nn.Linear(784, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )


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


MODELS = {"logreg": LogisticRegression, "mlp": MLP, "convnet": ConvNet}


def make_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: ``"logreg"``, ``"mlp"`` or ``"convnet"``."""
    check_choice("model", name, tuple(MODELS))
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} does not take {', '.join(map(repr, kwargs))}: {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
