import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_condcomp
from keras_condcomp import PolicyGradientModel
from keras_condcomp.layers import BernoulliPolicy, GatedConv2D, GatedDense
from keras_condcomp.ops import CONV2D_EXECUTION_PATHS, masked_block_conv2d


def all_open(layer):
    layer.policy.bias.assign(np.full(layer.blocks, 50.0, "float32"))


def test_exported_from_the_package():
    assert keras_condcomp.GatedConv2D is GatedConv2D
    assert "GatedConv2D" in keras_condcomp.layers.__all__


@pytest.mark.parametrize("policy_grid", [None, 2])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_equals_conv2d_with_every_group_open(rng, data_format, policy_grid):
    shape = (3, 7, 6, 4) if data_format == "channels_last" else (3, 4, 7, 6)
    x = rng.normal(size=shape).astype("float32")
    conv = keras.layers.Conv2D(
        8, 3, strides=2, padding="same", activation="tanh", data_format=data_format
    )
    conv.build(shape)
    # The reference runs channels_last: TensorFlow 2.21's CPU Conv2D kernel
    # refuses NCHW, which Keras's own channels_first Conv2D hits.
    reference = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="tanh")
    reference.build((3, 7, 6, 4))
    reference.set_weights(conv.get_weights())
    if data_format == "channels_last":
        expected = reference(x)
    else:
        expected = np.moveaxis(reference(np.moveaxis(x, 1, -1)), -1, 1)
    gated = GatedConv2D.from_conv(conv, blocks=4, policy_grid=policy_grid)
    assert gated.data_format == data_format
    assert gated.policy.kernel.shape == (4 * (policy_grid or 1) ** 2, 4)
    all_open(gated)
    for training in (False, True):
        np.testing.assert_allclose(gated(x, training=training), expected, atol=1e-5)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_inactive_groups_are_exactly_zero_and_policy_reads_pooled_input(rng, data_format):
    layer = GatedConv2D(16, 3, blocks=8, activation="sigmoid", data_format=data_format)
    shape = (20, 5, 5, 3) if data_format == "channels_last" else (20, 3, 5, 5)
    x = rng.normal(size=shape).astype("float32")
    y = layer(x).numpy()
    if data_format == "channels_first":
        y = np.moveaxis(y, 1, -1)
    y = y.reshape(20, 3, 3, 8, 2)
    pooled = x.mean(axis=(1, 2) if data_format == "channels_last" else (2, 3))
    sigma = layer.block_probabilities(x).numpy()
    np.testing.assert_allclose(sigma, layer.policy(pooled), rtol=1e-5)
    mask = layer.block_mask(x).numpy()
    np.testing.assert_array_equal(mask, (sigma > 0.5).astype("float32"))
    assert 0 < mask.mean() < 1
    for i in range(20):
        assert np.all(y[i][..., mask[i] == 0, :] == 0)
        assert np.all(y[i][..., mask[i] == 1, :] > 0)


@pytest.mark.parametrize("execution", CONV2D_EXECUTION_PATHS)
def test_every_execution_path_matches_masked_reference(rng, execution):
    layer = GatedConv2D(12, 3, blocks=4, padding="same", activation="relu", execution=execution)
    for batch in (1, 7):
        x = rng.normal(size=(batch, 6, 6, 5)).astype("float32")
        x[..., 1:3] = 0  # zero input channels, as after a gated layer
        mask = layer.block_mask(x)
        expected = masked_block_conv2d(
            x, layer.kernel, layer.bias, mask, layer.activation, padding="same"
        )
        np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_predict_through_flatten_into_a_gated_dense(rng):
    # Inside predict's graph the skipping paths must keep the static shape,
    # or Flatten -> GatedDense cannot be built on the convolution's output.
    from keras_condcomp.layers import GatedDense

    inputs = keras.Input((6, 6, 2))
    hidden = GatedConv2D(8, 3, blocks=4, padding="same", activation="relu")(inputs)
    hidden = GatedDense(8, blocks=2)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, hidden)
    x = rng.normal(size=(5, 6, 6, 2)).astype("float32")
    got = model.predict(x, verbose=0)
    np.testing.assert_allclose(got, model(x, training=False), atol=1e-5)


@pytest.mark.parametrize(
    "strides, padding, dilation_rate",
    [(1, "valid", 1), (2, "same", 1), ((2, 1), "valid", 1), (2, "valid", 1),
     (1, "same", (2, 1))],
)
def test_output_shapes_match_conv2d(rng, strides, padding, dilation_rate):
    x = rng.normal(size=(2, 9, 8, 3)).astype("float32")
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation_rate)
    expected = keras.layers.Conv2D(4, 3, **kwargs)
    gated = GatedConv2D(4, 3, blocks=2, **kwargs)
    assert tuple(gated(x).shape) == tuple(expected(x).shape)
    assert gated.compute_output_shape((None, 9, 8, 3)) == expected.compute_output_shape(
        (None, 9, 8, 3)
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_policy_grid_reads_the_means_of_grid_cells(rng, data_format):
    layer = GatedConv2D(8, 3, blocks=4, padding="same", policy_grid=2, data_format=data_format)
    image = rng.normal(size=(3, 7, 9, 2)).astype("float32")  # rows 7 -> 2 cells of 3
    x = image if data_format == "channels_last" else image.transpose(0, 3, 1, 2)
    layer(x)
    assert layer.policy.kernel.shape == (2 * 2 * 2, 4)
    cells = [image[:, r * 3:(r + 1) * 3, c * 4:(c + 1) * 4].mean(axis=(1, 2))
             for r in range(2) for c in range(2)]
    state = np.stack(cells, axis=1).reshape(3, -1)
    logits = state @ layer.policy.kernel.numpy() + layer.policy.bias.numpy()
    np.testing.assert_allclose(
        layer.block_probabilities(x), 1 / (1 + np.exp(-logits)), atol=1e-6
    )


def test_config_round_trip():
    layer = GatedConv2D(
        16, (3, 2), blocks=4, strides=(2, 1), padding="same", activation="relu",
        target_density=0.3, sparsity_weight=3.0, variance_weight=0.5,
        inference="sample", execution="grouped", seed=9, kernel_regularizer="l2",
        policy_regularizer="l2", example_sparsity_weight=5.0, policy_grid=2,
    )
    config = layer.get_config()
    clone = GatedConv2D.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.policy, BernoulliPolicy)
    assert config["kernel_size"] == (3, 2) and config["blocks"] == 4


def test_keras_save_load_gives_identical_outputs(rng, tmp_path):
    inputs = keras.Input((8, 8, 3))
    # The masked path (traced fastest): the skipping paths have their own tests.
    hidden = GatedConv2D(
        8, 3, blocks=4, padding="same", activation="relu", target_density=0.5, execution="masked"
    )(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = GatedConv2D(8, 3, blocks=2, activation="relu", execution="masked")(hidden)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(hidden))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    x = rng.normal(size=(5, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_dtypes(rng, policy):
    keras.config.set_dtype_policy(policy)
    layer = GatedConv2D(6, 3, blocks=3, activation="relu")
    x = rng.normal(size=(2, 5, 5, 2)).astype("float32")
    assert layer(x).dtype == layer.compute_dtype
    assert layer.block_probabilities(x).dtype == "float32"
    assert layer.kernel.shape == (3, 3, 2, 6) and layer.policy.kernel.shape == (2, 3)


def test_training_lowers_density_toward_target(rng):
    # Seeded weights: unseeded, gate_b's density fell by 0.014 at least in
    # 210 draws (mean 0.06, sd 0.02), an estimated 0.1-0.5% of runs not at all.
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    hidden = GatedConv2D(
        8, 3, blocks=4, padding="same", activation="relu", target_density=0.25,
        sparsity_weight=10.0, name="gate_a", seed=1,
    )(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = GatedConv2D(
        8, 3, blocks=4, activation="relu", target_density=0.25, sparsity_weight=10.0,
        name="gate_b", seed=2,
    )(hidden)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(hidden))
    model = PolicyGradientModel(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        policy_optimizer=keras.optimizers.Adam(0.1),
    )
    x = rng.normal(size=(128, 8, 8, 1)).astype("float32")
    y = np.arange(128) % 3
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history
    for name in ("gate_a_density", "gate_b_density"):
        print(name, history[name])
        # Policies start at sigma = 0.5 (zero bias): density falls toward 0.25.
        assert history[name][-1] < history[name][0]
        assert abs(history[name][-1] - 0.25) < 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"filters": 10, "kernel_size": 3, "blocks": 3}, "filters=10, blocks=3"),
        ({"filters": 0, "kernel_size": 3, "blocks": 1}, "filters=0"),
        ({"filters": 8, "kernel_size": 3, "blocks": 0}, "blocks=0"),
        ({"filters": 8, "kernel_size": 0, "blocks": 2}, "kernel_size=0"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "strides": (1, 2, 3)},
         r"strides=\(1, 2, 3\)"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "padding": "causal"},
         "padding='causal'"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "data_format": "nhwc"},
         "data_format='nhwc'"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "strides": 2, "dilation_rate": 2},
         r"strides=\(2, 2\), dilation_rate=\(2, 2\)"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "target_density": 1.5},
         "target_density=1.5"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "execution": "static_capacity"},
         "execution='static_capacity'"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "policy_grid": 0}, "policy_grid=0"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "policy_grid": True},
         "policy_grid=True"),
        ({"filters": 8, "kernel_size": 3, "blocks": 2, "activation": "softmax"},
         "element-wise.*activation='softmax'"),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedConv2D(**kwargs)


def test_bad_inputs_and_layers_are_refused(rng):
    with pytest.raises(ValueError, match=r"policy_grid=4. needs inputs whose rows"):
        GatedConv2D(4, 3, blocks=2, policy_grid=4)(rng.normal(size=(1, 3, 5, 3)).astype("float32"))
    layer = GatedConv2D(4, 3, blocks=2)
    layer(rng.normal(size=(1, 5, 5, 3)).astype("float32"))
    with pytest.raises(ValueError, match="axis -1"):
        layer(rng.normal(size=(1, 5, 5, 4)).astype("float32"))
    with pytest.raises(ValueError, match="ndim=4"):
        GatedConv2D(4, 3, blocks=2)(rng.normal(size=(2, 5, 3)).astype("float32"))
    with pytest.raises(ValueError, match="conv=Dense"):
        GatedConv2D.from_conv(keras.layers.Dense(4), blocks=2)
    with pytest.raises(ValueError, match="groups=2"):
        GatedConv2D.from_conv(keras.layers.Conv2D(4, 3, groups=2), blocks=2)
    # Inputs smaller than the kernel (valid padding), symbolic or eager, or than
    # the policy grid in a later call.
    with pytest.raises(ValueError, match=r"Inputs of 2x2 are too small.*\(None, 2, 2, 1\)"):
        GatedConv2D(4, 3, blocks=2)(keras.Input((2, 2, 1)))
    with pytest.raises(ValueError, match="Inputs of 2x2 are too small"):
        GatedConv2D(4, 3, blocks=2)(np.zeros((1, 2, 2, 1), "float32"))
    grid = GatedConv2D(4, 3, blocks=2, padding="same", policy_grid=3)
    grid(rng.normal(size=(1, 7, 7, 2)).astype("float32"))
    with pytest.raises(ValueError, match="Inputs of 2x2 are too small.*policy_grid=3"):
        grid(rng.normal(size=(1, 2, 2, 2)).astype("float32"))


def test_profile_counts_group_sparsity_through_pooling():
    from keras_condcomp.profiling import gated_inputs, profile_macs

    inputs = keras.Input((8, 8, 2))
    hidden = GatedConv2D(8, 3, blocks=4, padding="same", name="a")(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = GatedConv2D(16, 3, blocks=4, padding="same", name="b")(hidden)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(hidden))
    assert gated_inputs(model) == {"a": None, "b": "a"}
    profile = profile_macs(model, densities={"a": 0.5, "b": 0.25})
    a, b = profile.layer("a"), profile.layer("b")
    assert (a.dense_macs, a.policy_macs) == (64 * 9 * 2 * 8, 2 * 4)
    assert (b.dense_macs, b.policy_macs) == (16 * 9 * 8 * 16, 8 * 4)
    expected = 2 * 4 + 0.5 * a.dense_macs + 8 * 4 + 0.5 * 0.25 * b.dense_macs
    assert profile.conditional_macs == pytest.approx(expected)


@pytest.mark.parametrize("dtype", ["mixed_float16", "float64"])
def test_from_conv_and_from_dense_keep_the_dtype_policy(dtype):
    conv = keras.layers.Conv2D(8, 3, dtype=dtype)
    conv.build((None, 5, 5, 2))
    gated = GatedConv2D.from_conv(conv, blocks=4)
    assert gated.dtype_policy.name == dtype
    all_open(gated)
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 2))
    np.testing.assert_array_equal(np.asarray(gated(x)), np.asarray(conv(x)))
    dense = keras.layers.Dense(8, dtype=dtype)
    dense.build((None, 4))
    assert GatedDense.from_dense(dense, blocks=4).dtype_policy.name == dtype


@pytest.mark.parametrize("execution", ["per_example", "grouped", "masked"])
def test_a_gradient_through_an_inference_call_of_a_static_batch(rng, execution):
    # Saliency maps: a tape around model(x, training=False) in a tf.function.
    x = tf.constant(rng.normal(size=(5, 8, 8, 4)).astype("float32"))
    layer = GatedConv2D(8, 3, blocks=4, execution=execution)
    reference = GatedConv2D(8, 3, blocks=4, execution="masked")
    layer(x)
    reference(x)
    reference.set_weights(layer.get_weights())

    @tf.function
    def saliency(inputs, gated):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            total = tf.reduce_sum(gated(inputs, training=False) ** 2)
        return tf.convert_to_tensor(tape.gradient(total, inputs))  # grouped: IndexedSlices

    np.testing.assert_allclose(saliency(x, layer), saliency(x, reference), atol=1e-5)


def test_the_keras_arguments_come_first_and_blocks_is_a_keyword():
    # Conv2D(16, 3, 2) means strides 2; so does GatedConv2D's third argument.
    layer = GatedConv2D(16, 3, 2, blocks=4)
    assert layer.strides == (2, 2) and layer.blocks == 4
    with pytest.raises(TypeError, match="blocks"):
        GatedConv2D(16, 3, 4)
    with pytest.raises(TypeError, match="blocks"):
        GatedDense(16, 4)
    conv = keras.layers.Conv2D(8, 3, padding="same")
    assert GatedConv2D(**conv.get_config(), blocks=2).get_config()["padding"] == "same"
    with pytest.raises(ValueError, match="groups=2"):
        GatedConv2D(8, 3, groups=2, blocks=2)
