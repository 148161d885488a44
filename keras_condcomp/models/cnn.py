"""Builders of a small gated CNN and of its same-width Conv2D baseline."""

import keras

from keras_condcomp._arguments import check_positive_int, is_integer
from keras_condcomp.layers.gated_conv2d import GatedConv2D
from keras_condcomp.models._builders import check_builder_keywords, check_num_classes
from keras_condcomp.models.policy_gradient_model import PolicyGradientModel

__all__ = ["DEFAULT_POLICY_GRID", "build_dense_cnn", "build_gated_cnn", "default_policy_grid"]

# Over a grey digit's whole image, a first layer's policy reads one number,
# the mean intensity, and never left probability 0.5 in training.
DEFAULT_POLICY_GRID = 4
# The builders' layout, whatever `keras.config.image_data_format()` says.
CHANNELS_LAST = "channels_last"


def default_policy_grid(rows, cols):
    """Cells a side of the CNN builders' policy grids: 4, fewer on smaller inputs.

    Examples:
        >>> default_policy_grid(28, 28), default_policy_grid(2, 4)
        (4, 2)
    """
    return min(DEFAULT_POLICY_GRID, rows, cols)


# Set by the builders for every gated convolution: not accepted in **gate_kwargs.
BUILDER_ARGUMENTS = ("filters", "kernel_size", "blocks", "padding", "activation",
                     "policy_grid", "name", "data_format")


def _check_arguments(filters, blocks, num_classes, gate_kwargs=None):
    """`filters` as a tuple, once `blocks`, `num_classes` and the keyword
    arguments are checked."""
    check_positive_int("blocks", blocks)
    check_num_classes(num_classes)
    check_builder_keywords(gate_kwargs, BUILDER_ARGUMENTS, "gated convolution")
    if isinstance(filters, (str, bytes)) or not hasattr(filters, "__iter__"):
        raise ValueError(
            "`filters` must be a sequence of positive integers, one per convolution. "
            f"Received: filters={filters!r}"
        )
    return tuple(filters)


def _check_filters(filters, blocks, input_shape):
    if not filters or any(not is_integer(f) or f <= 0 or f % blocks for f in filters):
        raise ValueError(
            "`filters` must be a non-empty sequence of positive integers divisible "
            f"by `blocks`. Received: filters={filters!r}, blocks={blocks!r}"
        )
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(is_integer(size) and size > 0 for size in shape):
        raise ValueError(
            "`input_shape` must be (rows, cols, channels) of positive ints. "
            f"Received: input_shape={input_shape!r}"
        )
    # Every convolution but the last is followed by 2x2 pooling.
    if min(shape[:2]) < 2 ** (len(filters) - 1):
        raise ValueError(
            f"{len(filters)} convolutions pool the image {len(filters) - 1} times: a "
            f"{shape[0]}x{shape[1]} input allows at most {min(shape[:2]).bit_length()}. "
            f"Received: filters={filters!r}, input_shape={input_shape!r}"
        )


def _logits(inputs, filters, convolution, num_classes):
    """The stack both builders share: `convolution(index, width, hidden)` for
    each entry of `filters`, 2x2 max pooling after each but the last, global
    average pooling and the `num_classes` logits."""
    hidden = inputs
    for index, width in enumerate(filters):
        hidden = convolution(index, width, hidden)
        if index < len(filters) - 1:
            hidden = keras.layers.MaxPooling2D(
                name=f"pool_{index + 1}", data_format=CHANNELS_LAST
            )(hidden)
    hidden = keras.layers.GlobalAveragePooling2D(name="global_pool", data_format=CHANNELS_LAST)(
        hidden
    )
    return keras.layers.Dense(int(num_classes), name="logits")(hidden)


def build_gated_cnn(
    input_shape,
    num_classes,
    filters=(32, 64),
    blocks=8,
    activation="relu",
    policy_grid=None,
    **gate_kwargs,
):
    """`input -> [GatedConv2D(f, 3, blocks=blocks) -> MaxPooling2D] ... -> GAP -> Dense` logits.

    One 3x3 "same" gated convolution per entry of `filters`, each but the
    last followed by 2x2 max pooling (which keeps the skipped groups' zero
    channels zero, so the next gated layer skips them too), then global
    average pooling and the `num_classes` logits.

    Args:
        input_shape: `(rows, cols, channels)` of an example (channels last,
            whatever `keras.config.image_data_format()` says).
        num_classes: output logits.
        filters: filters of each gated convolution.
        blocks: groups per gated convolution (dividing every `filters`).
        activation: of every gated convolution.
        policy_grid: cells a side of the grid over which every policy reads
            its input's channel means (1: the whole image). None (default):
            `default_policy_grid` of each gated layer's input rows and columns.
        **gate_kwargs: passed to every `GatedConv2D` (target_density, ...).

    Returns:
        an uncompiled `PolicyGradientModel`.

    Examples:
        >>> model = build_gated_cnn((8, 8, 1), 10, filters=(16, 32), blocks=4)
        >>> print(" -> ".join(type(layer).__name__ for layer in model.layers[1:]))
        GatedConv2D -> MaxPooling2D -> GatedConv2D -> GlobalAveragePooling2D -> Dense
    """
    filters = _check_arguments(filters, blocks, num_classes, gate_kwargs)
    _check_filters(filters, blocks, input_shape)
    seed = gate_kwargs.pop("seed", None)
    inputs = keras.Input(tuple(input_shape), name="inputs")

    def convolution(index, width, hidden):
        rows, cols = hidden.shape[1:3]
        return GatedConv2D(
            width,
            3,
            blocks=blocks,
            padding="same",
            activation=activation,
            policy_grid=default_policy_grid(rows, cols) if policy_grid is None else policy_grid,
            seed=None if seed is None else seed + index,
            name=f"gated_conv_{index + 1}",
            data_format=CHANNELS_LAST,
            **gate_kwargs,
        )(hidden)

    outputs = _logits(inputs, filters, convolution, num_classes)
    return PolicyGradientModel(inputs, outputs, name="gated_cnn")


def build_dense_cnn(input_shape, num_classes, filters=(32, 64), activation="relu"):
    """The same-shaped plain Keras CNN, `keras.layers.Conv2D` in place of GatedConv2D."""
    filters = _check_arguments(filters, 1, num_classes)
    _check_filters(filters, 1, input_shape)
    inputs = keras.Input(tuple(input_shape), name="inputs")

    def convolution(index, width, hidden):
        return keras.layers.Conv2D(
            width, 3, padding="same", activation=activation, name=f"conv_{index + 1}",
            data_format=CHANNELS_LAST,
        )(hidden)

    outputs = _logits(inputs, filters, convolution, num_classes)
    return keras.Model(inputs, outputs, name="dense_cnn")
