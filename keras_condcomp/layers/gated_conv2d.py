"""GatedConv2D: a Conv2D whose groups of filters are switched per example."""

import keras
from keras import ops

from keras_condcomp._arguments import check_bool, is_integer
from keras_condcomp.layers._compiled_inference import (
    compiled_inference,
    compiled_inference_applies,
)
from keras_condcomp.layers._gated_layer import (
    GatedLayer,
    _check_blocks,
    elementwise_activation,
)
from keras_condcomp.ops import forced_execution_path
from keras_condcomp.ops.block_sparse_conv2d import (
    CONV2D_EXECUTION_PATHS,
    _check_padding,
    _output_size,
    _pair,
    block_sparse_conv2d,
    masked_block_conv2d,
)
from keras_condcomp.ops.static_budget_conv2d import static_budget_conv2d
from keras_condcomp.ops.static_budget_dense import static_budget_settings

__all__ = ["GatedConv2D"]

DATA_FORMATS = ("channels_last", "channels_first")


def _spatial(input_shape, data_format):
    """`(rows, cols)` of a 4D input shape."""
    return tuple(input_shape[1:3] if data_format == "channels_last" else input_shape[2:4])


@keras.saving.register_keras_serializable(package="keras_condcomp")
class GatedConv2D(GatedLayer):
    """A `keras.layers.Conv2D` whose `blocks` groups of filters run per example.

    The `filters` output channels are split into `blocks` equal groups. A
    policy (`layer.policy`, a `BernoulliPolicy`) reads a cheap summary of the
    input, its global average over the spatial positions `s = mean_hw(x)`
    (one value per input channel; or over a grid of cells, `policy_grid`),
    and gives each group a probability
    `sigma = sigmoid(s Z + d)`; a mask `u` of active groups is sampled from it
    in training (`u ~ Bernoulli(sigma)`) and thresholded (`sigma > 0.5`) at
    inference, and

    `h = activation(conv2d(x, W) + b) * u`   (u repeated over each group's channels),

    as GatedDense does for units (Bengio et al., arXiv 1511.06297). The
    channels of a skipped group are exactly 0, so a following GatedConv2D
    (also after pooling or ReLU, which keep zero channels zero) reads
    block-sparse input channels. At inference only the active groups are
    computed, reading only the non-zero input channels
    (`keras_condcomp.ops.block_sparse_conv2d`); in training the masked
    convolution is used, since every group gets gradients. Called eagerly at
    inference (outside any `tf.function`), the layer runs as one compiled
    graph rather than op by op.

    The policy is trained by `keras_condcomp.PolicyGradientModel` (REINFORCE)
    like every gated layer; the layer adds the regularisers `sparsity_weight
    (L_b + L_e) + variance_weight L_v` of `keras_condcomp.regularizers` in
    training.

    Args:
        filters: positive int, the number of output channels.
        kernel_size: int or tuple of 2 ints, the convolution window.
        strides: int or tuple of 2 ints, as in `keras.layers.Conv2D`.
        padding: `"valid"` or `"same"`.
        data_format: `"channels_last"`, `"channels_first"` or None for
            `keras.config.image_data_format()`.
        dilation_rate: int or tuple of 2 ints (not with `strides > 1`).
        groups: 1, `Conv2D`'s default: grouped convolutions are not
            supported (accepted so that a `Conv2D` config passes).
        activation: activation function; it must act on each value alone
            (`"softmax"` is refused).
        use_bias: bool, whether the layer has a bias.
        kernel_initializer: initializer of the kernel.
        bias_initializer: initializer of the bias.
        kernel_regularizer: regularizer of the kernel.
        bias_regularizer: regularizer of the bias.
        activity_regularizer: regularizer of the output.
        kernel_constraint: constraint of the kernel.
        bias_constraint: constraint of the bias.
        blocks: positive int dividing `filters`: the number of gated groups
            (keyword only, as every gating argument below).
        target_density: the target fraction of active groups tau in (0, 1],
            or None to disable the `L_b`, `L_e` terms.
        sparsity_weight: lambda_s, weight of `L_b + L_e`.
        variance_weight: lambda_v, weight of `L_v`.
        policy_initializer: initializer of the policy kernel.
        policy_bias_initializer: initializer of the policy bias (zeros: every
            group starts with probability 0.5).
        policy_regularizer: regularizer of the policy kernel.
        inference: `"threshold"` (deterministic `sigma > 0.5`) or `"sample"`
            (sample the mask at inference too, as the paper does).
        execution: how inference runs: one of
            `keras_condcomp.ops.CONV2D_EXECUTION_PATHS`. `"auto"` (default)
            picks per call, by a cost rule, between skipping per example
            (batch 1), skipping grouped by filter group, and the dense
            convolution then the mask; `"masked"` is the reference.
            `keras_condcomp.ops.forced_execution` overrides it with a path
            the convolution engine has (a dense-only path such as
            `"static_capacity"` leaves `execution` in place).
        seed: int seed of the mask sampling.
        example_sparsity_weight: None (default: `sparsity_weight`) or the
            weight of `L_e` alone, as in GatedDense.
        policy_grid: None (default): the policy reads each input channel's
            mean over the image. A positive int `g`: the means over a
            `g x g` grid of equal cells (`g * g * in_channels` numbers), for
            layers whose input has few channels (a first layer reading a
            grey image otherwise sees one number). The cells are
            `rows // g` by `cols // g` from the top left: the last
            `rows % g` rows and `cols % g` columns are not read, so choose a
            `g` that divides the input's size.
        sparsity_deviation: `"absolute"` (default) or `"squared"`: how
            `L_b` and `L_e` measure a deviation from tau, as in GatedDense.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a 4D tensor.
        training: bool; samples the mask when True.

    Input shape:
        `(batch, rows, cols, channels)` with `data_format="channels_last"`,
        `(batch, channels, rows, cols)` with `"channels_first"`.

    Output shape:
        `(batch, new_rows, new_cols, filters)` (channels last) or
        `(batch, filters, new_rows, new_cols)`, as `keras.layers.Conv2D`.

    Examples:
        >>> import numpy as np
        >>> layer = GatedConv2D(16, 3, blocks=4, padding="same", activation="relu")
        >>> x = np.random.rand(2, 8, 8, 3).astype("float32")
        >>> tuple(layer(x).shape)
        (2, 8, 8, 16)
        >>> tuple(layer.block_mask(x).shape)
        (2, 4)
    """

    execution_paths = CONV2D_EXECUTION_PATHS

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
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
        policy_grid=None,
        sparsity_deviation="absolute",
        **kwargs,
    ):
        if not is_integer(filters) or filters <= 0:
            raise ValueError(
                f"`filters` must be a positive integer. Received: filters={filters!r}"
            )
        _check_blocks(blocks)
        if filters % blocks:
            raise ValueError(
                "`filters` must be divisible by `blocks`. "
                f"Received: filters={filters}, blocks={blocks}"
            )
        if groups != 1:
            raise ValueError(
                "GatedConv2D does not support grouped convolutions: `groups` must be 1. "
                f"Received: groups={groups!r}"
            )
        kernel_size = _pair(kernel_size, "kernel_size")
        strides = _pair(strides, "strides")
        dilation_rate = _pair(dilation_rate, "dilation_rate")
        padding = _check_padding(padding)
        if max(strides) > 1 and max(dilation_rate) > 1:
            raise ValueError(
                "`strides > 1` is not supported with `dilation_rate > 1`. "
                f"Received: strides={strides}, dilation_rate={dilation_rate}"
            )
        if policy_grid is not None and (not is_integer(policy_grid) or policy_grid <= 0):
            raise ValueError(
                "`policy_grid` must be None or a positive integer. "
                f"Received: policy_grid={policy_grid!r}"
            )
        if data_format is None:
            data_format = keras.config.image_data_format()
        if data_format not in DATA_FORMATS:
            raise ValueError(
                f"`data_format` must be one of {DATA_FORMATS} or None. "
                f"Received: data_format={data_format!r}"
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
        self.filters = int(filters)
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.data_format = data_format
        self.dilation_rate = dilation_rate
        self.activation = elementwise_activation(activation)
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.policy_grid = None if policy_grid is None else int(policy_grid)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    @property
    def block_size(self):
        """Output channels per group."""
        return self.filters // self.blocks

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        in_channels = input_shape[self._channel_axis]
        if in_channels is None:
            raise ValueError(
                "The channel dimension of the inputs of GatedConv2D must be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, in_channels, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        state_dim = in_channels
        if self.policy_grid is not None:
            spatial = _spatial(input_shape, self.data_format)
            if None in spatial or min(spatial) < self.policy_grid:
                raise ValueError(
                    f"`policy_grid={self.policy_grid}` needs inputs whose rows and "
                    f"columns are known and at least {self.policy_grid}. "
                    f"Received: input_shape={tuple(input_shape)}"
                )
            state_dim = in_channels * self.policy_grid**2
        self._build_gating(state_dim)
        self.input_spec = keras.layers.InputSpec(
            ndim=4, axes={self._channel_axis: in_channels}
        )

    def _policy_state(self, inputs):
        """Channel means over the image (`policy_grid` None): `(batch,
        in_channels)`, or over a `g x g` grid of equal cells: `(batch, g * g *
        in_channels)` (rows and columns beyond a multiple of `g` left out)."""
        inputs = ops.cast(inputs, "float32")
        if self.data_format == "channels_first":
            inputs = ops.transpose(inputs, (0, 2, 3, 1))
        if self.policy_grid is None:
            return ops.mean(inputs, axis=(1, 2))
        g = self.policy_grid
        rows, cols, channels = inputs.shape[1:]
        if channels is None:  # `keras_condcomp.models.compact_inference`'s held channels
            channels = ops.shape(inputs)[-1]
        cell_rows, cell_cols = rows // g, cols // g
        cells = ops.reshape(
            inputs[:, : g * cell_rows, : g * cell_cols],
            (-1, g, cell_rows, g, cell_cols, channels),
        )
        return ops.reshape(ops.mean(cells, axis=(2, 4)), (-1, g * g * channels))

    # Reads `keras_condcomp.ops.static_budget_dense.static_budget_settings(self)` when traced for
    # export (`keras_condcomp.export`): a fixed group budget, static shapes.
    supports_static_budget = True
    # The budget counts the groups active in some example of the batch.
    static_budget_scope = "batch"
    # Default export budgets above this fraction of the groups compute every
    # group. LiteRT, batch 1, 8 groups, 16x16x64 -> 128 and 8x8x128 -> 128:
    # 1 group 1.5x-1.9x faster than Conv2D, 2 groups 0.8x-0.9x (the gathered
    # filters are not constant, and XNNPACK takes only constant ones). ONNX
    # (onnxruntime): the CNN of benchmarks/export.py with 1 group of 8 in
    # every layer ran at 0.65x of the dense export, every group at 0.8x.
    export_skip_limit = {"litert": 0.2, "onnx": 0.0}

    def call(self, inputs, training=None):
        self.compute_output_shape(inputs.shape)  # refuses inputs too small, before any op
        inputs = self._float_inputs(inputs)
        if compiled_inference_applies(self, training):
            return compiled_inference(self, inputs)
        mask = self._gate(inputs, training)
        budget = None if training else static_budget_settings(self)
        if budget is not None:
            channels_first = self.data_format == "channels_first"
            outputs = static_budget_conv2d(
                ops.transpose(inputs, (0, 2, 3, 1)) if channels_first else inputs,
                self.kernel, self.bias, mask, self.activation, self.strides,
                self.padding, self.dilation_rate, budget=budget["budget"],
            )
            return ops.transpose(outputs, (0, 3, 1, 2)) if channels_first else outputs
        if training or keras.backend.backend() != "tensorflow":
            return masked_block_conv2d(
                inputs, self.kernel, self.bias, mask, self.activation,
                self.strides, self.padding, self.dilation_rate, self.data_format,
            )
        forced = forced_execution_path()
        path = forced if forced in CONV2D_EXECUTION_PATHS else self.execution
        channels_first = self.data_format == "channels_first"
        if channels_first:
            # The skipping engine is channels-last (as TensorFlow's CPU kernels).
            inputs = ops.transpose(inputs, (0, 2, 3, 1))
        outputs = block_sparse_conv2d(
            inputs,
            ops.convert_to_tensor(self.kernel),
            None if self.bias is None else ops.convert_to_tensor(self.bias),
            mask,
            self.activation,
            self.strides,
            self.padding,
            self.dilation_rate,
            path=path,
        )
        if channels_first:
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        return outputs

    def compute_output_shape(self, input_shape):
        if self.data_format == "channels_last":
            rows, cols = input_shape[1:3]
        else:
            rows, cols = input_shape[2:4]
        spatial = tuple(
            _output_size(size, k, s, d, self.padding.upper())
            for size, k, s, d in zip(
                (rows, cols), self.kernel_size, self.strides, self.dilation_rate
            )
        )
        if any(size is not None and size <= 0 for size in spatial) or (
            self.policy_grid is not None
            and any(size is not None and size < self.policy_grid for size in (rows, cols))
        ):
            raise ValueError(
                f"Inputs of {rows}x{cols} are too small for GatedConv2D {self.name!r} "
                f"(kernel_size={self.kernel_size}, dilation_rate={self.dilation_rate}, "
                f"padding={self.padding!r}, policy_grid={self.policy_grid}). "
                f"Received: input_shape={tuple(input_shape)}"
            )
        if self.data_format == "channels_last":
            return (input_shape[0], *spatial, self.filters)
        return (input_shape[0], self.filters, *spatial)

    @classmethod
    def from_conv(cls, conv, blocks, **gate_kwargs):
        """A GatedConv2D with `conv`'s configuration and, if built, its weights.

        With every group open it computes exactly what `conv` computes.

        Examples:
            >>> import numpy as np, keras
            >>> conv = keras.layers.Conv2D(8, 3, activation="relu")
            >>> _ = conv(np.ones((1, 5, 5, 2), "float32"))
            >>> gated = GatedConv2D.from_conv(conv, blocks=4)
            >>> bool(np.allclose(gated.kernel.numpy(), conv.kernel.numpy()))
            True
        """
        if not isinstance(conv, keras.layers.Conv2D):
            raise ValueError(
                "`conv` must be a keras.layers.Conv2D. "
                f"Received: conv={type(conv).__name__}"
            )
        config = conv.get_config()
        groups = config.pop("groups", 1)
        if groups != 1:
            raise ValueError(
                "`conv` is a grouped convolution, which GatedConv2D does not "
                f"support. Received: groups={groups!r}"
            )
        for key in ("lora_rank", "lora_alpha", "quantization_config"):
            if config.pop(key, None) is not None:
                raise ValueError(
                    f"`conv` uses {key}, which GatedConv2D does not support. "
                    f"Received: {key}={conv.get_config()[key]!r}"
                )
        # The layer's dtype policy (mixed precision, float64) is kept.
        config["dtype"] = getattr(conv, "dtype_policy")
        layer = cls(blocks=blocks, **{**config, **gate_kwargs})
        if conv.built:
            # The weights depend on the channels alone; a policy grid needs
            # known rows and columns, so it is built on the smallest it takes.
            size = layer.policy_grid
            shape = [None, size, size, size]
            shape[layer._channel_axis] = conv.kernel.shape[2]
            layer.build(tuple(shape))
            layer.kernel.assign(conv.kernel)
            if conv.use_bias:
                layer.bias.assign(conv.bias)
        return layer

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "blocks": self.blocks,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "policy_grid": self.policy_grid,
            **self._gating_config(),
        }
