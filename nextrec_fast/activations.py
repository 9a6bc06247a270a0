"""nextrec 0.3.1's activation names (``nextrec.basic.activation.activation_layer``)."""
from __future__ import annotations

import torch.nn as nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "hardswish": nn.Hardswish,
    "mish": nn.Mish,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "hardsigmoid": nn.Hardsigmoid,
    "tanhshrink": nn.Tanhshrink,
    "softshrink": nn.Softshrink,
    "none": nn.Identity,
    "linear": nn.Identity,
    "identity": nn.Identity,
}

ACTIVATION_NAMES = tuple(_ACTIVATIONS)


def activation_layer(activation: str) -> nn.Module:
    """The module nextrec builds for ``activation`` (Dice is not an MLP activation there either)."""
    key = activation.lower()
    if key == "dice":
        raise ValueError("Dice needs emb_size and is not used by nextrec's MLP; it is not supported here")
    try:
        return _ACTIVATIONS[key]()
    except KeyError:
        raise ValueError(
            f"Unsupported activation function: {activation!r}; expected one of {', '.join(ACTIVATION_NAMES)}"
        ) from None


_DEFAULT_REPR = {cls: cls().extra_repr() for cls in set(_ACTIVATIONS.values()) if cls is not nn.PReLU}


def activation_name(module: nn.Module) -> str | None:
    """The nextrec name of an activation module built with default arguments, else None."""
    for name, cls in _ACTIVATIONS.items():
        if type(module) is cls:
            if cls is nn.PReLU or module.extra_repr() == _DEFAULT_REPR[cls]:
                return name
            return None
    return None
