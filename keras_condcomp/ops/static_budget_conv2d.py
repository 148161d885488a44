"""The export path of a gated convolution: a fixed budget of filter groups per batch.

Static shapes, as `static_budget_dense`, for a channels-last convolution
whose `blocks` groups of filters are gated per example:

1. the groups active in some example of the batch (the union of the masks;
   at batch 1, the example's own), `top_k(union, budget)` of them;
2. one `gather` of the chosen groups' filters from the kernel stored
   group-major (a folded constant: the weights are stored once), and one
   convolution with `budget * group_size` output channels;
3. bias, activation, each example's own mask, and a product with a 0/1
   placement matrix that puts the chosen groups in place (0 for the others),
   with the group axis in front.

A budget of every group (`budget == blocks`) is the masked convolution
itself: the constant kernel (which the XNNPACK delegate takes), the mask,
no top-k, gather or placement.

Exact when the batch has at most `budget` groups active in some example; a
batch with more loses the active groups of highest index. LiteRT exports use
batch 1, where that is the example's own number of active groups.
"""

import tensorflow as tf

from keras_condcomp._arguments import check_activation, check_bias, is_integer
from keras_condcomp.ops._block_masks import check_mask_rows
from keras_condcomp.ops.block_sparse_conv2d import _check_padding, _pair

__all__ = ["static_budget_conv2d"]


def _identity(x):
    return x


def static_budget_conv2d(
    inputs, kernel, bias, block_mask, activation=None, strides=(1, 1), padding="valid",
    dilation_rate=(1, 1), *, budget,
):
    """A channels-last gated convolution computing `budget` filter groups.

    Args:
        inputs: `(batch, rows, cols, channels)` float tensor.
        kernel: `(kernel_rows, kernel_cols, channels, filters)`.
        bias: `(filters,)` or None.
        block_mask: `(batch, blocks)` scores; a group is active when its score
            is > 0 (the threshold policy's 0/1 mask).
        activation: element-wise callable or None.
        strides, padding, dilation_rate: as in `keras.layers.Conv2D`.
        budget: int in `[1, blocks]`: filter groups computed per batch.

    Returns:
        `(batch, out_rows, out_cols, filters)`: the masked convolution when at
        most `budget` groups are active in the batch.

    Examples:
        >>> import numpy as np
        >>> x = np.random.rand(1, 5, 5, 2).astype("float32")
        >>> k = np.random.rand(3, 3, 2, 8).astype("float32")
        >>> mask = np.array([[0., 1., 0., 1.]], "float32")
        >>> y = static_budget_conv2d(x, k, None, mask, padding="same", budget=2).numpy()
        >>> dense = tf.nn.conv2d(x, k, 1, "SAME").numpy()
        >>> bool(np.allclose(y[..., 2:4], dense[..., 2:4], atol=1e-5)), float(y[..., :2].max())
        (True, 0.0)
    """
    inputs = tf.convert_to_tensor(inputs)
    dtype = inputs.dtype
    kernel = tf.convert_to_tensor(kernel, dtype)
    scores = tf.cast(tf.convert_to_tensor(block_mask), tf.float32)
    if kernel.shape.rank != 4:
        raise ValueError(
            "`kernel` must have shape (rows, cols, in_channels, filters). "
            f"Received: kernel.shape={tuple(kernel.shape)}"
        )
    rows, cols, channels, filters = kernel.shape
    blocks = scores.shape[-1]
    if inputs.shape.rank != 4 or inputs.shape[-1] != channels:
        raise ValueError(
            f"`inputs` must have shape (batch, rows, cols, {channels}) to match `kernel` "
            f"{tuple(kernel.shape)}. Received: inputs.shape={tuple(inputs.shape)}"
        )
    if blocks is None or filters % blocks:
        raise ValueError(
            f"`block_mask` must have shape (batch, blocks) with blocks dividing "
            f"filters={filters}. Received: block_mask.shape={tuple(scores.shape)}"
        )
    if not is_integer(budget) or not 0 < budget <= blocks:
        raise ValueError(
            f"`budget` must be an int in [1, blocks={blocks}]. Received: budget={budget!r}"
        )
    budget = int(budget)
    check_mask_rows(scores, inputs)
    check_activation(activation)
    check_bias(bias, filters)
    strides, dilation_rate = _pair(strides, "strides"), _pair(dilation_rate, "dilation_rate")
    if max(strides) > 1 and max(dilation_rate) > 1:
        raise ValueError(
            "`strides > 1` is not supported with `dilation_rate > 1`. "
            f"Received: strides={strides}, dilation_rate={dilation_rate}"
        )
    padding = _check_padding(padding)
    activation = activation or _identity
    size = filters // blocks

    if budget == blocks:
        # Every group: the constant kernel, no top-k, gather or placement.
        weights, group_bias, group_scores = kernel, bias, scores
    else:
        _, chosen = tf.math.top_k(tf.reduce_max(scores, axis=0), k=budget)  # (budget,)
        groups = tf.transpose(
            tf.reshape(kernel, [rows, cols, channels, blocks, size]), [3, 0, 1, 2, 4]
        )
        weights = tf.reshape(
            tf.transpose(tf.gather(groups, chosen), [1, 2, 3, 0, 4]),
            [rows, cols, channels, budget * size],
        )
        if bias is not None:
            bias = tf.reshape(tf.convert_to_tensor(bias, dtype), [blocks, size])
            group_bias = tf.reshape(tf.gather(bias, chosen), [budget * size])
        group_scores = tf.gather(scores, chosen, axis=1)  # (batch, budget)
    outputs = tf.nn.conv2d(
        inputs, weights, strides=list(strides), padding=padding.upper(),
        dilations=list(dilation_rate),
    )
    if bias is not None:
        outputs = outputs + tf.cast(group_bias, dtype)
    # Each example's own mask, as a product (XNNPACK takes it; a select with
    # a broadcast mask runs on LiteRT's slower builtin kernel). Made channels
    # first, then transposed: tf2onnx then moves the product into
    # onnxruntime's NCHW layout, where a mask made channels last kept a
    # transpose on each side of every convolution (the CNN of
    # `benchmarks/gated_conv2d.py`, every group, batch 1, one thread: 6
    # transposes -> 1, 0.82x -> 0.83x-0.84x of the Conv2D export; the LiteRT
    # converter makes the transpose a reshape either way).
    keep = tf.cast(group_scores > 0, dtype)
    keep = tf.reshape(tf.repeat(keep, size, axis=1), [-1, budget * size, 1, 1])
    keep = tf.transpose(keep, [0, 2, 3, 1])
    outputs = activation(outputs) * keep
    if budget == blocks:
        return outputs
    # Places chosen group k at group chosen[k]: with the groups in front,
    # a product with the 0/1 matrix `one_hot(chosen)^T` (exact; blocks x
    # budget multiply-adds per value, 3x faster in LiteRT than a product
    # with `one_hot(chosen) (x) I_size` on the channel axis).
    spatial = list(outputs.shape[1:-1])
    by_group = tf.transpose(tf.reshape(outputs, [-1, budget, size]), [1, 0, 2])
    placed = tf.matmul(
        tf.one_hot(chosen, blocks, dtype=dtype), tf.reshape(by_group, [budget, -1]),
        transpose_a=True,
    )  # (blocks, positions * size)
    placed = tf.transpose(tf.reshape(placed, [blocks, -1, size]), [1, 0, 2])
    if None in spatial:
        return tf.reshape(placed, tf.concat([tf.shape(outputs)[:-1], [filters]], 0))
    return tf.reshape(placed, [-1, *spatial, filters])
