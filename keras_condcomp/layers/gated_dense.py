"""GatedDense: a Dense layer whose blocks of units are switched per example."""

import keras
from keras import ops

from keras_condcomp._arguments import check_bool, is_integer
from keras_condcomp.layers._compiled_inference import (
    compiled_inference,
    compiled_inference_applies,
    plain_inference,
)
from keras_condcomp.layers._gated_layer import (
    GatedLayer,
    _check_blocks,
    elementwise_activation,
)
from keras_condcomp.ops import (
    block_dense,
    block_sparse_dense,
    forced_execution_path,
    from_block_kernel,
    to_block_kernel,
)
from keras_condcomp.ops.block_sparse_dense import native_gated_inference
from keras_condcomp.ops.native_kernels import (
    load_native_kernels,
    native_activation,
    native_gated_dense,
)
from keras_condcomp.ops.static_budget_dense import (
    static_budget_dense,
    static_budget_settings,
)

__all__ = ["GatedDense"]


@keras.saving.register_keras_serializable(package="keras_condcomp")
class GatedDense(GatedLayer):
    """A `keras.layers.Dense` whose `blocks` groups of units run per example.

    A policy (`layer.policy`, a `BernoulliPolicy` reading the layer's input)
    gives each block a probability `sigma = sigmoid(x Z + d)`; a mask `u` of
    active blocks is sampled from it in training (`u ~ Bernoulli(sigma)`) and
    thresholded (`sigma > 0.5`) at inference, and

    `h = activation(x W + b) * u`   (u repeated over each block's units),

    as in Bengio et al. (arXiv 1511.06297). Skipped blocks output exactly 0,
    so a following gated layer reads a block-sparse input. At inference the
    skipped blocks are not computed (`keras_condcomp.ops.block_sparse_dense`;
    where the native kernels are built, with a ReLU or linear activation in
    float32, the layer and its policy run as one op of them:
    `keras_condcomp.ops.native_kernels`); in training the masked product is
    used, since every block gets gradients.
    Called eagerly at inference (outside any `tf.function`), the layer runs
    as one compiled graph rather than op by op.

    Weights: `block_kernel`, the Dense kernel stored block-major, shape
    `(blocks, input_dim, units // blocks)`, so that skipping reads each
    active block's weights contiguously (`keras_condcomp.ops.to_block_kernel`);
    `bias`, shape `(units,)`; and the policy's. `layer.kernel` is the
    `(input_dim, units)` kernel of `keras.layers.Dense` (a tensor, like
    `Dense.kernel` with LoRA): set it with
    `layer.block_kernel.assign(to_block_kernel(kernel, layer.blocks))`, or
    convert a layer with `GatedDense.from_dense`. Initializers, regularizers
    and constraints see the `(input_dim, units)` kernel, as in Dense;
    `.keras` files that stored the kernel in that layout still load.

    The policy is trained by `keras_condcomp.PolicyGradientModel` (REINFORCE);
    the layer adds the regularisers `sparsity_weight (L_b + L_e) +
    variance_weight L_v` of `keras_condcomp.regularizers` in training.

    Args:
        units: positive int, output dimension.
        activation: activation function, as in `keras.layers.Dense`; it must
            act on each value alone (`"softmax"` is refused): inference
            computes each active block apart.
        use_bias: bool, whether the layer has a bias (as `Dense`).
        kernel_initializer: initializer of the `(input_dim, units)` kernel.
        bias_initializer: initializer of the bias.
        kernel_regularizer: regularizer of the kernel.
        bias_regularizer: regularizer of the bias.
        activity_regularizer: regularizer of the output.
        kernel_constraint: constraint of the kernel.
        bias_constraint: constraint of the bias.
        blocks: positive int dividing `units`: the number of gated blocks
            (keyword only, as every gating argument below).
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
            `keras_condcomp.ops.EXECUTION_PATHS`. `"auto"` (default) picks
            per call between the native kernels' op (`"native"`, where they
            are built: `keras_condcomp.ops.native_kernels`) and the dense
            product then the mask, or without them, by a cost model, between
            skipping per example, skipping grouped by block and the dense
            product; `"masked"` is the reference. `keras_condcomp.ops.forced_execution`
            overrides it for every layer traced in its block.
        seed: int seed of the mask sampling.
        example_sparsity_weight: None (default: `sparsity_weight`) or the
            weight of `L_e` alone, which keeps each example's fraction of
            active blocks near tau (the authors' code weighs `L_b` and `L_e`
            apart). `L_e` averages over blocks, so with many blocks it is weak
            next to `L_b` and `L_v`: a larger weight stops the policy from
            giving some examples every block and others none.
        sparsity_deviation: `"absolute"` (default, the paper's `|.|`) or
            `"squared"` (as the authors' code squares them): how `L_b` and `L_e` measure a
            deviation from tau. The squared pull fades near tau, so the
            learned density settles above it (on MNIST with tau = 1/16:
            about 0.16 against 0.07), and fewer examples are left with no
            active block.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: `(batch, input_dim)` tensor.
        training: bool; samples the mask when True.

    Input shape:
        `(batch, input_dim)`.

    Output shape:
        `(batch, units)`.

    Examples:
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
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        *,
        blocks,
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
        sparsity_deviation="absolute",
        **kwargs,
    ):
        if not is_integer(units) or units <= 0:
            raise ValueError(
                f"`units` must be a positive integer. Received: units={units!r}"
            )
        _check_blocks(blocks)
        if units % blocks:
            raise ValueError(
                "`units` must be divisible by `blocks`. "
                f"Received: units={units}, blocks={blocks}"
            )
        super().__init__(
            blocks,
            target_density=target_density,
            sparsity_weight=sparsity_weight,
            variance_weight=variance_weight,
            policy_initializer=policy_initializer,
            policy_bias_initializer=policy_bias_initializer,
            policy_regularizer=policy_regularizer,
            inference=inference,
            execution=execution,
            seed=seed,
            example_sparsity_weight=example_sparsity_weight,
            sparsity_deviation=sparsity_deviation,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.units = int(units)
        self.activation = elementwise_activation(activation)
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    @property
    def block_size(self):
        """Units per block."""
        return self.units // self.blocks

    @property
    def kernel(self):
        """The `(input_dim, units)` kernel of `keras.layers.Dense` (a tensor)."""
        if not self.built:
            raise AttributeError("`kernel` is created when the layer is built.")
        return from_block_kernel(self.block_kernel)

    def _check_rank(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"GatedDense {self.name!r} takes inputs of shape (batch, features). Received: "
                f"input_shape={tuple(input_shape)}. For sequences or images, Flatten or "
                "Reshape them first."
            )

    def build(self, input_shape):
        self._check_rank(input_shape)
        input_dim = input_shape[-1]
        dense_shape = (input_dim, self.units)

        def initializer(shape, dtype=None):
            return to_block_kernel(self.kernel_initializer(dense_shape, dtype), self.blocks)

        def regularizer(block_kernel):
            return self.kernel_regularizer(from_block_kernel(block_kernel))

        def constraint(block_kernel):
            dense = self.kernel_constraint(from_block_kernel(block_kernel))
            return to_block_kernel(dense, self.blocks)

        self.block_kernel = self.add_weight(
            name="block_kernel",
            shape=(self.blocks, input_dim, self.block_size),
            initializer=initializer,
            regularizer=regularizer if self.kernel_regularizer else None,
            constraint=constraint if self.kernel_constraint else None,
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
        self._build_gating(input_dim)
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: input_dim})

    # Reads `keras_condcomp.ops.static_budget_dense.static_budget_settings(self)` when traced for
    # export (`keras_condcomp.export`): a fixed block budget, static shapes.
    supports_static_budget = True
    # Default export budgets above this fraction of the blocks compute every
    # block (Bengio MLP shape, LiteRT and onnxruntime, batch 1: skipping a
    # third of 24 blocks 1.1x-1.4x faster than the dense export, half 0.6x-0.9x).
    export_skip_limit = 0.4

    def call(self, inputs, training=None):
        inputs = self._float_inputs(inputs)
        # Checked in this order so that training never loads the kernels.
        fused = (
            plain_inference(self, training)
            and inputs.dtype == "float32"
            and self._fuses_policy_natively()
        )
        if compiled_inference_applies(self, training):
            if fused and inputs.shape[0] == 1:
                # Called eagerly at batch 1, where "auto" never falls back:
                # the op alone (a graph costs about 0.2 ms to call, the op
                # 10-50 us).
                return native_gated_dense(inputs, *self._native_weights(), self.activation)
            return compiled_inference(self, inputs)
        if fused:
            return native_gated_inference(
                inputs, *self._native_weights(), self.activation,
                path=forced_execution_path() or self.execution,
            )
        mask = self._gate(inputs, training)
        budget = None if training else static_budget_settings(self)
        if budget is not None:
            return static_budget_dense(
                inputs, self.kernel, self.bias, mask, self.activation, **budget
            )
        if training or keras.backend.backend() != "tensorflow":
            return block_dense(inputs, self.block_kernel, self.bias, mask, self.activation)
        return block_sparse_dense(
            inputs,
            ops.convert_to_tensor(self.block_kernel),
            None if self.bias is None else ops.convert_to_tensor(self.bias),
            mask,
            self.activation,
            path=forced_execution_path() or self.execution,
        )

    def _fuses_policy_natively(self):
        """Whether the one native op of the layer and its threshold policy
        (`keras_condcomp.ops.native_kernels`) can run its inference: path
        `"auto"` or `"native"` in effect, ReLU or linear, the kernels built."""
        path = forced_execution_path() or self.execution
        return (
            path in ("auto", "native")
            and self.inference == "threshold"
            and native_activation(self.activation) is not None
            and load_native_kernels() is not None
        )

    def _native_weights(self):
        """The policy kernel and bias, block kernel and bias (or None) the
        native op reads."""
        return (
            self.policy.kernel.value, self.policy.bias.value, self.block_kernel.value,
            None if self.bias is None else self.bias.value,
        )

    def compute_output_shape(self, input_shape):
        self._check_rank(input_shape)
        return tuple(input_shape[:-1]) + (self.units,)

    def load_own_variables(self, store):
        # Files saved before the block-major storage hold the Dense kernel.
        if "0" in store.keys() and len(store["0"].shape) == 2:
            store = {key: store[key] for key in store.keys()}
            store["0"] = to_block_kernel(ops.convert_to_tensor(store["0"]), self.blocks)
        super().load_own_variables(store)

    @classmethod
    def from_dense(cls, dense, blocks, **gate_kwargs):
        """A GatedDense with `dense`'s configuration and, if built, its weights.

        With every block open it computes exactly what `dense` computes.

        Examples:
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
        # The layer's dtype policy (mixed precision, float64) is kept.
        config["dtype"] = getattr(dense, "dtype_policy")
        layer = cls(blocks=blocks, **{**config, **gate_kwargs})
        if dense.built:
            layer.build((None, dense.kernel.shape[0]))
            layer.block_kernel.assign(to_block_kernel(dense.kernel, blocks))
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
            **self._gating_config(),
        }
