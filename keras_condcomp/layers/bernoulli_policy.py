"""The per-block Bernoulli policy of Bengio et al."""

import keras
from keras import ops

from keras_condcomp._arguments import is_integer

__all__ = ["BernoulliPolicy"]


@keras.saving.register_keras_serializable(package="keras_condcomp")
class BernoulliPolicy(keras.layers.Layer):
    """One Bernoulli probability per block: `sigma = sigmoid(x @ kernel + bias)`.

    The policy of a gated layer; it runs in float32 whatever the global dtype
    policy, so log-probabilities stay accurate under mixed precision.

    Args:
        blocks: number of blocks to gate.
        kernel_initializer: initializer of `kernel` `(input_dim, blocks)`.
        bias_initializer: initializer of `bias` `(blocks,)`.
        kernel_regularizer: regularizer of `kernel` (the paper's L2 on theta_pi).
        bias_regularizer: regularizer of `bias`.

    Call arguments:
        inputs: `(batch, input_dim)`, the state `s` (the gated layer's input).
        return_logits: return `x @ kernel + bias` instead of its sigmoid.

    Input shape:
        `(batch, input_dim)`.

    Output shape:
        `(batch, blocks)` probabilities.

    Examples:
        >>> import numpy as np
        >>> policy = BernoulliPolicy(4)
        >>> tuple(policy(np.ones((2, 3), "float32")).shape)
        (2, 4)
    """

    def __init__(
        self,
        blocks,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not is_integer(blocks) or blocks <= 0:
            raise ValueError(
                f"`blocks` must be a positive integer. Received: blocks={blocks!r}"
            )
        self.blocks = int(blocks)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.blocks),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = self.add_weight(
            name="bias",
            shape=(self.blocks,),
            initializer=self.bias_initializer,
            regularizer=self.bias_regularizer,
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    def call(self, inputs, return_logits=False):
        logits = ops.matmul(inputs, self.kernel) + self.bias
        return logits if return_logits else ops.sigmoid(logits)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.blocks,)

    def quantize(self, mode=None, type_check=True, config=None):
        # `Model.quantize` calls the leaf layers only and warns with this
        # message: without it, the only word of a skipped gated layer.
        raise NotImplementedError(
            "Keras's quantize() leaves keras_condcomp's gated layers (GatedDense, "
            "GatedConv2D) and their policies in float. For int8 weights, export with "
            "keras_condcomp.export.export_litert(model, path, quantize='int8')."
        )

    def get_config(self):
        return {
            **super().get_config(),
            "blocks": self.blocks,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
        }
