"""Builders of the gated MLP of the paper and of its dense baselines."""

import math

import keras

from keras_condcomp.layers.gated_dense import GatedDense
from keras_condcomp.models.policy_gradient_model import PolicyGradientModel

__all__ = ["build_dense_mlp", "build_gated_mlp", "equal_macs_width"]


def build_gated_mlp(
    input_dim, num_classes, units=1024, blocks=16, layers=2, activation="relu", **gate_kwargs
):
    """`input -> layers x GatedDense(units, blocks) -> Dense(num_classes)` logits.

    Args:
        input_dim: features per example.
        num_classes: output logits.
        units: units of every gated layer.
        blocks: blocks of every gated layer.
        activation: activation of every gated layer.
        layers: number of gated layers.
        **gate_kwargs: passed to every `GatedDense` (target_density, ...).

    Returns:
        an uncompiled `PolicyGradientModel`.

    Examples:
        >>> model = build_gated_mlp(64, 10, units=32, blocks=4, layers=1)
        >>> print(" -> ".join(type(layer).__name__ for layer in model.layers))
        InputLayer -> GatedDense -> Dense
    """
    seed = gate_kwargs.pop("seed", None)
    inputs = keras.Input((input_dim,), name="inputs")
    hidden = inputs
    for index in range(layers):
        hidden = GatedDense(
            units,
            blocks,
            activation=activation,
            seed=None if seed is None else seed + index,
            name=f"gated_{index + 1}",
            **gate_kwargs,
        )(hidden)
    outputs = keras.layers.Dense(int(num_classes), name="logits")(hidden)
    return PolicyGradientModel(inputs, outputs, name="gated_mlp")


def build_dense_mlp(input_dim, num_classes, units=1024, layers=2, activation="relu"):
    """The same-shaped plain Keras MLP: `layers x Dense(units)` then logits."""
    inputs = keras.Input((input_dim,), name="inputs")
    hidden = inputs
    for index in range(layers):
        hidden = keras.layers.Dense(units, activation=activation, name=f"dense_{index + 1}")(
            hidden
        )
    outputs = keras.layers.Dense(int(num_classes), name="logits")(hidden)
    return keras.Model(inputs, outputs, name=f"dense_mlp_{units}")


def equal_macs_width(input_dim, num_classes, layers, macs):
    """Width of a dense MLP with `layers` hidden layers and about `macs` MACs.

    Solves `input_dim w + (layers - 1) w^2 + w num_classes = macs` for `w`.
    """
    linear = input_dim + num_classes
    if layers == 1:
        width = macs / linear
    else:
        quadratic = layers - 1
        width = (-linear + math.sqrt(linear**2 + 4 * quadratic * macs)) / (2 * quadratic)
    return max(1, int(round(width)))
