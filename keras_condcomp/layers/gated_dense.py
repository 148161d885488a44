"""GatedDense: a Dense layer whose blocks of units are switched per example."""

import warnings

import keras
from keras import ops

from keras_condcomp import regularizers
from keras_condcomp.layers.bernoulli_policy import BernoulliPolicy
from keras_condcomp.layers.decision_recorder import GateDecision, current_recorder
from keras_condcomp.ops import (
    EXECUTION_PATHS,
    block_sparse_dense,
    forced_execution_path,
    masked_block_dense,
)

__all__ = ["GatedDense"]

INFERENCE_MODES = ("threshold", "sample")


class _GateSchedule:
    """Training-time state a callback may change between epochs.

    The current target density and whether the policy is on live in
    non-trainable variables read at call time, so a change reaches the
    already-traced train step. The container is a plain object so Keras does
    not track them: they are schedule state, not weights (not in
    `layer.weights`, not saved, no change to `.keras` files), and inference
    graphs (`predict`, export) never read them.
    """

    def __init__(self, target_density, policy_enabled):
        self.target_density = target_density
        self.policy_enabled = policy_enabled
        self.variables = None

    def create_variables(self):
        if self.variables is None:
            # Initializers, not values: allowed in Keras's stateless build scope.
            tau = 0.0 if self.target_density is None else float(self.target_density)
            self.variables = tuple(
                keras.Variable(
                    initializer=keras.initializers.Constant(value), shape=(),
                    dtype="float32", trainable=False, name=name,
                )
                for name, value in (
                    ("current_target_density", tau),
                    ("policy_enabled", 1.0 if self.policy_enabled else 0.0),
                )
            )

    def set(self, target_density=None, policy_enabled=None):
        if target_density is not None:
            self.target_density = float(target_density)
            if self.variables is not None:
                self.variables[0].assign(self.target_density)
        if policy_enabled is not None:
            self.policy_enabled = bool(policy_enabled)
            if self.variables is not None:
                self.variables[1].assign(1.0 if self.policy_enabled else 0.0)


def validate_gating_arguments(
    target_density, sparsity_weight, variance_weight, inference, execution,
    example_sparsity_weight=None,
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
        ("example_sparsity_weight", example_sparsity_weight),
    ):
        if name == "example_sparsity_weight" and value is None:
            continue
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
        example_sparsity_weight: None (default: `sparsity_weight`) or the
            weight of `L_e` alone, which keeps each example's fraction of
            active blocks near tau (the authors' code weighs `L_b` and `L_e`
            apart). `L_e` averages over blocks, so with many blocks it is weak
            next to `L_b` and `L_v`: a larger weight stops the policy from
            giving some examples every block and others none.
        policy_initializer: initializer of the policy kernel.
        policy_bias_initializer: initializer of the policy bias (zeros: every
            block starts with probability 0.5).
        policy_regularizer: regularizer of the policy kernel.
        inference: `"threshold"` (deterministic `sigma > 0.5`, exportable) or
            `"sample"` (sample the mask at inference too, as the paper does).
        execution: how inference runs: one of
            `keras_condcomp.ops.EXECUTION_PATHS`. `"auto"` (default) picks
            per call, by a cost model, between skipping per example,
            skipping grouped by block and the dense product then the mask;
            `"masked"` is the reference. `keras_condcomp.ops.forced_execution`
            overrides it for every layer traced in its block.
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
        example_sparsity_weight=None,
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
            target_density, sparsity_weight, variance_weight, inference, execution,
            example_sparsity_weight,
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
        self.example_sparsity_weight = example_sparsity_weight
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
        self._schedule = _GateSchedule(target_density, policy_enabled=True)

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
        self._schedule.create_variables()
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: input_dim})

    @property
    def current_target_density(self):
        """The target density tau used in training now (a float).

        Equals `target_density` unless a schedule
        (`keras_condcomp.callbacks.DensityScheduler`) changed it; it is not
        part of the config, which keeps the final `target_density`.
        """
        return self._schedule.target_density

    def set_current_target_density(self, value):
        """Sets the tau of the `L_b`, `L_e` terms for the next training steps.

        Takes effect inside an already-compiled `fit` (it is read from a
        non-trainable variable at call time); `target_density` and the config
        are unchanged.
        """
        if self.target_density is None:
            raise ValueError(
                f"GatedDense {self.name!r} has target_density=None: it has no "
                "target density to schedule."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value <= 1
        ):
            raise ValueError(
                f"The target density must be a number in (0, 1]. Received: value={value!r}"
            )
        self._schedule.set(target_density=value)

    @property
    def policy_enabled(self):
        """Whether the policy chooses the blocks in training (True by default)."""
        return self._schedule.policy_enabled

    def set_policy_enabled(self, enabled):
        """Switches the policy on or off for the next training steps.

        With the policy off every block runs in training and in
        `PolicyGradientModel.evaluate`, and the policy gets no gradient (its
        regulariser is 0): a dense warm-up
        (`keras_condcomp.callbacks.PolicyWarmup`). `predict` and exported
        graphs always use the policy.
        """
        if not isinstance(enabled, bool):
            raise ValueError(
                f"`enabled` must be a bool. Received: enabled={enabled!r}"
            )
        self._schedule.set(policy_enabled=enabled)

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

    def gating_regularization(self, probabilities, target_density=None):
        """`sparsity_weight (L_b + L_e) + variance_weight L_v` of a batch.

        `target_density` defaults to the layer's `target_density`.
        """
        if target_density is None or self.target_density is None:
            target_density = self.target_density
        return regularizers.gating_regularization(
            probabilities, target_density, self.sparsity_weight, self.variance_weight,
            self.example_sparsity_weight,
        )

    def _scheduled(self, logits, mask):
        """Applies the schedule state: logits, mask and tau used in training."""
        current, enabled = self._schedule.variables
        enabled = ops.cast(enabled, logits.dtype)
        on = enabled > 0.5
        # Policy off: every block runs and the policy gets no gradient.
        logits = ops.where(on, logits, ops.stop_gradient(logits))
        mask = ops.where(on, mask, ops.ones_like(mask))
        return logits, mask, ops.cast(current, logits.dtype), enabled

    def call(self, inputs, training=None):
        logits, mask = self._decide(inputs, training)
        recorder = current_recorder()
        if training or recorder is not None:
            # Only the training and PolicyGradientModel steps read the
            # schedule; predict and exported graphs never do.
            logits, mask, current, enabled = self._scheduled(logits, mask)
            regularization = enabled * self.gating_regularization(
                ops.sigmoid(logits), current
            )
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
            path=forced_execution_path() or self.execution,
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
            "example_sparsity_weight": self.example_sparsity_weight,
        }
