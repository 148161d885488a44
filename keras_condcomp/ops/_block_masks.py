"""Checks of the block masks that the skipping engines take."""

import numpy as np
import tensorflow as tf


def check_mask_rows(block_mask, inputs, broadcast=False):
    """Raises `ValueError` unless `block_mask` has one row per example of
    `inputs` (or, with `broadcast`, one row for all), where both batch sizes
    are known."""
    rows, examples = block_mask.shape[0], inputs.shape[0]
    if rows is not None and examples is not None and rows != examples and not (
        broadcast and rows == 1
    ):
        raise ValueError(
            "`block_mask` must have one row per example of `inputs`"
            f"{' (or one row for all)' if broadcast else ''}. Received: "
            f"block_mask.shape={tuple(block_mask.shape)}, inputs.shape={tuple(inputs.shape)}"
        )


def check_block_mask(block_mask, inputs):
    """Raises `ValueError` unless `block_mask` has one row per example of
    `inputs` (where both batch sizes are known) and, called eagerly, holds
    only 0 and 1.

    The engines' paths disagree on other values: the dense fallback
    multiplies by the mask, the skipping paths only test it against 0, so a
    mask of probabilities would give outputs that depend on the path. Only
    eager values are checked: in a graph (a model's `tf.function`) a check
    would be an op that every call pays for.

    >>> x = tf.zeros([2, 3])
    >>> check_block_mask(tf.constant([[0.0, 1.0], [1.0, 1.0]]), x)
    >>> check_block_mask(tf.constant([[1.0, 0.0], [0.0, 0.5]]), x)
    Traceback (most recent call last):
    ...
    ValueError: `block_mask` must hold only 0 (a skipped block) and 1 (an active one). Received: block_mask[1, 1]=0.5
    >>> check_block_mask(tf.constant([[1.0, 0.0]]), x)
    Traceback (most recent call last):
    ...
    ValueError: `block_mask` must have one row per example of `inputs`. Received: block_mask.shape=(1, 2), inputs.shape=(2, 3)
    """
    check_mask_rows(block_mask, inputs)
    if not tf.executing_eagerly():
        return
    values = block_mask.numpy()
    bad = np.argwhere((values != 0) & (values != 1))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise ValueError(
            "`block_mask` must hold only 0 (a skipped block) and 1 (an active one). "
            f"Received: block_mask[{', '.join(map(str, where))}]={float(values[where])}"
        )
