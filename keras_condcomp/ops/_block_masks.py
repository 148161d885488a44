"""Checks of the 0/1 block masks that the skipping engines take."""

import numpy as np
import tensorflow as tf


def check_zero_one(block_mask):
    """Raises `ValueError` when an eager `block_mask` holds a value other
    than 0 and 1.

    The engines' paths disagree on such values: the dense fallback
    multiplies by the mask, the skipping paths only test it against 0, so a
    mask of probabilities would give outputs that depend on the path. Only
    eager values are checked: in a graph (a model's `tf.function`) a check
    would be an op that every call pays for.

    >>> check_zero_one(tf.constant([[0.0, 1.0]]))
    >>> check_zero_one(tf.constant([[1.0, 0.0], [0.0, 0.5]]))
    Traceback (most recent call last):
    ...
    ValueError: `block_mask` must hold only 0 (a skipped block) and 1 (an active one). Received: block_mask[1, 1]=0.5
    """
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
