"""The thread count the execution engines' rules read when a graph is traced."""

import functools
import os

import tensorflow as tf


def intra_op_threads():
    """The threads one TensorFlow op may use: `tf.config.threading`'s
    intra-op setting, or when left at 0 (the default) the CPUs this process
    may run on, as TensorFlow then uses.

    Examples:
        >>> intra_op_threads() >= 1
        True
    """
    return _threads(tf.config.threading.get_intra_op_parallelism_threads())


def _threads(configured):
    """`configured`, or for 0 the CPUs this process may run on."""
    if configured:
        return configured
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.cache
def _setting_once_running():
    # TensorFlow refuses to change it once it has run an op.
    return tf.config.threading.get_intra_op_parallelism_threads()


def intra_op_threads_key():
    """`intra_op_threads()` for the caches of traced graphs, without its cost
    (about 9 us a call for TensorFlow's setting, read here once): called only
    after TensorFlow has run an op, when the setting can no longer change."""
    return _threads(_setting_once_running())
