"""The export path of a gated dense layer: a fixed budget of blocks per example.

Edge runtimes want static shapes: the LiteRT XNNPACK delegate leaves alone
every op that touches a dynamic-size tensor, and `tf.where` makes one. This
path keeps every shape static and still reads only the weights of the blocks
it computes:

1. `top_k(mask, budget)`: the `budget` blocks of largest score per example
   (the 0/1 threshold mask, or the policy logits); a chosen block of score
   `<= 0` is inactive, so its output is multiplied by 0.
2. The kernel is stored block-major and transposed, `(blocks, block_size,
   input_dim)` (a constant folded at conversion: the weights are stored
   once). For each of the `budget` chosen blocks, one `gather` copies its
   `(block_size, input_dim)` tile and one product `tile x input` (a
   FULLY_CONNECTED op at batch 1) reads it while it is still in cache
   (measured 1.1x to 1.4x faster than one gather of all chosen tiles then
   one product). Then bias, activation, then a product with the one-hot
   matrix of the chosen active blocks puts them back in a `(batch, units)`
   output whose other blocks are 0.

Input sparsity (Bengio et al.'s `M_in`): when the input comes from a gated
layer whose output has at most `input_budget` non-zero blocks of
`input_dim // input_blocks` units, the layer keeps only the `input_budget`
input blocks with the largest magnitude (`top_k` of the per-block maximum
absolute value, which finds every non-zero block) and gathers only the
`(output block, input block)` weight tiles it multiplies. That is exact: the
blocks it leaves out are 0.

A budget of every block (`budget == blocks`) skips nothing: the layer is then
the masked dense product itself (`masked_block_dense`: one product with the
constant kernel, which the XNNPACK delegate takes), with no top-k or gather.
`keras_condcomp.export.block_budgets` gives that budget to the layers whose
skipping would not pay.

The result equals the threshold policy's `masked_block_dense` whenever no
example has more than `budget` active blocks. An example with more loses the
active blocks of smallest score (with a 0/1 mask: of highest index), dropped
as in capacity-based mixture-of-experts: choose the budget from measured
block counts (`keras_condcomp.export.active_block_counts`) to make that rare.
"""

import contextlib
import threading

import tensorflow as tf

from keras_condcomp._arguments import check_activation, check_bias, is_integer
from keras_condcomp.ops._block_masks import check_mask_rows
from keras_condcomp.ops.masked_reference import expand_block_mask

__all__ = ["static_budget_dense", "static_budget_plan", "static_budget_settings"]

_plan = threading.local()


@contextlib.contextmanager
def static_budget_plan(settings):
    """Gated layers traced inside the block run the static-budget path.

    Args:
        settings: dict mapping `id(layer)` to the keyword arguments of
            `static_budget_dense` for that layer (`budget`, and optionally
            `input_blocks`, `input_budget`). Layers not in it run as usual.

    A gated layer reads its settings with `static_budget_settings(self)` at
    call time; `keras_condcomp.export` sets the plan while it traces the model.

    Examples:
        >>> with static_budget_plan({}):
        ...     static_budget_settings(object()) is None
        True
    """
    if not isinstance(settings, dict):
        raise ValueError(
            f"`settings` must be a dict keyed by id(layer). Received: settings={settings!r}"
        )
    previous = getattr(_plan, "settings", None)
    _plan.settings = settings
    try:
        yield
    finally:
        _plan.settings = previous


def static_budget_settings(layer):
    """The static-budget keyword arguments planned for `layer`, or None.

    Args:
        layer: a gated layer (looked up by `id(layer)`).

    Returns:
        The layer's dict of the innermost `static_budget_plan` in this
        thread, or None outside any plan or when the plan has none for it.

    Examples:
        >>> layer = object()
        >>> with static_budget_plan({id(layer): {"budget": 2}}):
        ...     static_budget_settings(layer)
        {'budget': 2}
        >>> static_budget_settings(layer) is None
        True
    """
    settings = getattr(_plan, "settings", None)
    if settings is None:
        return None
    return settings.get(id(layer))


def _identity(x):
    return x


def _check_positive(name, value, at_most, at_most_name):
    if not is_integer(value) or not 0 < value <= at_most:
        raise ValueError(
            f"`{name}` must be an int in [1, {at_most_name}={at_most}]. "
            f"Received: {name}={value!r}"
        )


def static_budget_dense(
    inputs, kernel, bias, block_mask, activation=None, *, budget,
    input_blocks=None, input_budget=None,
):
    """A gated dense layer computing `budget` blocks per example, static shapes.

    Args:
        inputs: `(batch, input_dim)` float tensor.
        kernel: `(input_dim, units)`.
        bias: `(units,)` or None.
        block_mask: `(batch, blocks)` scores of the blocks: a block is active
            when its score is > 0 (the threshold policy's 0/1 mask, or its
            logits). The `budget` largest scores are computed.
        activation: element-wise callable or None.
        budget: int in `[1, blocks]`, blocks computed per example.
        input_blocks: None, or the number of equal blocks of the input when
            at most `input_budget` of them are non-zero (the input is a
            gated layer's output): only those are read.
        input_budget: int in `[1, input_blocks]`, with `input_blocks`.

    Returns:
        `(batch, units)`: the threshold policy's masked dense output, the
        active blocks of an example beyond its `budget` largest scores being 0.

    Examples:
        >>> import numpy as np
        >>> from keras_condcomp.ops import masked_block_dense
        >>> x = np.random.rand(2, 6).astype("float32")
        >>> w = np.random.rand(6, 8).astype("float32")
        >>> logits = np.array([[1., -1., 2., -3.], [-1., -2., -3., 0.5]], "float32")
        >>> y = static_budget_dense(x, w, None, logits, budget=2)  # 1 and 2 active
        >>> reference = masked_block_dense(x, w, None, (logits > 0).astype("float32"))
        >>> bool(np.allclose(y, reference, atol=1e-6))
        True
    """
    inputs = tf.convert_to_tensor(inputs)
    dtype = inputs.dtype
    kernel = tf.convert_to_tensor(kernel, dtype)
    scores = tf.cast(tf.convert_to_tensor(block_mask), tf.float32)
    if kernel.shape.rank != 2:
        raise ValueError(
            f"`kernel` must have shape (input_dim, units). Received: kernel.shape={tuple(kernel.shape)}"
        )
    input_dim, units = kernel.shape
    blocks = scores.shape[-1]
    if inputs.shape.rank != 2 or inputs.shape[-1] != input_dim:
        raise ValueError(
            f"`inputs` must have shape (batch, {input_dim}) to match `kernel` "
            f"{tuple(kernel.shape)}. Received: inputs.shape={tuple(inputs.shape)}"
        )
    if blocks is None or units % blocks:
        raise ValueError(
            f"`block_mask` must have shape (batch, blocks) with blocks dividing "
            f"units={units}. Received: block_mask.shape={tuple(scores.shape)}"
        )
    check_mask_rows(scores, inputs)
    check_bias(bias, units)
    check_activation(activation)
    _check_positive("budget", budget, blocks, "blocks")
    if (input_blocks is None) != (input_budget is None):
        raise ValueError(
            "`input_blocks` and `input_budget` go together. Received: "
            f"input_blocks={input_blocks!r}, input_budget={input_budget!r}"
        )
    if input_blocks is not None:
        _check_positive("input_blocks", input_blocks, input_dim, "input_dim")
        if input_dim % input_blocks:
            raise ValueError(
                f"`input_blocks` must divide input_dim={input_dim}. "
                f"Received: input_blocks={input_blocks}"
            )
        _check_positive("input_budget", input_budget, input_blocks, "input_blocks")
        if input_budget == input_blocks:
            input_blocks = input_budget = None
    activation = activation or _identity
    if budget == blocks:
        # The masked product, the mask as a product (not `masked_block_dense`'s
        # select): XNNPACK takes a product, a select runs on LiteRT's slower
        # builtin kernel (see `static_budget_conv2d`).
        outputs = tf.matmul(inputs, kernel)
        if bias is not None:
            outputs = outputs + tf.cast(bias, dtype)
        keep = expand_block_mask(tf.cast(scores > 0, dtype), units)
        return activation(outputs) * keep
    block_size = units // blocks

    # Only reshapes with -1 depend on the batch size: a dynamic batch adds no
    # shape arithmetic to the exported graph. Selections by index that need
    # per-example offsets are products with one-hot matrices (exact: the
    # other terms are 0).
    values, chosen = tf.math.top_k(scores, k=budget)  # (batch, budget)
    # The chosen tiles are gathered transposed, as the rows of a
    # `(budget * block_size, in)` matrix per example, and multiply the input
    # as `weights @ input`: the gathered weights are the streamed operand and
    # the input vector the packed one (a runtime packs the second operand of
    # a product whose weights are not constant: packing the gathered weights
    # would copy them once more). A static batch of 1 (the LiteRT default)
    # gives one FULLY_CONNECTED op.
    if input_blocks is None:
        in_count, in_size = 1, input_dim
        rows = inputs
        # (blocks, block_size, input_dim): a folded constant for a constant kernel.
        tiles = tf.transpose(tf.reshape(kernel, [input_dim, blocks, block_size]), [1, 2, 0])
    else:
        in_count, in_size = input_budget, input_dim // input_blocks
        by_block = tf.reshape(inputs, [-1, input_blocks, in_size])
        _, used = tf.math.top_k(tf.reduce_max(tf.abs(by_block), axis=-1), k=input_budget)
        # (batch, input_budget, in_size): the input blocks that may be non-zero.
        rows = tf.matmul(tf.one_hot(used, input_blocks, dtype=dtype), by_block)
        # Tile (output block j, input block i), transposed, at j * input_blocks + i.
        tiles = tf.reshape(
            tf.transpose(
                tf.reshape(kernel, [input_blocks, in_size, blocks, block_size]), [2, 0, 3, 1]
            ),
            [blocks * input_blocks, block_size, in_size],
        )
        # expand_dims, not `[:, :, None]`: that exports as two ops.
        pairs = tf.expand_dims(chosen * input_blocks, 2) + tf.expand_dims(used, 1)
        weights = tf.transpose(tf.gather(tiles, pairs), [0, 1, 3, 2, 4])
    columns = in_count * in_size
    if input_blocks is None:
        # One gather and product per chosen block: each block's tiles are
        # still in cache when the product reads them.
        single = inputs.shape[0] == 1
        parts = []
        for k in range(budget):
            if single:
                tile = tf.gather(tiles, chosen[0, k])  # (block_size, input_dim)
                parts.append(tf.matmul(tile, rows, transpose_b=True))  # (block_size, 1)
            else:
                tile = tf.gather(tiles, chosen[:, k])  # (batch, block_size, input_dim)
                parts.append(tf.matmul(tile, tf.reshape(rows, [-1, input_dim, 1])))
        outputs = tf.concat(parts, axis=0 if single else 1)
    elif inputs.shape[0] == 1:
        weights = tf.reshape(weights, [budget * block_size, columns])
        outputs = tf.matmul(weights, tf.reshape(rows, [1, columns]), transpose_b=True)
    else:
        weights = tf.reshape(weights, [-1, budget * block_size, columns])
        outputs = tf.matmul(weights, tf.reshape(rows, [-1, columns, 1]))
    outputs = tf.reshape(outputs, [-1, budget, block_size])
    if bias is not None:
        bias = tf.reshape(tf.convert_to_tensor(bias, dtype), [blocks, block_size])
        outputs = outputs + tf.gather(bias, chosen)
    outputs = activation(outputs)
    # (batch, blocks, budget): puts chosen block k at its place, 0 if inactive.
    keep = tf.cast(values > 0, dtype)
    place = tf.one_hot(chosen, blocks, axis=1, dtype=dtype) * tf.expand_dims(keep, 1)
    return tf.reshape(tf.matmul(place, outputs), [-1, units])
