"""The export path of a gated dense layer: a fixed budget of blocks per example.

Edge runtimes want static shapes: the LiteRT XNNPACK delegate leaves alone
every op that touches a dynamic-size tensor, and `tf.where` makes one. This
path keeps every shape static and still reads only the weights of the blocks
it computes:

1. `top_k(mask, budget)`: the `budget` blocks of largest score per example
   (the 0/1 threshold mask, or the policy logits); a chosen block of score
   `<= 0` is inactive, so its output is multiplied by 0.
2. The kernel is stored block-major, `(blocks, input_dim, block_size)` (the
   transpose is a constant, folded at conversion: the weights are stored
   once), and one `gather` copies the `budget` chosen tiles of each example.
3. One batched matrix product `(batch, budget, 1, input_dim) x (batch,
   budget, input_dim, block_size)`, bias, activation, then `scatter_nd` puts
   the blocks back in a `(batch, units)` output whose other blocks are 0.

Input sparsity (Bengio et al.'s `M_in`): when the input comes from a gated
layer whose output has at most `input_budget` non-zero blocks of
`input_dim // input_blocks` units, the layer keeps only the `input_budget`
input blocks with the largest magnitude (`top_k` of the per-block maximum
absolute value, which finds every non-zero block) and gathers only the
`(output block, input block)` weight tiles it multiplies. That is exact: the
blocks it leaves out are 0.

The result equals the threshold policy's `masked_block_dense` whenever no
example has more than `budget` active blocks. An example with more loses the
active blocks of smallest score (with a 0/1 mask: of highest index), dropped
as in capacity-based mixture-of-experts: choose the budget from measured
block counts (`keras_condcomp.export.active_block_counts`) to make that rare.
"""

import contextlib
import threading

import tensorflow as tf

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

    Example:

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
    """The static-budget keyword arguments planned for `layer`, or None."""
    settings = getattr(_plan, "settings", None)
    if settings is None:
        return None
    return settings.get(id(layer))


def _identity(x):
    return x


def _check_positive(name, value, at_most, at_most_name):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= at_most:
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

    Example:

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
    block_size = units // blocks
    batch = inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]

    values, chosen = tf.math.top_k(scores, k=budget)  # (batch, budget)
    keep = tf.cast(values > 0, dtype)
    # A static batch of 1 (the LiteRT default) uses one matrix-vector product
    # with the gathered tiles as its (budget * block_size, in) weights: a
    # FULLY_CONNECTED op. Other batches use one batched product per example.
    single = inputs.shape[0] == 1
    if input_blocks is None:
        in_count, in_size = 1, input_dim
        rows = inputs
        # Block-major tiles: a folded constant for a constant kernel.
        tiles = tf.reshape(kernel, [1, input_dim, blocks, block_size])
        pairs = chosen
    else:
        in_count, in_size = input_budget, input_dim // input_blocks
        by_block = tf.reshape(inputs, [batch, input_blocks, in_size])
        _, used = tf.math.top_k(tf.reduce_max(tf.abs(by_block), axis=-1), k=input_budget)
        offsets = tf.range(batch)[:, None] * input_blocks
        rows = tf.gather(
            tf.reshape(inputs, [batch * input_blocks, in_size]), used + offsets
        )  # (batch, input_budget, in_size)
        tiles = tf.reshape(kernel, [input_blocks, in_size, blocks, block_size])
        # Tile (output block j, input block i) at j * input_blocks + i.
        pairs = chosen[:, :, None] * input_blocks + used[:, None, :]
    if single:
        # (blocks * in blocks, block_size, in_size): rows of FULLY_CONNECTED weights.
        tiles = tf.reshape(
            tf.transpose(tiles, [2, 0, 3, 1]), [-1, block_size, in_size]
        )
        if input_blocks is None:
            weights = tf.gather(tiles, pairs[0])  # (budget, block_size, input_dim)
        else:
            weights = tf.transpose(
                tf.gather(tiles, tf.reshape(pairs, [budget, in_count])), [0, 2, 1, 3]
            )
        weights = tf.reshape(weights, [budget * block_size, in_count * in_size])
        rows = tf.reshape(rows, [1, in_count * in_size])
        outputs = tf.matmul(rows, weights, transpose_b=True)
    else:
        # (blocks * in blocks, in_size, block_size).
        tiles = tf.reshape(tf.transpose(tiles, [2, 0, 1, 3]), [-1, in_size, block_size])
        weights = tf.reshape(
            tf.gather(tiles, pairs), [batch, budget, in_count * in_size, block_size]
        )
        rows = tf.reshape(rows, [batch, 1, 1, in_count * in_size])
        outputs = tf.matmul(rows, weights)
    outputs = tf.reshape(outputs, [batch, budget, block_size])
    if bias is not None:
        bias = tf.reshape(tf.convert_to_tensor(bias, dtype), [blocks, block_size])
        outputs = outputs + tf.gather(bias, chosen)
    outputs = activation(outputs) * keep[:, :, None]
    examples = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(chosen))
    indices = tf.stack([examples, chosen], axis=-1)  # (batch, budget, 2)
    outputs = tf.scatter_nd(indices, outputs, tf.stack([batch, blocks, block_size]))
    return tf.reshape(outputs, [batch, units])
