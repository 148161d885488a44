"""Which layers keep a block-sparse value block-sparse: a skipped block's
zeros stay zeros through them, so the next gated layer can skip reading it."""

import keras
from keras import ops

from keras_condcomp.layers._gated_layer import elementwise_activation

ACTIVATION_LAYERS = (
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Activation,
)
# Identity at inference, or pooling within a channel (an all-zero channel
# stays all zero).
_ALWAYS = (
    keras.layers.Dropout,
    keras.layers.Identity,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
)


def maps_zero_to_zero(layer):
    """An activation layer whose output is 0 where its input is (an
    `Activation` must also act element-wise): not `ReLU(threshold=0.5,
    negative_slope=0.1)`, which maps 0 to -0.05, nor a sigmoid."""
    if isinstance(layer, keras.layers.Activation):
        try:
            elementwise_activation(layer.activation)
        except ValueError:
            return False
    return bool(ops.convert_to_numpy(layer(ops.zeros((1, 1))))[0, 0] == 0)


def keeps_zeros(layer):
    """Whether `layer`'s output at inference is zero in every block (of
    features, or of channels) where its input is."""
    if isinstance(layer, _ALWAYS):
        return True
    return isinstance(layer, ACTIVATION_LAYERS) and maps_zero_to_zero(layer)
