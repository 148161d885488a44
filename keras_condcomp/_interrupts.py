"""SIGINT / SIGTERM for the `keras-condcomp` command, stopped where it is safe.

Python raises a signal's `KeyboardInterrupt` wherever the main thread is. Inside
TensorFlow (tracing, a Python callback of native code, a finaliser, loading
an op library) that exception can be swallowed, so the job runs on, or turned
into an unrelated `TypeError` / `SystemError`. So while a model is built,
trained, evaluated or predicts, where nearly all of a job's time in this
process goes, a signal only marks the stop, raised once the model is built or
at the next batch end. Elsewhere (saving, exporting, waiting for the speed
measurement's process) it is raised at once; a second signal always is.
"""

import contextlib
import signal

import keras

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"pending": None, "deferring": 0}


def pending():
    """The name of the signal received (`"SIGTERM"`), or None."""
    return _state["pending"]


def _raise_pending():
    raise KeyboardInterrupt(_state["pending"])


def raise_if_pending():
    """Raises the `KeyboardInterrupt` of a signal received and deferred."""
    if _state["pending"]:
        _raise_pending()


def _on_signal(signum, frame):
    again = _state["pending"] is not None
    _state["pending"] = signal.Signals(signum).name
    if again or not _state["deferring"]:
        _raise_pending()


def install():
    """Makes SIGINT and SIGTERM raise `KeyboardInterrupt(signal name)`,
    deferred to the next batch end inside `stops_at_batch_ends()`."""
    _state["pending"] = None
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


class _StopAtBatchEnd(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        raise_if_pending()

    on_test_batch_end = on_train_batch_end
    on_predict_batch_end = on_train_batch_end


@contextlib.contextmanager
def stops_at_batch_ends():
    """Yields a callback for `fit`, `evaluate` or `predict`; within the block
    a signal (installed by `install()`) is raised by that callback at the next
    batch end, and at the block's end at the latest."""
    _state["deferring"] += 1
    try:
        yield _StopAtBatchEnd()
    finally:
        _state["deferring"] -= 1
    raise_if_pending()
