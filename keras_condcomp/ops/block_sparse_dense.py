"""Block-sparse execution of a gated dense layer: skipped blocks are not computed.

Paths (TensorFlow graphs; batch of any size; no retracing per batch size):

- `"per_example"`: for each example, gather only the kernel tiles of its active
  output blocks (and, when the input is sparse, of its non-zero input units),
  one small matmul, scatter the result. The batch-1 path.
- `"grouped"`: group examples by output block (gather their rows, one matmul
  per used block against that block's kernel columns, scatter back).
- `"masked"`: the dense product then the mask (`masked_block_dense`), the
  reference and the fallback when skipping cannot pay.
- `"auto"`: `"per_example"` for a batch of one, `"grouped"` otherwise.

Input sparsity (the `M_in` of Bengio et al.'s `((H * M_in) W) * M_out`) is
recovered from the input itself: the units of a skipped block upstream are
exactly 0, so only non-zero input units are read. That is exact whatever the
upstream layer (an active unit that happens to be 0 contributes nothing), and
ReLU zeros are skipped for free.
"""

import tensorflow as tf

from keras_condcomp.ops.masked_reference import masked_block_dense

__all__ = ["block_sparse_dense", "EXECUTION_PATHS"]

EXECUTION_PATHS = ("auto", "per_example", "grouped", "masked")

# Gather the non-zero input units only when at most this fraction is non-zero:
# above it, copying the kernel rows costs more than multiplying by the zeros.
_INPUT_SPARSITY_THRESHOLD = 0.5


def _identity(x):
    return x


def _single_example(x, kernel, bias, block_mask, activation, blocks):
    """One example: `x (input_dim,)`, `block_mask (blocks,)` -> `(units,)`."""
    input_dim = tf.shape(kernel)[0]
    units = kernel.shape[-1]
    block_size = units // blocks
    active_blocks = tf.where(block_mask > 0)[:, 0]
    tiles = tf.gather(
        tf.reshape(kernel, [input_dim, blocks, block_size]), active_blocks, axis=1
    )
    tiles = tf.reshape(tiles, [input_dim, -1])
    active_inputs = tf.where(tf.not_equal(x, 0))[:, 0]

    def sparse_input():
        return tf.matmul(
            tf.gather(x, active_inputs)[None, :], tf.gather(tiles, active_inputs)
        )

    def dense_input():
        return tf.matmul(x[None, :], tiles)

    sparse_enough = tf.cast(tf.size(active_inputs), tf.float32) <= (
        _INPUT_SPARSITY_THRESHOLD * tf.cast(input_dim, tf.float32)
    )
    outputs = tf.cond(sparse_enough, sparse_input, dense_input)
    outputs = tf.reshape(outputs, [-1, block_size])
    if bias is not None:
        outputs = outputs + tf.gather(
            tf.reshape(bias, [blocks, block_size]), active_blocks
        )
    outputs = activation(outputs)
    outputs = tf.scatter_nd(active_blocks[:, None], outputs, [blocks, block_size])
    return tf.reshape(outputs, [units])


def _per_example(inputs, kernel, bias, block_mask, activation, blocks):
    def one(args):
        x, m = args
        return _single_example(x, kernel, bias, m, activation, blocks)

    def batch_of_one():
        return _single_example(
            inputs[0], kernel, bias, block_mask[0], activation, blocks
        )[None, :]

    def batch_of_many():
        return tf.map_fn(
            one,
            (inputs, block_mask),
            fn_output_signature=tf.TensorSpec([kernel.shape[-1]], inputs.dtype),
        )

    return tf.cond(tf.shape(inputs)[0] == 1, batch_of_one, batch_of_many)


def _grouped(inputs, kernel, bias, block_mask, activation, blocks):
    batch = tf.shape(inputs)[0]
    units = kernel.shape[-1]
    block_size = units // blocks
    active = tf.transpose(block_mask) > 0  # (blocks, batch)
    # (block, example) pairs, sorted by block: each block's rows are contiguous.
    pairs = tf.where(active)
    counts = tf.reduce_sum(tf.cast(active, tf.int32), axis=1)
    rows = tf.split(tf.gather(inputs, pairs[:, 1]), counts, num=blocks)
    pieces = []
    for j in range(blocks):

        def compute(j=j):
            return tf.matmul(rows[j], kernel[:, j * block_size : (j + 1) * block_size])

        def nothing():
            return tf.zeros([0, block_size], inputs.dtype)

        pieces.append(tf.cond(counts[j] > 0, compute, nothing))
    outputs = tf.concat(pieces, axis=0)
    if bias is not None:
        outputs = outputs + tf.gather(
            tf.reshape(bias, [blocks, block_size]), pairs[:, 0]
        )
    outputs = activation(outputs)
    indices = tf.stack([pairs[:, 1], pairs[:, 0]], axis=1)
    outputs = tf.scatter_nd(indices, outputs, tf.stack([tf.cast(batch, tf.int64), blocks, block_size]))
    return tf.reshape(outputs, [batch, units])


def _auto(inputs, kernel, bias, block_mask, activation, blocks):
    return tf.cond(
        tf.shape(inputs)[0] == 1,
        lambda: _per_example(inputs, kernel, bias, block_mask, activation, blocks),
        lambda: _grouped(inputs, kernel, bias, block_mask, activation, blocks),
    )


def _masked(inputs, kernel, bias, block_mask, activation, blocks):
    return masked_block_dense(inputs, kernel, bias, block_mask, activation)


_PATHS = {
    "auto": _auto,
    "per_example": _per_example,
    "grouped": _grouped,
    "masked": _masked,
}
_compiled = {}


def _compiled_path(path, activation, input_dim, units, blocks, dtype, has_bias):
    key = (path, activation, input_dim, units, blocks, dtype, has_bias)
    if key not in _compiled:
        fn = _PATHS[path]
        signature = [
            tf.TensorSpec([None, input_dim], dtype),
            tf.TensorSpec([input_dim, units], dtype),
            tf.TensorSpec([units] if has_bias else [0], dtype),
            tf.TensorSpec([None, blocks], dtype),
        ]

        def run(inputs, kernel, bias, block_mask):
            return fn(
                inputs, kernel, bias if has_bias else None, block_mask, activation, blocks
            )

        _compiled[key] = tf.function(run, input_signature=signature)
    return _compiled[key]


def block_sparse_dense(
    inputs, kernel, bias, block_mask, activation=None, path="auto"
):
    """Computes `masked_block_dense` without computing the skipped blocks.

    Args:
        inputs: `(batch, input_dim)` float tensor.
        kernel: `(input_dim, units)`, `units` divisible by the mask's blocks.
        bias: `(units,)` or None.
        block_mask: `(batch, blocks)`, 1 for an active block, 0 for a skipped one.
        activation: a callable applied to active blocks, or None.
        path: one of `EXECUTION_PATHS`.

    Returns:
        `(batch, units)`, equal to `masked_block_dense` on the same arguments.

    Example:

    >>> import numpy as np
    >>> x = np.random.rand(3, 8).astype("float32")
    >>> w = np.random.rand(8, 4).astype("float32")
    >>> mask = np.array([[1, 0], [0, 0], [1, 1]], "float32")
    >>> y = block_sparse_dense(x, w, None, mask)
    >>> bool(np.all(y.numpy()[1] == 0))
    True
    """
    if path not in _PATHS:
        raise ValueError(
            f"Invalid `path`: expected one of {EXECUTION_PATHS}. Received: path={path!r}"
        )
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel, dtype=inputs.dtype)
    block_mask = tf.cast(block_mask, inputs.dtype)
    input_dim, units = kernel.shape
    blocks = block_mask.shape[-1]
    if inputs.shape.rank != 2 or inputs.shape[-1] != input_dim:
        raise ValueError(
            f"`inputs` must have shape (batch, {input_dim}) to match `kernel` "
            f"{tuple(kernel.shape)}. Received: inputs.shape={tuple(inputs.shape)}"
        )
    if blocks is None or units % blocks:
        raise ValueError(
            f"`block_mask` must have shape (batch, blocks) with blocks dividing "
            f"units={units}. Received: block_mask.shape={tuple(block_mask.shape)}"
        )
    has_bias = bias is not None
    bias = (
        tf.convert_to_tensor(bias, dtype=inputs.dtype)
        if has_bias
        else tf.zeros([0], inputs.dtype)
    )
    run = _compiled_path(
        path,
        activation or _identity,
        input_dim,
        units,
        blocks,
        inputs.dtype,
        has_bias,
    )
    return run(inputs, kernel, bias, block_mask)
