"""GatedDense: a Dense layer whose blocks of units are switched per example."""

import warnings

import keras
from keras import ops

from keras_condcomp import regularizers
from keras_condcomp.layers.bernoulli_policy import BernoulliPolicy
from keras_condcomp.layers.decision_recorder import GateDecision, current_recorder
from keras_condcomp.ops import EXECUTION_PATHS, block_sparse_dense, masked_block_dense

__all__ = ["GatedDense"]

INFERENCE_MODES = ("threshold", "sample")


def validate_gating_arguments(
    target_density, sparsity_weight, variance_weight, inference, execution
):
    """Checks the gating arguments shared by the gated layers."""
    if target_density is not None and not (
        isinstance(target_density, (int, float)) and 0 < target_density <= 1
    ):
        raise ValueError(
            "`target_density` must be None or a number in (0, 1]. "
            f"Received: target_density={target_density!r}"
        )
    for name, value in (
        ("sparsity_weight", sparsity_weight),
        ("variance_weight", variance_weight),
    ):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(
                f"`{name}` must be a non-negative number. Received: {name}={value!r}"
            )
    if inference not in INFERENCE_MODES:
        raise ValueError(
            f"`inference` must be one of {INFERENCE_MODES}. "
            f"Received: inference={inference!r}"
        )
    if execution not in EXECUTION_PATHS:
        raise ValueError(
            f"`execution` must be one of {EXECUTION_PATHS}. "
            f"Received: execution={execution!r}"
        )


@keras.saving.register_keras_serializable(package="keras_condcomp")
class GatedDense(keras.layers.Layer):
    """A `keras.layers.Dense` whose `blocks` groups of units run per example.

    A policy (`layer.policy`, a `BernoulliPolicy` reading the layer's input)
    gives each block a probability `sigma = sigmoid(x Z + d)`; a mask `u` of
    active blocks is sampled from it in training (`u ~ Bernoulli(sigma)`) and
    thresholded (`sigma > 0.5`) at inference, and

    `h = activation(x W + b) * u`   (u repeated over each block's units),

    as in Bengio et al. (arXiv 1511.06297). Skipped blocks output exactly 0,
    so a following gated layer reads a block-sparse input. At inference the
    skipped blocks are not computed (`keras_condcomp.ops.block_sparse_dense`);
    in training the masked product is used, since every block gets gradients.

    The policy is trained by `keras_condcomp.PolicyGradientModel` (REINFORCE);
    the layer adds the regularisers `sparsity_weight (L_b + L_e) +
    variance_weight L_v` of `keras_condcomp.regularizers` in training.

    Args:
        units: positive int, output dimension.
        blocks: positive int dividing `units`: the number of gated blocks.
        activation: as in `keras.layers.Dense`, and so are `use_bias`,
            `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
            `bias_regularizer`, `activity_regularizer`, `kernel_constraint`
            and `bias_constraint`.
        target_density: the target fraction of active blocks tau in (0, 1],
            or None to disable the `L_b`, `L_e` terms.
        sparsity_weight: lambda_s, weight of `L_b + L_e`.
        variance_weight: lambda_v, weight of `L_v`.
        policy_initializer: initializer of the policy kernel.
        policy_bias_initializer: initializer of the policy bias (zeros: every
            block starts with probability 0.5).
        policy_regularizer: regularizer of the policy kernel.
        inference: `"threshold"` (deterministic `sigma > 0.5`, exportable) or
            `"sample"` (sample the mask at inference too, as the paper does).
        execution: how inference runs: one of
            `keras_condcomp.ops.EXECUTION_PATHS` (`"auto"` by default;
            `"masked"` computes densely and masks, the reference).
        seed: int seed of the mask sampling.

    Call arguments:
        inputs: `(batch, input_dim)` tensor.
        training: bool; samples the mask when True.

    Input shape:
        `(batch, input_dim)`.

    Output shape:
        `(batch, units)`.

    Example:

    >>> import numpy as np
    >>> layer = GatedDense(64, blocks=8, activation="relu", target_density=0.25)
    >>> y = layer(np.random.rand(2, 16).astype("float32"))
    >>> tuple(y.shape)
    (2, 64)
    >>> tuple(layer.block_mask(np.random.rand(2, 16).astype("float32")).shape)
    (2, 8)
    """

    def __init__(
        self,
        units,
        blocks,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        target_density=None,
        sparsity_weight=1.0,
        variance_weight=0.0,
        policy_initializer="glorot_uniform",
        policy_bias_initializer="zeros",
        policy_regularizer=None,
        inference="threshold",
        execution="auto",
        seed=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not isinstance(units, int) or units <= 0:
            raise ValueError(
                f"`units` must be a positive integer. Received: units={units!r}"
            )
        if not isinstance(blocks, int) or blocks <= 0:
            raise ValueError(
                f"`blocks` must be a positive integer. Received: blocks={blocks!r}"
            )
        if units % blocks:
            raise ValueError(
                "`units` must be divisible by `blocks`. "
                f"Received: units={units}, blocks={blocks}"
            )
        validate_gating_arguments(
            target_density, sparsity_weight, variance_weight, inference, execution
        )
        self.units = units
        self.blocks = blocks
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.target_density = target_density
        self.sparsity_weight = sparsity_weight
        self.variance_weight = variance_weight
        self.inference = inference
        self.execution = execution
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.policy = BernoulliPolicy(
            blocks,
            kernel_initializer=policy_initializer,
            bias_initializer=policy_bias_initializer,
            kernel_regularizer=policy_regularizer,
            name="policy",
        )
        self.input_spec = keras.layers.InputSpec(ndim=2)
        self.supports_masking = False
        # Data-dependent shapes (tf.where) do not compile under XLA.
        self.supports_jit = False
        self._warned_unrecorded = False

    @property
    def block_size(self):
        """Units per block."""
        return self.units // self.blocks

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.policy.build(input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: input_dim})

    def _decide(self, inputs, training):
        """Policy logits and the 0/1 block mask used for `inputs`."""
        # The state is given to the policy, not learned through it.
        logits = self.policy(ops.stop_gradient(inputs), return_logits=True)
        if training or self.inference == "sample":
            uniform = keras.random.uniform(
                ops.shape(logits), seed=self.seed_generator, dtype=logits.dtype
            )
            active = uniform < ops.sigmoid(logits)
        else:
            active = logits > 0
        return logits, ops.cast(active, logits.dtype)

    def _built_for(self, inputs):
        inputs = ops.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        return inputs

    def block_probabilities(self, inputs):
        """The policy's `(batch, blocks)` probabilities sigma for `inputs`."""
        return self.policy(self._built_for(inputs))

    def block_mask(self, inputs, training=False):
        """The `(batch, blocks)` 0/1 mask the layer uses for `inputs`."""
        return self._decide(self._built_for(inputs), training)[1]

    def gating_regularization(self, probabilities):
        """`sparsity_weight (L_b + L_e) + variance_weight L_v` of a batch."""
        return regularizers.gating_regularization(
            probabilities, self.target_density, self.sparsity_weight, self.variance_weight
        )

    def call(self, inputs, training=None):
        logits, mask = self._decide(inputs, training)
        recorder = current_recorder()
        if training or recorder is not None:
            regularization = self.gating_regularization(ops.sigmoid(logits))
        if training:
            self.add_loss(regularization)
            if recorder is None and not self._warned_unrecorded:
                self._warned_unrecorded = True
                warnings.warn(
                    f"GatedDense {self.name!r} is training outside "
                    "keras_condcomp.PolicyGradientModel: its policy gets no "
                    "REINFORCE gradient and will not learn which blocks to run.",
                    stacklevel=2,
                )
        if recorder is not None:
            recorder.record(GateDecision(self, logits, mask, regularization))
        mask = ops.cast(mask, self.compute_dtype)
        if training or keras.backend.backend() != "tensorflow":
            return masked_block_dense(
                inputs, self.kernel, self.bias, mask, self.activation
            )
        return block_sparse_dense(
            inputs,
            ops.convert_to_tensor(self.kernel),
            None if self.bias is None else ops.convert_to_tensor(self.bias),
            mask,
            self.activation,
            path=self.execution,
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    @classmethod
    def from_dense(cls, dense, blocks, **gate_kwargs):
        """A GatedDense with `dense`'s configuration and, if built, its weights.

        With every block open it computes exactly what `dense` computes.

        Example:

        >>> import numpy as np, keras
        >>> dense = keras.layers.Dense(8, activation="relu")
        >>> _ = dense(np.ones((1, 4), "float32"))
        >>> gated = GatedDense.from_dense(dense, blocks=4)
        >>> bool(np.allclose(gated.kernel.numpy(), dense.kernel.numpy()))
        True
        """
        if not isinstance(dense, keras.layers.Dense):
            raise ValueError(
                "`dense` must be a keras.layers.Dense. "
                f"Received: dense={type(dense).__name__}"
            )
        config = dense.get_config()
        for key in ("lora_rank", "lora_alpha", "quantization_config"):
            if config.pop(key, None) is not None:
                raise ValueError(
                    f"`dense` uses {key}, which GatedDense does not support. "
                    f"Received: {key}={dense.get_config()[key]!r}"
                )
        config.pop("dtype", None)
        layer = cls(blocks=blocks, **{**config, **gate_kwargs})
        if dense.built:
            layer.build((None, dense.kernel.shape[0]))
            layer.kernel.assign(dense.kernel)
            if dense.use_bias:
                layer.bias.assign(dense.bias)
        return layer

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "blocks": self.blocks,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "target_density": self.target_density,
            "sparsity_weight": self.sparsity_weight,
            "variance_weight": self.variance_weight,
            "policy_initializer": keras.initializers.serialize(
                self.policy.kernel_initializer
            ),
            "policy_bias_initializer": keras.initializers.serialize(
                self.policy.bias_initializer
            ),
            "policy_regularizer": keras.regularizers.serialize(
                self.policy.kernel_regularizer
            ),
            "inference": self.inference,
            "execution": self.execution,
            "seed": self.seed,
        }
