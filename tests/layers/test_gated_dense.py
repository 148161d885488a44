import json

import keras
import numpy as np
import pytest

from keras_condcomp.layers import BernoulliPolicy, GatedDense
from keras_condcomp.ops import EXECUTION_PATHS, masked_block_dense, to_block_kernel


def all_open(layer):
    layer.policy.bias.assign(np.full(layer.blocks, 50.0, "float32"))


def test_equals_dense_with_every_block_open(rng):
    x = rng.normal(size=(5, 12)).astype("float32")
    dense = keras.layers.Dense(16, activation="tanh")
    expected = dense(x)
    gated = GatedDense.from_dense(dense, blocks=4)
    all_open(gated)
    for training in (False, True):
        np.testing.assert_allclose(gated(x, training=training), expected, atol=1e-6)


def test_inactive_blocks_are_exactly_zero_and_mask_is_threshold(rng):
    layer = GatedDense(32, blocks=8, activation="sigmoid")
    x = rng.normal(size=(20, 6)).astype("float32")
    y = layer(x).numpy().reshape(20, 8, 4)
    sigma = layer.block_probabilities(x).numpy()
    mask = layer.block_mask(x).numpy()
    np.testing.assert_array_equal(mask, (sigma > 0.5).astype("float32"))
    assert 0 < mask.mean() < 1
    assert np.all(y[mask == 0] == 0)
    assert np.all(y[mask == 1] > 0)


@pytest.mark.parametrize("execution", EXECUTION_PATHS)
def test_every_execution_path_matches_masked_reference(rng, execution):
    layer = GatedDense(24, blocks=6, activation="relu", execution=execution)
    for batch in (1, 2, 7, 64):
        x = rng.normal(size=(batch, 10)).astype("float32")
        mask = layer.block_mask(x)
        expected = masked_block_dense(x, layer.kernel, layer.bias, mask, layer.activation)
        np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_sampled_masks_follow_probabilities(rng):
    layer = GatedDense(8, blocks=4, inference="sample", seed=1)
    x = np.repeat(rng.normal(size=(1, 3)).astype("float32"), 4000, axis=0)
    sigma = layer.block_probabilities(x[:1]).numpy()[0]
    frequency = layer.block_mask(x, training=True).numpy().mean(axis=0)
    np.testing.assert_allclose(frequency, sigma, atol=0.03)
    # inference="sample" samples outside training too
    assert 0 < layer.block_mask(x, training=False).numpy().std(axis=0).max()


def test_regularization_added_in_training_only(rng):
    layer = GatedDense(8, blocks=4, target_density=0.25, sparsity_weight=2.0, variance_weight=1.0)
    x = rng.normal(size=(6, 3)).astype("float32")
    layer(x, training=False)
    assert not layer.losses
    with pytest.warns(UserWarning, match="outside keras_condcomp.PolicyGradientModel"):
        layer(x, training=True)
    expected = layer.gating_regularization(layer.block_probabilities(x))
    np.testing.assert_allclose(layer.losses[0], expected, rtol=1e-6)


def test_config_round_trip():
    layer = GatedDense(
        16, blocks=4, activation="relu", target_density=0.3, sparsity_weight=3.0,
        variance_weight=0.5, inference="sample", execution="grouped", seed=9,
        kernel_regularizer="l2", policy_regularizer="l2",
    )
    clone = GatedDense.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert isinstance(clone.policy, BernoulliPolicy)


def test_keras_save_load_gives_identical_outputs(rng, tmp_path):
    inputs = keras.Input((10,))
    hidden = GatedDense(32, blocks=4, activation="relu", target_density=0.5)(inputs)
    hidden = GatedDense(16, blocks=4, activation="relu")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x = rng.normal(size=(9, 10)).astype("float32")
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_shapes_and_dtypes(rng, policy):
    keras.config.set_dtype_policy(policy)
    layer = GatedDense(12, blocks=3, activation="relu")
    x = rng.normal(size=(4, 5)).astype("float32")
    y = layer(x)
    assert tuple(y.shape) == (4, 12)
    assert y.dtype == layer.compute_dtype
    assert layer.block_probabilities(x).dtype == "float32"
    assert layer.compute_output_shape((None, 5)) == (None, 12)
    assert layer.kernel.shape == (5, 12) and layer.policy.kernel.shape == (5, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"units": 10, "blocks": 3}, "units=10, blocks=3"),
        ({"units": 0, "blocks": 1}, "units=0"),
        ({"units": 8, "blocks": 0}, "blocks=0"),
        ({"units": 8, "blocks": 2, "target_density": 0.0}, "target_density=0.0"),
        ({"units": 8, "blocks": 2, "target_density": 1.5}, "target_density=1.5"),
        ({"units": 8, "blocks": 2, "sparsity_weight": -1}, "sparsity_weight=-1"),
        ({"units": 8, "blocks": 2, "sparsity_weight": float("nan")}, "sparsity_weight=nan"),
        ({"units": 8, "blocks": 2, "variance_weight": float("inf")}, "variance_weight=inf"),
        ({"units": 8, "blocks": 2, "example_sparsity_weight": float("nan")},
         "example_sparsity_weight=nan"),
        ({"units": 8, "blocks": 2, "target_density": float("nan")}, "target_density=nan"),
        ({"units": 8, "blocks": True}, "blocks=True"),
        ({"units": 8.0, "blocks": 2}, "units=8.0"),
        ({"units": 8, "blocks": 2, "activation": "bogus"}, "activation='bogus'"),
        ({"units": 8, "blocks": 2, "variance_weight": "x"}, "variance_weight='x'"),
        ({"units": 8, "blocks": 2, "inference": "mean"}, "inference='mean'"),
        ({"units": 8, "blocks": 2, "execution": "fast"}, "execution='fast'"),
        ({"units": 8, "blocks": 2, "activation": "softmax"}, "activation='softmax'"),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedDense(**kwargs)


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers(tmp_path):
    layer = GatedDense(
        np.int64(8), blocks=np.int32(2), target_density=np.float32(0.25),
        sparsity_weight=np.float64(2), variance_weight=np.int64(1),
        example_sparsity_weight=np.float32(0.5),
    )
    config = layer.get_config()
    expected = {"units": 8, "blocks": 2, "target_density": 0.25, "sparsity_weight": 2.0,
                "variance_weight": 1.0, "example_sparsity_weight": 0.5}
    for key, value in expected.items():
        assert config[key] == value and type(config[key]) is type(value), key
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")  # the config is JSON
    assert keras.saving.load_model(tmp_path / "m.keras").layers[1].units == 8


def test_bad_input_shape_is_refused(rng):
    layer = GatedDense(8, blocks=2)
    layer(rng.normal(size=(2, 4)).astype("float32"))
    with pytest.raises(ValueError, match="axis -1"):
        layer(rng.normal(size=(2, 5)).astype("float32"))
    with pytest.raises(ValueError, match=r"\(batch, features\).*input_shape=\(2, 3, 4\).*Flatten"):
        GatedDense(8, blocks=2)(rng.normal(size=(2, 3, 4)).astype("float32"))
    with pytest.raises(ValueError, match=r"input_shape=\(None, 5, 16\)"):
        GatedDense(8, blocks=2).compute_output_shape((None, 5, 16))


def test_trainable_false_freezes_the_policy_too(rng, tmp_path):
    layer = GatedDense(8, blocks=2, trainable=False, name="frozen")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(layer(inputs)))
    assert [w.path for w in model.trainable_weights] == ["head/kernel", "head/bias"]
    reloaded = GatedDense.from_config(layer.get_config())
    assert not reloaded.policy.trainable


def test_sparse_inputs_are_read_as_dense_ones(rng):
    import tensorflow as tf

    layer = GatedDense(8, blocks=2)
    dense = np.where(rng.random((3, 4)) < 0.5, 0, rng.normal(size=(3, 4))).astype("float32")
    np.testing.assert_allclose(
        layer(tf.sparse.from_dense(dense)).numpy(), layer(dense).numpy(), rtol=1e-6
    )


def test_keras_quantize_says_it_leaves_the_gated_layers_in_float(rng):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(GatedDense(8, blocks=2)(inputs)))
    with pytest.warns(UserWarning, match="leaves keras_condcomp's gated layers"):
        model.quantize("int8")


@pytest.mark.parametrize("activation", ["softmax", "log_softmax", "sparsemax", "glu"])
def test_activations_not_element_wise_are_refused(activation):
    # Inference activates each active block apart: softmax over a block is
    # not softmax over the units, as training computed it.
    with pytest.raises(ValueError, match=f"element-wise.*activation='{activation}'"):
        GatedDense(8, blocks=2, activation=activation)
    with pytest.raises(ValueError, match="activation=<function"):
        GatedDense(8, blocks=2, activation=lambda x: keras.ops.softmax(x, axis=-1))
    with pytest.raises(ValueError, match="element-wise"):
        GatedDense.from_dense(keras.layers.Dense(8, activation=activation), blocks=2)


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "sigmoid", "selu", "hard_silu"])
def test_element_wise_activations_are_kept(activation):
    layer = GatedDense(8, blocks=2, activation=activation)
    assert layer.activation is keras.activations.get(activation)
    assert GatedDense.from_config(layer.get_config()).activation is layer.activation


def test_from_dense_refuses_other_layers():
    with pytest.raises(ValueError, match="dense=Conv2D"):
        GatedDense.from_dense(keras.layers.Conv2D(4, 3), blocks=2)


def test_block_major_storage_keeps_dense_semantics(rng):
    def seeded():
        return keras.initializers.GlorotUniform(seed=3)

    regularizer = keras.regularizers.OrthogonalRegularizer(0.1, mode="columns")
    constraint = keras.constraints.MaxNorm(0.5, axis=0)
    gated = GatedDense(12, blocks=3, kernel_initializer=seeded(), kernel_regularizer=regularizer,
                       kernel_constraint=constraint)
    dense = keras.layers.Dense(12, kernel_initializer=seeded())
    x = rng.normal(size=(2, 5)).astype("float32")
    gated(x), dense(x)
    kernel = dense.kernel.numpy()
    # Initialised as the Dense kernel, stored block by block.
    np.testing.assert_array_equal(gated.kernel.numpy(), kernel)
    assert gated.block_kernel.shape == (3, 5, 4)
    np.testing.assert_array_equal(gated.block_kernel.numpy()[1], kernel[:, 4:8])
    # The regularizer and the constraint see the (input_dim, units) kernel.
    np.testing.assert_allclose(gated.block_kernel.regularizer(gated.block_kernel),
                               regularizer(dense.kernel), rtol=1e-6)
    constrained = gated.block_kernel.constraint(gated.block_kernel)
    np.testing.assert_allclose(constrained[2], constraint(dense.kernel)[:, 8:], rtol=1e-6)


def test_loads_variables_saved_in_the_dense_layout(rng):
    layer = GatedDense(6, blocks=3)
    layer.build((None, 4))
    kernel = rng.normal(size=(4, 6)).astype("float32")
    bias = rng.normal(size=(6,)).astype("float32")
    layer.load_own_variables({"0": kernel, "1": bias})  # as written before block-major
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    np.testing.assert_array_equal(layer.bias.numpy(), bias)
    block_kernel = to_block_kernel(kernel, 3)
    layer.load_own_variables({"0": np.asarray(block_kernel) * 2, "1": bias})
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel * 2)


def test_an_explicit_target_density_is_used_by_a_layer_without_one():
    layer = GatedDense(8, blocks=2)
    sigma = np.full((3, 2), 0.5, "float32")
    assert float(layer.gating_regularization(sigma)) == 0.0
    np.testing.assert_allclose(layer.gating_regularization(sigma, 0.25), 2 * 0.25 + 0.25)


def test_use_bias_must_be_a_bool_and_numpy_seeds_are_stored_as_ints():
    with pytest.raises(ValueError, match="use_bias='yes'"):
        GatedDense(8, blocks=2, use_bias="yes")
    config = GatedDense(8, blocks=2, seed=np.int64(3)).get_config()
    assert type(config["seed"]) is int
    json.dumps(config)


def test_integer_inputs_are_read_as_floats_on_every_path(rng):
    from keras_condcomp import PolicyGradientModel
    from keras_condcomp.layers import GatedConv2D

    x = rng.integers(0, 16, size=(32, 8)).astype("int32")
    y = np.arange(32) % 3
    inputs = keras.Input((8,), dtype="int32")
    hidden = GatedDense(16, blocks=4, target_density=0.5, name="g")(inputs)
    model = PolicyGradientModel(inputs, keras.layers.Dense(3)(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, validation_data=(x, y), verbose=0)
    assert np.isfinite(model.evaluate(x, y, verbose=0, return_dict=True)["loss"])
    layer = model.get_layer("g")
    expected = layer(x.astype("float32")).numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), model.predict(x.astype("float32"), verbose=0), atol=1e-6)
    conv = GatedConv2D(4, 3, blocks=2)
    pixels = rng.integers(0, 255, size=(2, 6, 6, 1)).astype("uint8")
    np.testing.assert_allclose(conv(pixels).numpy(), conv(pixels.astype("float32")).numpy(), rtol=1e-5)


def test_training_never_asks_for_the_native_kernels(rng, monkeypatch):
    # Loading them may compile them (about 25 s): only inference needs them.
    import tensorflow as tf

    from keras_condcomp.layers import gated_dense

    def refuse():
        raise AssertionError("training asked for the native kernels")

    monkeypatch.setattr(gated_dense, "load_native_kernels", refuse)
    layer = GatedDense(8, blocks=4, activation="relu")
    x = rng.normal(size=(3, 5)).astype("float32")
    with pytest.warns(UserWarning, match="outside keras_condcomp.PolicyGradientModel"):
        layer(x, training=True)
    tf.function(lambda x: layer(x, training=True))(x)
