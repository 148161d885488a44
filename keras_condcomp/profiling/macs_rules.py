"""How many multiply-adds (MACs) per example each kind of layer does.

A rule maps a built layer to a `LayerCost`. The profiler tries `GATED_RULES`
first (layers whose blocks a policy switches), then `RULES` in order; the
first rule whose class matches wins. To count a new kind of layer (a
`GatedConv2D`, say), write a function `(layer, input_shape, output_shape)
-> LayerCost` (the shapes of one call, with the batch dimension; None where
unknown) and add `(LayerClass, function)` to the right table.

The rules:

- `Dense`: `input_dim * units` per position (one position per example for
  2D inputs; one per leading step for `(batch, steps, features)`).
- Convolutions (`Conv1D/2D/3D`, `DepthwiseConv1D/2D`): `kernel.size` per
  output position; `SeparableConv1D/2D`: the depthwise plus the pointwise
  kernel per output position; transposed convolutions: `kernel.size` per
  input position.
- `GatedDense`: `input_dim * units` dense, `input_dim * blocks` for its policy.
- `GatedConv2D`: `kernel.size` per output position dense (as `Conv2D`),
  the size of its policy kernel for its policy (`in_channels * blocks` on
  the globally averaged input, `g * g` times that with `policy_grid=g`; the
  averaging is additions, not counted).
- Layers without weights (pooling, activations, dropout, reshapes, merges)
  and normalisation and `Embedding` layers: 0 MACs (elementwise work and
  lookups are not multiply-adds of a product).
- Any other layer with weights, and a `Dense` over an unknown number of
  steps: 0 MACs, marked uncounted (`counted=False`) so that the summary
  says so instead of silently under-counting.

A layer (or nested model) that the model calls k times counts k calls, each
at its own shapes (read from the functional graphs, so a layer first called
in another model counts at this model's shapes; a subclassed model's calls
are not known and count once, at the first call's shapes); a gated one at
its density over the calls, its inputs counted dense.
"""

import dataclasses
import math

import keras

from keras_condcomp.layers.bernoulli_policy import BernoulliPolicy
from keras_condcomp.layers.gated_conv2d import GatedConv2D
from keras_condcomp.layers.gated_dense import GatedDense

__all__ = ["GATED_RULES", "RULES", "LayerCost", "is_gated", "layer_cost"]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """MACs per example of a layer with every block open.

    What a rule returns; `profile_macs` multiplies it by the layer's calls
    and densities.

    Args:
        dense_macs: MACs per example of the layer's products, every block
            open.
        policy_macs: MACs per example of its gating policy (0 if ungated).
        blocks: its number of gated blocks, None if ungated.
        counted: False when no rule knows the layer's MACs (they read 0).

    Examples:
        >>> LayerCost(6400, policy_macs=400, blocks=4)
        LayerCost(dense_macs=6400, policy_macs=400, blocks=4, counted=True)
    """

    dense_macs: int
    policy_macs: int = 0
    blocks: int | None = None
    counted: bool = True


def is_gated(layer):
    """Whether a policy switches `layer`'s blocks.

    Args:
        layer: any object; gated when its `policy` attribute is a
            `BernoulliPolicy`.

    Returns:
        bool.

    Examples:
        >>> import keras
        >>> from keras_condcomp.layers import GatedDense
        >>> is_gated(GatedDense(8, blocks=2)), is_gated(keras.layers.Dense(8))
        (True, False)
    """
    return isinstance(getattr(layer, "policy", None), BernoulliPolicy)


def first_call_tensor(layer, attribute):
    """`layer.input` or `layer.output` (its first call's, in whichever model)
    when that is one tensor, else None."""
    try:
        value = getattr(layer, attribute)
    except (AttributeError, ValueError):
        # A layer of a subclassed model has no symbolic input or output.
        return None
    return None if isinstance(value, (list, tuple, dict)) else value


def static_shape(value):
    """A single tensor's (or shape's) dimensions as a tuple, else None."""
    shape = getattr(value, "shape", value)
    if not isinstance(shape, (tuple, list)) or any(
        not (dim is None or isinstance(dim, int)) for dim in shape
    ):
        return None
    return tuple(shape)


def call_shapes(layer, input_shape=None):
    """`(input shape, output shape)` of one call of `layer`: from
    `input_shape` (that call's, read from the model's graph) when given, else
    from the layer's first call (`layer.input`, `layer.output`: possibly in
    another model); None where unknown."""
    if input_shape is not None:
        try:
            output_shape = layer.compute_output_shape(tuple(input_shape))
            return tuple(input_shape), static_shape(output_shape)
        except (NotImplementedError, ValueError, TypeError, AttributeError):
            pass
    return (static_shape(first_call_tensor(layer, "input")),
            static_shape(first_call_tensor(layer, "output")))


def _positions(shape, channels_last=True):
    """Spatial (or step) positions per example of a tensor of `shape`."""
    if shape is None:
        return None
    inner = shape[1:-1] if channels_last else shape[2:]
    if any(dim is None for dim in inner):
        return None
    return math.prod(inner)


def _size(variable):
    return math.prod(variable.shape)


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") != "channels_first"


def _dense(layer, input_shape, output_shape):
    positions = _positions(output_shape)
    if positions is None and output_shape is not None:
        return LayerCost(0, counted=False)  # (batch, steps, features), steps unknown
    # Without a symbolic output (subclassed models) a Dense reads (batch, features).
    return LayerCost(_size(layer.kernel) * (1 if positions is None else positions))


def _convolution(layer, input_shape, output_shape):
    positions = _positions(output_shape, _channels_last(layer))
    if positions is None:
        return LayerCost(0, counted=False)
    return LayerCost(_size(layer.kernel) * positions)


def _separable_convolution(layer, input_shape, output_shape):
    positions = _positions(output_shape, _channels_last(layer))
    if positions is None:
        return LayerCost(0, counted=False)
    kernels = _size(layer.depthwise_kernel) + _size(layer.pointwise_kernel)
    return LayerCost(kernels * positions)


def _transposed_convolution(layer, input_shape, output_shape):
    positions = _positions(input_shape, _channels_last(layer))
    if positions is None:
        return LayerCost(0, counted=False)
    return LayerCost(_size(layer.kernel) * positions)


def _gated_dense(layer, input_shape, output_shape):
    return LayerCost(
        dense_macs=_size(layer.block_kernel),
        policy_macs=_size(layer.policy.kernel),
        blocks=layer.blocks,
    )


def _gated_conv2d(layer, input_shape, output_shape):
    positions = _positions(output_shape, _channels_last(layer))
    if positions is None:
        return LayerCost(0, counted=False)
    return LayerCost(
        dense_macs=_size(layer.kernel) * positions,
        policy_macs=_size(layer.policy.kernel),
        blocks=layer.blocks,
    )


def _zero(layer, input_shape, output_shape):
    return LayerCost(0)


GATED_RULES = [(GatedDense, _gated_dense), (GatedConv2D, _gated_conv2d)]
RULES = [
    (keras.layers.Dense, _dense),
    (
        (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D),
        _separable_convolution,
    ),
    (
        (
            keras.layers.Conv1DTranspose,
            keras.layers.Conv2DTranspose,
            keras.layers.Conv3DTranspose,
        ),
        _transposed_convolution,
    ),
    (
        (
            keras.layers.Conv1D,
            keras.layers.Conv2D,
            keras.layers.Conv3D,
            keras.layers.DepthwiseConv1D,
            keras.layers.DepthwiseConv2D,
        ),
        _convolution,
    ),
    (
        (
            keras.layers.BatchNormalization,
            keras.layers.LayerNormalization,
            keras.layers.GroupNormalization,
            keras.layers.UnitNormalization,
            keras.layers.Normalization,
            keras.layers.Embedding,
        ),
        _zero,
    ),
]


def layer_cost(layer, input_shape=None):
    """The `LayerCost` of one call of a built `layer` (see the module's rules).

    A layer no rule matches costs 0 MACs, counted when it has no weights,
    uncounted (`counted=False`) when it has some.

    Args:
        layer: a built Keras layer.
        input_shape: the call's input shape (`profile_macs` reads it from
            the model's graph); None: the layer's first call's.

    Returns:
        A `LayerCost`, per call of the layer.

    Raises:
        ValueError: a gated layer of a kind `GATED_RULES` has no rule for.

    Examples:
        >>> import keras
        >>> inputs = keras.Input((100,))
        >>> dense = keras.layers.Dense(10)
        >>> _ = dense(inputs)
        >>> layer_cost(dense)
        LayerCost(dense_macs=1000, policy_macs=0, blocks=None, counted=True)
    """
    table = GATED_RULES if is_gated(layer) else RULES
    for classes, rule in table:
        if isinstance(layer, classes):
            return rule(layer, *call_shapes(layer, input_shape))
    if is_gated(layer):
        raise ValueError(
            f"No MACs rule for the gated layer {layer.name!r} "
            f"({type(layer).__name__}): add one to "
            "keras_condcomp.profiling.macs_rules.GATED_RULES."
        )
    return LayerCost(0, counted=not layer.weights)
