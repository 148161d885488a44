"""Arguments of the public API: numpy numbers taken as Python ones, bad
values refused by name."""

import keras
import numpy as np
import pytest

from keras_condcomp.callbacks import ComputeMonitor
from keras_condcomp.export import active_block_counts, block_budgets
from keras_condcomp.layers import GatedDense
from keras_condcomp.models import gated_layer_inputs
from keras_condcomp.profiling import profile_macs


@pytest.fixture(scope="module")
def model():
    inputs = keras.Input((8,), name="features")
    hidden = GatedDense(16, blocks=4, activation="relu", name="g")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


@pytest.fixture(scope="module")
def two_inputs():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    return keras.Model([a, b], GatedDense(8, blocks=2, name="g")(joined))


def test_numpy_numbers_are_taken(model):
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    assert ComputeMonitor(x, batch_size=np.int64(2)).batch_size == 2
    by_density = profile_macs(model, {"g": np.float32(0.25)})
    assert by_density.conditional_macs == profile_macs(model, {"g": 0.25}).conditional_macs
    assert profile_macs(model, x=x, batch_size=np.int64(2)).dense_macs > 0
    assert len(gated_layer_inputs(model, x, batch_size=np.int64(2))[0]) == 5


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, "2", True])
def test_batch_sizes_are_checked(model, batch_size):
    x = np.zeros((2, 8), "float32")
    for call in (
        lambda: gated_layer_inputs(model, x, batch_size=batch_size),
        lambda: profile_macs(model, x=x, batch_size=batch_size),
        lambda: ComputeMonitor(x, batch_size=batch_size),
        lambda: active_block_counts(model, x, batch_size=batch_size),
    ):
        with pytest.raises(ValueError, match=f"batch_size={batch_size!r}"):
            call()


def test_active_block_counts_names_its_own_argument(model):
    with pytest.raises(ValueError, match=r"`data` must be examples of shape \(n, 8\)"):
        active_block_counts(model, np.zeros((2, 7)))
    with pytest.raises(ValueError, match=r"`representative_data` must be examples"):
        block_budgets(model, representative_data=np.zeros((2, 7)))


def test_inputs_by_name(two_inputs):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    by_name = active_block_counts(two_inputs, {"b": b, "a": a})
    np.testing.assert_array_equal(by_name["g"], active_block_counts(two_inputs, [a, b])["g"])
    assert block_budgets(two_inputs, representative_data={"a": a, "b": b})["g"] >= 1
    with pytest.raises(ValueError, match=r"by name: \['a', 'b'\]. Received keys: \['a', 'c'\]"):
        active_block_counts(two_inputs, {"a": a, "c": b})


def test_runtime_thread_counts_are_checked(tmp_path, model):
    from keras_condcomp.export import litert_predict, onnx_predict
    from keras_condcomp.tuning import print_pareto_front

    x = np.zeros((2, 8), "float32")
    with pytest.raises(ValueError, match="num_threads=-1"):
        onnx_predict(tmp_path / "absent.onnx", x, num_threads=-1)
    with pytest.raises(ValueError, match="num_threads=0"):
        litert_predict(tmp_path / "absent.tflite", x, num_threads=0)
    with pytest.raises(ValueError, match="plot_path=3"):
        print_pareto_front(None, plot_path=3)
