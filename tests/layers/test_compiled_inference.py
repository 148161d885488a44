"""Eager inference calls of gated layers run as one compiled graph per layer."""

import contextlib
import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_condcomp.layers.gated_conv2d as gated_conv2d_module
import keras_condcomp.layers.gated_dense as gated_dense_module
from keras_condcomp.layers import GatedConv2D, GatedDense
from keras_condcomp.ops import cost_constants, forced_execution, set_cost_constants

# The module (the package's attribute of that name is its function).
conv_engine = importlib.import_module("keras_condcomp.ops.block_sparse_conv2d")


def graphs(layer):
    return layer.__dict__.get("_compiled_inference_graphs", {})


def op_by_op(layer, x, monkeypatch):
    """The layer's eager call as written, op by op (the compiled graph off)."""
    module = gated_conv2d_module if isinstance(layer, GatedConv2D) else gated_dense_module
    with monkeypatch.context() as patch:
        patch.setattr(module, "compiled_inference_applies", lambda layer, training: False)
        return layer(x).numpy()


def random_policy(layer, rng):
    """Policy weights giving roughly half the blocks, differently per example."""
    kernel = layer.policy.kernel
    kernel.assign(rng.normal(size=kernel.shape).astype("float32"))
    layer.policy.bias.assign(np.zeros(layer.blocks, "float32"))


def dense_case(rng):
    layer = GatedDense(48, blocks=6, activation="relu")
    layer.build((None, 20))
    return layer, lambda batch: rng.normal(size=(batch, 20)).astype("float32")


def conv_case(rng):
    layer = GatedConv2D(16, 3, blocks=4, padding="same", strides=2, activation="relu")
    layer.build((None, 9, 9, 32))
    return layer, lambda batch: rng.normal(size=(batch, 9, 9, 32)).astype("float32")


@pytest.mark.parametrize("case", [dense_case, conv_case], ids=["dense", "conv2d"])
def test_eager_call_is_compiled_once_and_equals_the_op_by_op_call(rng, case, monkeypatch):
    layer, inputs = case(rng)
    random_policy(layer, rng)
    for batch in (1, 7, 2):
        x = inputs(batch)
        mask = layer.block_mask(x).numpy()
        assert 0 < mask.mean() < 1
        np.testing.assert_allclose(layer(x).numpy(), op_by_op(layer, x, monkeypatch), atol=1e-5)
    # One graph for every batch size.
    assert len(graphs(layer)) == 1


def test_reads_the_current_weights(rng):
    layer, inputs = dense_case(rng)
    x = inputs(3)
    layer(x)
    layer.block_kernel.assign(2 * layer.block_kernel)
    layer.bias.assign(np.ones(48, "float32"))
    expected = keras.activations.relu(x @ layer.kernel.numpy() + 1.0).numpy()
    expected *= np.repeat(layer.block_mask(x).numpy(), 8, axis=1)
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)
    assert len(graphs(layer)) == 1


def test_execution_path_in_effect_selects_the_graph(rng):
    layer, inputs = dense_case(rng)
    x = inputs(4)
    expected = layer(x).numpy()
    with forced_execution("grouped"):
        np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)
    layer.execution = "masked"
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)
    assert {key[:2] for key in graphs(layer)} == {
        (None, "auto"), ("grouped", "auto"), (None, "masked")
    }


@contextlib.contextmanager
def other_auto_settings(layer):
    """Other settings of the engine's `"auto"` rules, restored on exit."""
    if isinstance(layer, GatedConv2D):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(conv_engine, "AUTO_MAX_FRACTION", 0.01)
            yield
        return
    before = cost_constants()
    set_cost_constants(overhead=1.0)
    try:
        yield
    finally:
        set_cost_constants(**before)


@pytest.mark.parametrize("case", [dense_case, conv_case], ids=["dense", "conv2d"])
def test_auto_settings_changed_since_a_call_reach_the_next_call(rng, case):
    layer, inputs = case(rng)
    random_policy(layer, rng)
    x = inputs(2)
    expected = layer(x).numpy()
    with other_auto_settings(layer):
        np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)
    assert len(graphs(layer)) == 2  # traced again for the new settings
    layer(x)
    assert len(graphs(layer)) == 2  # and the first graph serves the old ones


def test_stateless_call_uses_the_values_given(rng):
    layer, inputs = dense_case(rng)
    x = inputs(5)
    layer(x)
    non_trainable = [v.numpy() for v in layer.non_trainable_variables]
    for scale in (2.0, -3.0):
        trainable = [scale * v.numpy() for v in layer.trainable_variables]
        outputs, _ = layer.stateless_call(trainable, non_trainable, x)
        kernel, bias, policy_kernel, policy_bias = trainable
        mask = np.repeat((x @ policy_kernel + policy_bias > 0).astype("float32"), 8, axis=1)
        kernel = kernel.transpose(1, 0, 2).reshape(20, 48)
        expected = np.maximum(x @ kernel + bias, 0) * mask
        np.testing.assert_allclose(outputs.numpy(), expected, atol=1e-4)
        # The layer's own variables are untouched.
        assert not np.allclose(layer(x).numpy(), outputs.numpy())


@pytest.mark.parametrize("setting", ["training", "sample", "mixed_precision"])
def test_training_sampling_and_mixed_precision_run_op_by_op(rng, setting):
    if setting == "mixed_precision":
        keras.config.set_dtype_policy("mixed_float16")
    inference = "sample" if setting == "sample" else "threshold"
    layer = GatedDense(8, blocks=4, activation="relu", inference=inference, seed=3)
    x = rng.normal(size=(64, 3)).astype("float32")
    if setting == "training":
        with pytest.warns(UserWarning):
            layer(x, training=True)
    elif setting == "mixed_precision":
        y = layer(x)
        assert y.dtype == "float16"
        expected = np.maximum(x @ layer.kernel.numpy() + layer.bias.numpy(), 0)
        expected *= np.repeat(layer.block_mask(x).numpy(), 2, axis=1)
        np.testing.assert_allclose(y.numpy().astype("float32"), expected, atol=2e-2, rtol=2e-2)
    else:
        # Fresh draws on every call: the seed state advances.
        first, second = layer(x).numpy(), layer(x).numpy()
        assert not np.array_equal(first != 0, second != 0)
    assert not graphs(layer)


def test_loaded_model_eager_call_equals_its_graph_call(rng, tmp_path):
    inputs = keras.Input((8, 8, 3))
    hidden = GatedConv2D(32, 3, blocks=4, padding="same", activation="relu")(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = GatedConv2D(32, 3, blocks=4, activation="relu")(hidden)
    hidden = GatedDense(24, blocks=4, activation="relu")(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, keras.layers.Dense(5)(hidden))
    for layer in model.layers:
        if hasattr(layer, "policy"):
            random_policy(layer, rng)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    in_graph = tf.function(lambda x: loaded(x, training=False))
    for batch in (1, 6):
        x = rng.normal(size=(batch, 8, 8, 3)).astype("float32")
        np.testing.assert_allclose(loaded(x).numpy(), in_graph(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)
    assert all(graphs(layer) for layer in loaded.layers if hasattr(layer, "policy"))
