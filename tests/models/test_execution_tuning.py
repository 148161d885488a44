import keras
import numpy as np
import pytest

from keras_condcomp.layers import GatedConv2D, GatedDense
from keras_condcomp.models import gated_layer_inputs, gated_layers, tune_execution
from keras_condcomp.ops import CONV2D_EXECUTION_PATHS, EXECUTION_PATHS


def _mixed_model():
    inputs = keras.Input((8, 8, 3))
    hidden = GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", name="conv")(inputs)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    hidden = GatedDense(16, blocks=4, activation="relu", name="gated_dense")(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def test_tune_execution_sets_a_measured_path_per_layer_and_keeps_outputs(rng, tmp_path):
    model = _mixed_model()
    x = rng.random((12, 8, 8, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    report = tune_execution(model, x, batch_size=2, repeats=2)
    candidates = {
        "conv": set(CONV2D_EXECUTION_PATHS) - {"auto", "static_capacity"},
        "gated_dense": set(EXECUTION_PATHS) - {"auto", "static_capacity"},
    }
    for name, timed in candidates.items():
        layer = model.get_layer(name)
        assert set(report[name]["seconds"]) == timed
        assert report[name]["execution"] == layer.execution
        assert layer.execution == min(report[name]["seconds"], key=report[name]["seconds"].get)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-5)
    path = str(tmp_path / "tuned.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for name in candidates:
        assert loaded.get_layer(name).execution == model.get_layer(name).execution


def test_without_native_kernels_native_is_no_candidate(rng, tensorflow_paths):
    # Forced "native" would raise there; the other paths are timed.
    model = _mixed_model()
    x = rng.random((4, 8, 8, 3)).astype("float32")
    report = tune_execution(model, x, batch_size=2, repeats=1)
    assert set(report["gated_dense"]["seconds"]) == (
        set(EXECUTION_PATHS) - {"auto", "static_capacity", "native"})


def test_gated_layer_inputs_are_what_each_gated_layer_sees(rng):
    model = _mixed_model()
    x = rng.random((5, 8, 8, 3)).astype("float32")
    conv_input, dense_input = gated_layer_inputs(model, x)
    np.testing.assert_array_equal(conv_input, x)
    pooled = keras.Model(model.inputs, model.get_layer("gated_dense").input)
    np.testing.assert_allclose(dense_input, pooled.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 1.5}, "batch_size=1.5"),
        ({"repeats": -1}, "repeats=-1"),
        ({"batch_size": 20}, "at least batch_size=20 examples. Received: 12"),
    ],
)
def test_tune_execution_errors_name_the_argument(rng, kwargs, message):
    model = _mixed_model()
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        tune_execution(model, rng.random((12, 8, 8, 3)).astype("float32"), **kwargs)


def test_an_x_of_another_shape_is_refused_and_leaves_every_path_as_it_was(rng):
    model = _mixed_model()
    before = [layer.execution for layer in gated_layers(model)]
    with pytest.raises(ValueError, match=r"`x` must have shape \(examples, 8, 8, 3\).*x\.shape="):
        tune_execution(model, rng.random((12, 8, 8, 4)).astype("float32"), repeats=1)
    assert [layer.execution for layer in gated_layers(model)] == before
    with pytest.raises(ValueError, match="model='m'"):
        tune_execution("m", rng.random((12, 8, 8, 3)))


def test_a_failed_timing_gives_every_layer_its_path_back(rng, monkeypatch):
    import keras_condcomp.speed

    model = _mixed_model()
    before = [layer.execution for layer in gated_layers(model)]

    def fail(*args, **kwargs):
        raise RuntimeError("timing failed")

    monkeypatch.setattr(keras_condcomp.speed, "median_latencies", fail)
    with pytest.raises(RuntimeError, match="timing failed"):
        tune_execution(model, rng.random((12, 8, 8, 3)).astype("float32"), repeats=1)
    assert [layer.execution for layer in gated_layers(model)] == before


def test_tune_execution_needs_gated_layers_and_one_input(rng):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="plain")
    with pytest.raises(ValueError, match="'plain' has no gated layers"):
        tune_execution(model, rng.random((4, 4)).astype("float32"))
    a, b = keras.Input((4,)), keras.Input((4,))
    gated = GatedDense(8, blocks=2)(keras.layers.Add()([a, b]))
    two = keras.Model([a, b], gated, name="two")
    with pytest.raises(ValueError, match="'two' with 2 inputs"):
        tune_execution(two, [rng.random((4, 4))] * 2)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.gated = GatedDense(8, blocks=2)

        def call(self, x):
            return self.gated(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="'sub' is subclassed"):
        tune_execution(subclassed, rng.random((4, 4)))


def test_a_model_of_two_outputs_is_tuned(rng):
    inputs = keras.Input((4,))
    gated = GatedDense(8, blocks=2, name="g")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3)(gated), keras.layers.Dense(2)(gated)])
    report = tune_execution(model, rng.random((4, 4)).astype("float32"), batch_size=2, repeats=2)
    assert report["g"]["execution"] == model.get_layer("g").execution
