"""Networks: tensors in, tensors out. Nothing here knows about Pyro."""

from typing import Sequence

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
