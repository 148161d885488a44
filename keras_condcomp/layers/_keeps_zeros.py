"""Which layers keep a block-sparse value block-sparse: a skipped block's
zeros stay zeros through them, so the next gated layer can skip reading it."""

import contextlib

import keras
from keras import ops

from keras_condcomp.layers._gated_layer import elementwise_activation

# The identity at inference.
INFERENCE_IDENTITY = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
    keras.layers.Identity,
)
# Layers that pool within each channel: a zero channel stays zero (compact
# chains take them on channels_last data only).
CHANNELWISE_POOLING = (
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
)
# Layers that act on each value alone: they keep zeros when they map 0 to 0.
ACTIVATION_LAYERS = (
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Activation,
)


def _eagerly():
    """Runs its block eagerly, also while a TensorFlow graph is traced (a
    `PolicyGradientModel` step profiles its model)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    return contextlib.nullcontext()


def maps_zero_to_zero(layer):
    """An activation layer whose output is 0 where its input is (an
    `Activation` must also act element-wise): not `ReLU(threshold=0.5,
    negative_slope=0.1)`, which maps 0 to -0.05, nor a sigmoid."""
    if isinstance(layer, keras.layers.Activation):
        try:
            elementwise_activation(layer.activation)
        except ValueError:
            return False
    with _eagerly():
        return bool(ops.convert_to_numpy(layer(ops.zeros((1, 1))))[0, 0] == 0)


def keeps_zeros(layer):
    """Whether `layer`'s output at inference is zero in every block (of
    features, or of channels) where its input is."""
    if isinstance(layer, (*INFERENCE_IDENTITY, *CHANNELWISE_POOLING)):
        return True
    return isinstance(layer, ACTIVATION_LAYERS) and maps_zero_to_zero(layer)
