import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 to /dev/null. TensorFlow's C++ start-up lines
    (oneDNN, CUDA stubs) ignore TF_CPP_MIN_LOG_LEVEL; pytest would print
    them after its summary, which must be the suite's last line."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_stderr():
    import keras
    import tensorflow as tf

    # Two logical CPUs, so MirroredStrategy can be tested on a CPU-only
    # machine. This must happen before TensorFlow initialises its devices.
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_MNIST = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "mnist-t10k-split"
)


@pytest.fixture(autouse=True)
def _clean_keras_state():
    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def digits():
    from keras_condcomp import data

    return data.load_digits()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def speed_not_measured(monkeypatch):
    """`train`'s speed measurement (a fresh TensorFlow process, 10-20 s)
    replaced by speedups of 1, for tests of something else."""
    from keras_condcomp import speed

    def measure_models_speed(gated_path, dense_path, x, batch_sizes, threads=1, repeats=100):
        return {
            str(batch_size): {"gated_seconds": 1.0, "dense_seconds": 1.0, "speedup": 1.0,
                              "tuned_seconds": 1.0, "tuned_speedup": 1.0, "tuned_execution": {}}
            for batch_size in batch_sizes
        }

    monkeypatch.setattr(speed, "measure_models_speed", measure_models_speed)


@pytest.fixture
def tensorflow_paths():
    """The engine without the native kernels: `"auto"` on its TensorFlow
    paths, as where no compiler builds them."""
    from keras_condcomp.ops.native_kernels import native_kernels_disabled

    with native_kernels_disabled("turned off for this test"):
        yield
