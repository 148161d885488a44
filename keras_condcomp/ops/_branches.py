"""Branches of the execution engines' per-call choices, called rather than inlined."""

import tensorflow as tf


def called_branch(branch):
    """`branch` (a callable of no arguments) as one function-call op.

    TensorFlow inlines the branches of `tf.cond` and `tf.switch_case` into
    the graph, and an untaken branch still costs every one of its ops at run
    time: the batched paths' graphs (a loop over the groups, a `map_fn`)
    added 0.1-0.4 ms to each gated convolution of `"auto"` at batch 1,
    where they never run, beside a 1.5 ms convolution. Called as a function
    that is not inlined, a branch costs one op when it is not taken.

    Examples:
        >>> import tensorflow as tf
        >>> @tf.function
        ... def pick(x):
        ...     return tf.cond(x > 0, called_branch(lambda: x * 2), lambda: -x)
        >>> float(pick(tf.constant(3.0))), float(pick(tf.constant(-1.0)))
        (6.0, 1.0)
    """
    return tf.function(branch, autograph=False, experimental_attributes={"_noinline": True})
