"""Builders of the gated MLP of the paper and of its dense baselines."""

import math

import keras

from keras_condcomp._arguments import check_positive_int, is_number
from keras_condcomp.layers.gated_dense import GatedDense
from keras_condcomp.models._builders import check_builder_keywords, check_num_classes
from keras_condcomp.models.policy_gradient_model import PolicyGradientModel

__all__ = ["build_dense_mlp", "build_gated_mlp", "equal_macs_width"]

# Set by the builder for every gated layer: not accepted in **gate_kwargs.
BUILDER_ARGUMENTS = ("units", "blocks", "activation", "name")


def _check_shape(input_dim, num_classes, units, layers):
    """The checked `(input_dim, num_classes, units, layers)` as ints."""
    return (
        check_positive_int("input_dim", input_dim),
        check_num_classes(num_classes),
        check_positive_int("units", units),
        check_positive_int("layers", layers),
    )


def build_gated_mlp(
    input_dim, num_classes, units=1024, blocks=16, layers=2, activation="relu", **gate_kwargs
):
    """`input -> layers x GatedDense(units, blocks=blocks) -> Dense(num_classes)` logits.

    Args:
        input_dim: features per example.
        num_classes: output logits.
        units: units of every gated layer.
        blocks: blocks of every gated layer.
        layers: number of gated layers (at least 1).
        activation: activation of every gated layer.
        **gate_kwargs: passed to every `GatedDense` (target_density, ...; a
            `seed` s gives the layers seeds s, s + 1, ...). The builder sets
            `units`, `blocks`, `activation` and `name` itself.

    Returns:
        an uncompiled `PolicyGradientModel`.

    Examples:
        >>> model = build_gated_mlp(64, 10, units=32, blocks=4, layers=1)
        >>> print(" -> ".join(type(layer).__name__ for layer in model.layers))
        InputLayer -> GatedDense -> Dense
    """
    input_dim, num_classes, units, layers = _check_shape(input_dim, num_classes, units, layers)
    check_builder_keywords(gate_kwargs, BUILDER_ARGUMENTS, "gated layer")
    seed = gate_kwargs.pop("seed", None)
    inputs = keras.Input((input_dim,), name="inputs")
    hidden = inputs
    for index in range(layers):
        hidden = GatedDense(
            units,
            blocks=blocks,
            activation=activation,
            seed=None if seed is None else seed + index,
            name=f"gated_{index + 1}",
            **gate_kwargs,
        )(hidden)
    outputs = keras.layers.Dense(num_classes, name="logits")(hidden)
    return PolicyGradientModel(inputs, outputs, name="gated_mlp")


def build_dense_mlp(input_dim, num_classes, units=1024, layers=2, activation="relu"):
    """The same-shaped plain Keras MLP: `layers x Dense(units)` then logits.

    Args:
        input_dim: features per example.
        num_classes: output logits.
        units: units of every hidden layer.
        layers: number of hidden layers (at least 1).
        activation: activation of every hidden layer.

    Returns:
        a `keras.Model` named `dense_mlp_<units>`.

    Examples:
        >>> build_dense_mlp(64, 10, units=32, layers=1).count_params()  # 64*32+32 + 32*10+10
        2410
    """
    input_dim, num_classes, units, layers = _check_shape(input_dim, num_classes, units, layers)
    inputs = keras.Input((input_dim,), name="inputs")
    hidden = inputs
    for index in range(layers):
        hidden = keras.layers.Dense(units, activation=activation, name=f"dense_{index + 1}")(
            hidden
        )
    outputs = keras.layers.Dense(num_classes, name="logits")(hidden)
    return keras.Model(inputs, outputs, name=f"dense_mlp_{units}")


def equal_macs_width(input_dim, num_classes, layers, macs):
    """Width of a dense MLP with `layers` hidden layers and about `macs` MACs.

    Solves `input_dim w + (layers - 1) w^2 + w num_classes = macs` for `w`.

    Args:
        input_dim: features per example.
        num_classes: output logits.
        layers: number of hidden layers (at least 1).
        macs: the multiply-adds per example to match (a positive number).

    Returns:
        the width, an int of at least 1.

    Examples:
        >>> equal_macs_width(64, 10, 1, 740)  # 64 w + 10 w = 740
        10
    """
    input_dim, num_classes, _, layers = _check_shape(input_dim, num_classes, 1, layers)
    if not is_number(macs) or macs <= 0:
        raise ValueError(f"`macs` must be a finite positive number. Received: macs={macs!r}")
    linear = input_dim + num_classes
    if layers == 1:
        width = macs / linear
    else:
        quadratic = layers - 1
        width = (-linear + math.sqrt(linear**2 + 4 * quadratic * macs)) / (2 * quadratic)
    return max(1, int(round(width)))
