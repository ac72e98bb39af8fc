"""Networks: tensors in, tensors out. Nothing here knows about Pyro."""

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """An activation layer by name (a key of ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


class MLP(nn.Sequential):
    """Linear layers with an activation between them and none after the last.

    ``MLP(784, (400,), 100)`` is 784 -> 400 -> act -> 100. With ``hidden=()`` it is one
    linear map. Leading batch dimensions pass through, so vectorized particles work.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int,
                 act: str = "relu"):
        sizes = [in_features, *hidden, out_features]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers.append(activation(act))
            layers.append(nn.Linear(a, b))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features


class GatedDense(nn.Module):
    """h = W x + b, gated elementwise by sigmoid(V x + c) (Dauphin et al. 2017).

    The hidden layer of the VampPrior paper's networks (Tomczak & Welling 2018), with its
    He initialization N(0, 2 / in_features).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)
        for layer in (self.h, self.g):
            nn.init.normal_(layer.weight, 0.0, (2.0 / in_features) ** 0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedMLP(nn.Sequential):
    """GatedDense hidden layers, then a linear output layer (He-initialized)."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        sizes = [in_features, *hidden]
        layers = [GatedDense(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        out = nn.Linear(sizes[-1], out_features)
        nn.init.normal_(out.weight, 0.0, (2.0 / sizes[-1]) ** 0.5)
        nn.init.zeros_(out.bias)
        super().__init__(*layers, out)
        self.in_features = in_features
        self.out_features = out_features


ARCHS = ("mlp", "gated")


def network(arch: str, in_features: int, hidden: Sequence[int], out_features: int,
            act: str = "relu") -> nn.Module:
    """``MLP`` (``arch="mlp"``, with activation ``act``) or ``GatedMLP`` (``"gated"``)."""
    if arch == "mlp":
        return MLP(in_features, hidden, out_features, act)
    if arch == "gated":
        return GatedMLP(in_features, hidden, out_features)
    raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
