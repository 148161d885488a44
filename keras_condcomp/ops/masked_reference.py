"""The masked reference: compute every block densely, then zero the skipped ones."""

from keras import ops

from keras_condcomp._arguments import check_activation
from keras_condcomp.ops._block_masks import check_mask_rows

__all__ = ["masked_block_dense", "expand_block_mask"]


def expand_block_mask(block_mask, units):
    """Repeats a `(batch, blocks)` mask over each block's units: `(batch, units)`.

    Args:
        block_mask: `(..., blocks)` array or tensor, the last axis static.
        units: int, a multiple of `blocks`.

    Returns:
        A tensor `(..., units)`: each mask value repeated `units // blocks`
        times.

    Raises:
        ValueError: the last axis of `block_mask` is unknown or does not
            divide `units`.

    Examples:
        >>> import numpy as np
        >>> np.asarray(expand_block_mask(np.array([[1, 0]]), 4)).tolist()
        [[1, 1, 0, 0]]
    """
    blocks = block_mask.shape[-1]
    if blocks is None or units % blocks:
        raise ValueError(
            f"`block_mask` must have shape (batch, blocks) with blocks dividing "
            f"units={units}. Received: block_mask.shape={tuple(block_mask.shape)}"
        )
    return ops.repeat(block_mask, units // blocks, axis=-1)


def zero_skipped_blocks(outputs, block_mask):
    """`(batch, units)` outputs with the units of skipped blocks set to 0.

    A select, not a product with the mask: an infinite or NaN output of a
    skipped block (a float16 overflow, say) is 0 too, as in the paths that
    do not compute it.
    """
    active = expand_block_mask(block_mask, outputs.shape[-1]) > 0
    return ops.where(active, outputs, ops.zeros((), outputs.dtype))


def masked_block_dense(inputs, kernel, bias, block_mask, activation=None):
    """`activation(inputs @ kernel + bias) * mask`, the mask repeated per block.

    This is the reference every skipping path is tested against, on the
    `(input_dim, units)` kernel of `keras.layers.Dense`. It computes all the
    work (the engine's dense fallback is `block_dense`, on `GatedDense`'s
    block-major kernel).

    Args:
        inputs: `(batch, input_dim)`.
        kernel: `(input_dim, units)`.
        bias: `(units,)` or None.
        block_mask: `(batch, blocks)`, 1 for an active block, 0 for a skipped one.
        activation: a callable or None.

    Returns:
        `(batch, units)`; exactly 0 in the units of skipped blocks (a
        select: any mask value not > 0 skips, and a skipped unit is 0 even
        where the product is inf or NaN).

    Raises:
        ValueError: `blocks` does not divide `units` (see
            `expand_block_mask`).

    Examples:
        >>> import numpy as np
        >>> x, kernel = np.ones((2, 3), "float32"), np.ones((3, 4), "float32")
        >>> mask = np.array([[1, 0], [0, 1]], "float32")
        >>> np.asarray(masked_block_dense(x, kernel, None, mask)).tolist()
        [[3.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0]]
    """
    check_activation(activation)
    inputs, block_mask = ops.convert_to_tensor(inputs), ops.convert_to_tensor(block_mask)
    check_mask_rows(block_mask, inputs, broadcast=True)
    outputs = ops.matmul(inputs, kernel)
    if bias is not None:
        outputs = outputs + bias
    if activation is not None:
        outputs = activation(outputs)
    return zero_skipped_blocks(outputs, ops.convert_to_tensor(block_mask))
