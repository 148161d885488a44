"""The block-major kernel layout of `GatedDense`, and the dense product in it.

`GatedDense` stores its weights as `block_kernel`, shape `(blocks, input_dim,
block_size)`: block `j` is the contiguous `(input_dim, block_size)` slice
`kernel[:, j * block_size:(j + 1) * block_size]` of the `(input_dim, units)`
kernel of `keras.layers.Dense`. In this layout the weights of an active
output block, and the rows of it that an active input block multiplies, lie
together in memory, so skipping reads them at streaming speed; in the Dense
layout their rows lie `units` floats apart.
"""

from keras import ops

from keras_condcomp._arguments import check_activation, is_integer
from keras_condcomp.ops._block_masks import check_mask_rows
from keras_condcomp.ops.masked_reference import zero_skipped_blocks

__all__ = ["to_block_kernel", "from_block_kernel", "block_dense"]

# Unless the batch is 1, `block_dense` multiplies blocks of up to this many
# units by the kernel copied to the Dense layout (one transpose, one
# product), wider ones by one batched product over the blocks. A training
# step's product and its gradients, against Dense's, 2-core AMD EPYC
# (AVX2), batches 32 to 256: copied 0.79x-0.96x, batched 0.22x-0.87x at 8
# to 32 units (784 -> 16 x 16 0.89x-0.92x against 0.38x-0.50x, one
# thread); at 64 and 128 units copied 0.56x-0.99x, batched 0.51x-1.32x
# (ahead at batches 32 and 64 on one thread).
_BLOCK_DENSE_COPY_MAX_BLOCK = 32


def to_block_kernel(kernel, blocks):
    """`(input_dim, units)` kernel -> `(blocks, input_dim, units // blocks)`.

    Block `j` is `kernel[:, j * block_size:(j + 1) * block_size]`.

    Args:
        kernel: a 2-D `(input_dim, units)` array or tensor.
        blocks: positive int dividing `units`.

    Returns:
        A tensor of shape `(blocks, input_dim, units // blocks)`.

    Raises:
        ValueError: `blocks` not a positive int, or not dividing `units`.

    Examples:
        >>> import numpy as np
        >>> kernel = np.arange(12.0).reshape(2, 6)
        >>> np.asarray(to_block_kernel(kernel, 3))[1].tolist()
        [[2.0, 3.0], [8.0, 9.0]]
    """
    if not is_integer(blocks) or blocks <= 0:
        raise ValueError(f"`blocks` must be a positive int. Received: blocks={blocks!r}")
    input_dim, units = kernel.shape
    if units % blocks:
        raise ValueError(
            "The kernel's units must be divisible by `blocks`. "
            f"Received: kernel.shape={tuple(kernel.shape)}, blocks={blocks}"
        )
    return ops.transpose(ops.reshape(kernel, (input_dim, blocks, units // blocks)), (1, 0, 2))


def from_block_kernel(block_kernel):
    """`(blocks, input_dim, block_size)` -> the `(input_dim, units)` kernel.

    The inverse of `to_block_kernel`.

    Args:
        block_kernel: a 3-D `(blocks, input_dim, block_size)` array or
            tensor.

    Returns:
        A tensor of shape `(input_dim, blocks * block_size)`.

    Examples:
        >>> import numpy as np
        >>> kernel = np.arange(12.0).reshape(2, 6)
        >>> bool(np.array_equal(from_block_kernel(to_block_kernel(kernel, 3)), kernel))
        True
    """
    blocks, input_dim, block_size = block_kernel.shape
    return ops.reshape(ops.transpose(block_kernel, (1, 0, 2)), (input_dim, blocks * block_size))


def block_dense(inputs, block_kernel, bias=None, block_mask=None, activation=None):
    """`activation(inputs @ from_block_kernel(block_kernel) + bias) * mask`.

    At batch 1, and for blocks wider than 32 units, one batched product
    `(1, batch, input_dim) x (blocks, input_dim, block_size)`, without
    reordering the weights (only the output is); narrower blocks, where
    that product is slow, multiply the kernel copied to the Dense layout.
    `bias`, the `(batch, blocks)` `block_mask` (repeated over each block's
    units) and `activation` are optional. Used for training, and at
    inference where the skipping engine does not run.

    Args:
        inputs: `(batch, input_dim)`.
        block_kernel: `(blocks, input_dim, block_size)`, the block-major
            kernel (`to_block_kernel`).
        bias: `(blocks * block_size,)` or None (default).
        block_mask: None (default) or `(batch, blocks)`: the units of a
            block whose mask value is not > 0 are set to exactly 0 (a
            select, not a product: also where the output is inf or NaN).
        activation: a callable applied after the bias, or None (default).

    Returns:
        `(batch, blocks * block_size)` outputs, in the unit order of the
        Dense kernel `from_block_kernel(block_kernel)`.

    Raises:
        ValueError: `block_mask`'s last axis is not `blocks`.

    Examples:
        >>> import numpy as np
        >>> x, kernel = np.random.rand(2, 4), np.random.rand(4, 6)
        >>> y = block_dense(x, to_block_kernel(kernel, 3))
        >>> bool(np.allclose(y, x @ kernel))
        True
    """
    check_activation(activation)
    inputs = ops.convert_to_tensor(inputs)
    if block_mask is not None:
        check_mask_rows(ops.convert_to_tensor(block_mask), inputs, broadcast=True)
    blocks, input_dim, block_size = block_kernel.shape
    if block_size <= _BLOCK_DENSE_COPY_MAX_BLOCK and inputs.shape[0] != 1:
        outputs = ops.matmul(inputs, from_block_kernel(block_kernel))
    else:
        outputs = ops.matmul(ops.expand_dims(inputs, 0), block_kernel)  # (blocks, batch, size)
        outputs = ops.reshape(ops.transpose(outputs, (1, 0, 2)), (-1, blocks * block_size))
    if bias is not None:
        outputs = outputs + bias
    if activation is not None:
        outputs = activation(outputs)
    if block_mask is not None:
        block_mask = ops.convert_to_tensor(block_mask)
        if block_mask.shape[-1] != blocks:
            raise ValueError(
                f"`block_mask` must have shape (batch, {blocks}) to match `block_kernel` "
                f"{tuple(block_kernel.shape)}. Received: block_mask.shape={tuple(block_mask.shape)}"
            )
        outputs = zero_skipped_blocks(outputs, block_mask)
    return outputs
