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

