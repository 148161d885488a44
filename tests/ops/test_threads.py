import os

import tensorflow as tf

from keras_condcomp.ops._threads import intra_op_threads


def test_intra_op_threads_reads_tensorflows_setting(monkeypatch):
    monkeypatch.setattr(tf.config.threading, "get_intra_op_parallelism_threads", lambda: 3)
    assert intra_op_threads() == 3
    # 0, TensorFlow's default: every CPU the process may run on.
    monkeypatch.setattr(tf.config.threading, "get_intra_op_parallelism_threads", lambda: 0)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert intra_op_threads() == available


def test_the_cache_key_of_the_thread_count_is_the_thread_count():
    from keras_condcomp.ops._threads import intra_op_threads, intra_op_threads_key

    assert intra_op_threads_key() == intra_op_threads()
