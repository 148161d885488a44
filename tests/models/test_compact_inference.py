import keras
import numpy as np
import pytest

from keras_condcomp.layers import GatedConv2D, GatedDense
from keras_condcomp.models import compact_inference
from keras_condcomp.ops import (
    cost_constants, forced_execution, set_cost_constants, to_block_kernel,
)


@pytest.fixture(autouse=True)
def engine_costs(tensorflow_paths):
    """The engine's cost constants, yielded; meanwhile a batch-1 fixed cost
    of 1 ns, and no native kernels: this module tests the graph chain (a
    chain of dense layers runs on the native ops where they are built,
    `tests/ops/test_native_kernels.py`). These tests' GatedDense layers are small: at the engine's
    constants each would compute its dense product in the chain (see
    `test_a_small_gated_dense_hands_on_only_its_active_blocks`), never the
    skipping products the other tests check."""
    before = cost_constants()
    set_cost_constants(overhead=1.0)
    yield before
    set_cost_constants(**before)


def _cnn():
    keras.utils.set_random_seed(0)  # the masks the tests check
    inputs = keras.Input((12, 12, 3))
    h = GatedConv2D(16, 3, blocks=4, padding="same", activation="relu", seed=1, name="c1")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = GatedConv2D(24, 3, blocks=4, strides=2, padding="same", seed=2, name="c2")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.5)(h)
    h = GatedConv2D(16, 2, blocks=2, dilation_rate=2, activation="tanh", seed=3, name="c3")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = GatedDense(12, blocks=3, activation="relu", seed=4, name="d1")(h)
    return keras.Model(inputs, keras.layers.Dense(5, name="head")(h))


def _mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((20,))
    h = GatedDense(32, blocks=8, activation="relu", seed=1, name="d1")(inputs)
    h = GatedDense(24, blocks=4, activation="sigmoid", seed=2, name="d2")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def _gated(model):
    return [layer for layer in model.layers if isinstance(layer, (GatedConv2D, GatedDense))]


def _masks(model, x):
    """Each gated layer's `(batch, blocks)` mask for `x`."""
    probe = keras.Model(model.inputs[0], [layer.input for layer in _gated(model)])
    inputs = probe(x, training=False)
    inputs = inputs if len(_gated(model)) > 1 else [inputs]
    return [np.asarray(layer.block_mask(h)) for layer, h in zip(_gated(model), inputs)]


def _assert_matches_model(model, x, predict=None):
    predict = predict or compact_inference(model)
    expected = np.asarray(model(x, training=False))
    for i in range(len(x)):
        np.testing.assert_allclose(predict(x[i:i + 1]), expected[i:i + 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(x), expected, rtol=1e-5, atol=1e-5)


def _mixed_policies(model, rng):
    """Policies whose decisions differ from example to example."""
    for layer in _gated(model):
        shape = layer.policy.kernel.shape
        layer.policy.kernel.assign(rng.normal(scale=10.0, size=shape).astype("float32"))
        layer.policy.bias.assign(rng.normal(scale=0.5, size=layer.blocks).astype("float32"))


def test_a_gated_cnn_equals_the_model_at_batch_1_and_7(rng):
    model = _cnn()
    _mixed_policies(model, rng)
    x = rng.normal(size=(7, 12, 12, 3)).astype("float32")
    masks = _masks(model, x)
    # The masks this test checks: some blocks off in every layer, per example.
    for mask in masks:
        assert 0 < mask.mean() < 1
        assert len({tuple(row) for row in mask}) > 1
    _assert_matches_model(model, x)


@pytest.mark.parametrize("bias", [-50.0, 50.0])
def test_no_block_or_every_block_active(rng, bias):
    model = _cnn()
    _mixed_policies(model, rng)
    model.get_layer("c2").policy.bias.assign(np.full(4, bias, "float32"))
    model.get_layer("d1").policy.bias.assign(np.full(3, bias, "float32"))
    x = rng.normal(size=(3, 12, 12, 3)).astype("float32")
    assert np.all(_masks(model, x)[1] == (bias > 0))
    _assert_matches_model(model, x)


@pytest.mark.parametrize("bias", [-0.5, 2.0])
def test_a_gated_mlp_equals_the_model_at_low_and_high_densities(rng, bias):
    model = _mlp()
    for layer in _gated(model):
        layer.policy.bias.assign(np.full(layer.blocks, bias, "float32"))
    x = rng.normal(size=(8, 20)).astype("float32")
    # Under half of the blocks: the skipping products; from half: the dense one.
    first = _masks(model, x)[0].mean(axis=1)
    if bias < 0:
        assert (first < 0.5).any() and (first >= 0.5).any()
    else:
        assert (first >= 0.5).all()
    _assert_matches_model(model, x)


def test_skipped_blocks_weights_are_never_read(rng):
    """NaN in the weights of skipped blocks, both the columns of a layer's
    skipped groups and the rows of the next layer's kernel that read them,
    leaves the output as with those weights zero."""
    model = _cnn()
    _mixed_policies(model, rng)
    model.get_layer("d1").policy.bias.assign(np.full(3, 50.0, "float32"))
    x = rng.normal(size=(1, 12, 12, 3)).astype("float32")
    first, second = _masks(model, x)[:2]
    c1, c2 = model.get_layer("c1"), model.get_layer("c2")
    skipped_in = np.repeat(first[0] == 0, 4)
    skipped_out = np.repeat(second[0] == 0, 6)
    assert skipped_in.any() and skipped_out.any()
    kernel = np.asarray(c2.kernel).copy()
    kernel[:, :, skipped_in, :] = 0.0
    kernel[..., skipped_out] = 0.0
    c2.kernel.assign(kernel)
    bias = np.asarray(c1.bias).copy()
    expected = np.asarray(model(x, training=False))
    kernel[:, :, skipped_in, :] = np.nan
    kernel[..., skipped_out] = np.nan
    c2.kernel.assign(kernel)
    bias[skipped_in] = np.nan
    c1.bias.assign(bias)
    assert np.abs(expected).min() > 0
    with forced_execution("masked"):  # the dense convolution reads them
        assert np.isnan(keras.Model(model.inputs[0], c2.output)(x, training=False)).any()
    np.testing.assert_allclose(compact_inference(model)(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("none_active", [False, True])
def test_a_small_gated_dense_hands_on_only_its_active_blocks(rng, engine_costs, none_active):
    """At the engine's costs a small GatedDense computes its dense product
    with no decision, and hands on only its active blocks: NaN in the next
    layer's rows of the others changes nothing (with none active, block 0
    is held, as zeros)."""
    set_cost_constants(**engine_costs)
    model = _mlp()
    _mixed_policies(model, rng)
    d1, d2 = model.get_layer("d1"), model.get_layer("d2")
    if none_active:
        d1.policy.bias.assign(np.full(d1.blocks, -1e4, "float32"))
        # d2 reads zeros: its bias alone opens blocks 0 and 1.
        d2.policy.bias.assign(np.array([5.0, 5.0, -5.0, -5.0], "float32"))
    x = rng.normal(size=(1, 20)).astype("float32")
    first, second = (mask[0] for mask in _masks(model, x))
    assert not first.any() if none_active else 0 < first.mean() < 1
    assert second.any()  # so d2's active outputs read the rows of d1's blocks
    kernel = np.asarray(d2.kernel).copy()
    skipped = np.repeat(first == 0, 4)
    skipped[:4] &= first.any()  # with none active, block 0 is held, as zeros
    kernel[skipped] = 0.0
    d2.block_kernel.assign(to_block_kernel(kernel, d2.blocks))
    expected = np.asarray(model(x, training=False))
    kernel[skipped] = np.nan
    d2.block_kernel.assign(to_block_kernel(kernel, d2.blocks))
    with forced_execution("masked"):  # the dense product reads them
        assert np.isnan(np.asarray(model(x, training=False))).all()
    np.testing.assert_allclose(compact_inference(model)(x), expected, rtol=1e-5, atol=1e-6)


def test_flatten_keeps_the_held_blocks_of_every_position(rng):
    inputs = keras.Input((6, 6, 2))
    h = GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", seed=1, name="conv")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    _mixed_policies(model, rng)
    x = rng.normal(size=(5, 6, 6, 2)).astype("float32")
    _assert_matches_model(model, x)
    # The head reads only the rows of the held channels at each position:
    # NaN in the others changes nothing.
    x = x[:1]
    skipped = np.tile(np.repeat(_masks(model, x)[0][0] == 0, 2), 9)
    assert skipped.any()
    kernel = np.asarray(model.get_layer("head").kernel).copy()
    kernel[skipped] = 0.0
    model.get_layer("head").kernel.assign(kernel)
    expected = np.asarray(model(x, training=False))
    kernel[skipped] = np.nan
    model.get_layer("head").kernel.assign(kernel)
    np.testing.assert_allclose(compact_inference(model)(x), expected, rtol=1e-5, atol=1e-6)


def test_a_gated_dense_after_flatten(rng):
    inputs = keras.Input((6, 6, 2))
    h = GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", seed=1)(inputs)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dropout(0.3)(GatedDense(16, blocks=4, activation="relu", seed=2)(h))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    _mixed_policies(model, rng)
    _assert_matches_model(model, rng.normal(size=(5, 6, 6, 2)).astype("float32"))


def test_layers_that_need_the_whole_tensor_get_it(rng):
    inputs = keras.Input((8, 8, 4))
    h = GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", seed=1)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = GatedConv2D(8, 3, blocks=2, padding="same", policy_grid=2, seed=2)(h)
    h = keras.layers.Flatten()(h)
    h = GatedDense(16, blocks=4, seed=3)(h)
    model = keras.Model(inputs, keras.layers.Softmax()(h))
    model.layers[2].moving_mean.assign(rng.normal(size=8).astype("float32"))
    _mixed_policies(model, rng)
    x = rng.normal(size=(4, 8, 8, 4)).astype("float32")
    _assert_matches_model(model, x)


def test_a_policy_grid_reads_the_held_channels_of_each_cell(rng):
    inputs = keras.Input((8, 8, 3))
    h = GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", seed=1)(inputs)
    h = GatedConv2D(8, 3, blocks=2, padding="same", policy_grid=2, seed=2)(h)
    model = keras.Model(inputs, h)
    _mixed_policies(model, rng)
    x = rng.normal(size=(5, 8, 8, 3)).astype("float32")
    _assert_matches_model(model, x)


def test_a_channels_first_gated_conv2d_runs_as_a_layer(rng):
    inputs = keras.Input((3, 8, 8))
    h = GatedConv2D(8, 3, blocks=4, data_format="channels_first", activation="relu", seed=1)(inputs)
    h = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(h)
    model = keras.Model(inputs, GatedDense(8, blocks=2, seed=2)(h))
    _mixed_policies(model, rng)
    _assert_matches_model(model, rng.normal(size=(3, 3, 8, 8)).astype("float32"))


def test_unknown_image_sizes_and_a_sequential_model(rng):
    model = keras.Sequential([
        keras.Input((None, None, 3)),
        GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", seed=1),
        keras.layers.AveragePooling2D(2),
        GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", seed=2),
        keras.layers.GlobalMaxPooling2D(),
        keras.layers.Dense(3),
    ])
    _mixed_policies(model, rng)
    predict = compact_inference(model)
    for size in (6, 9):
        _assert_matches_model(model, rng.normal(size=(3, size, size, 3)).astype("float32"), predict)


def test_plain_conv2d_and_dense_read_the_held_rows(rng):
    inputs = keras.Input((6, 6, 2))
    h = GatedConv2D(8, 3, blocks=4, padding="same", activation="relu", seed=1)(inputs)
    h = keras.layers.Conv2D(4, 3, activation="relu")(h)
    h = GatedConv2D(8, 1, blocks=2, seed=2)(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))  # per position
    _mixed_policies(model, rng)
    _assert_matches_model(model, rng.normal(size=(4, 6, 6, 2)).astype("float32"))


def test_models_that_are_not_a_single_chain_are_refused():
    inputs = keras.Input((4,))
    hidden = GatedDense(4, blocks=2, name="gated")(inputs)
    residual = keras.Model(inputs, keras.layers.Add(name="add")([hidden, inputs]))
    with pytest.raises(ValueError, match="single chain.*'add'"):
        compact_inference(residual)
    two = keras.Model([inputs, keras.Input((4,))], hidden)
    with pytest.raises(ValueError, match="one input and one output.*2 inputs"):
        compact_inference(two)
    with pytest.raises(ValueError, match="built Keras model"):
        compact_inference(keras.Sequential([GatedDense(4, blocks=2)]))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.gated = GatedDense(4, blocks=2)

        def call(self, x):
            return self.gated(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="subclassed model has none.*'sub'"):
        compact_inference(subclassed)
    inner = keras.Sequential([keras.Input((4,)), GatedDense(4, blocks=2)], name="inner")
    nested = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="flatten the nested model 'inner'"):
        compact_inference(nested)


def test_an_output_in_a_dict_is_returned_in_the_dict_at_every_batch_size(rng):
    inputs = keras.Input((20,))
    hidden = GatedDense(32, blocks=4, activation="relu", name="g")(inputs)
    model = keras.Model(inputs, {"logits": keras.layers.Dense(3)(hidden)})
    predict = compact_inference(model)
    x = rng.normal(size=(3, 20)).astype("float32")
    for batch in (x[:1], x):
        got, expected = predict(batch), model(batch, training=False)
        assert list(got) == ["logits"]
        np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-5, atol=1e-5)


def test_an_input_of_the_wrong_shape_is_refused_naming_it(rng):
    predict = compact_inference(_mlp())
    with pytest.raises(ValueError, match=r"\(batch, 20\).*x.shape=\(1, 21\)"):
        predict(rng.normal(size=(1, 21)).astype("float32"))
    with pytest.raises(ValueError, match=r"x.shape=\(20,\)"):
        predict(rng.normal(size=(20,)).astype("float32"))
    images = keras.Sequential([
        keras.Input((None, None, 3)), GatedConv2D(4, 3, blocks=2), keras.layers.Flatten(),
    ])
    with pytest.raises(ValueError, match=r"\(batch, None, None, 3\).*x.shape=\(1, 5, 5, 2\)"):
        compact_inference(images)(np.zeros((1, 5, 5, 2), "float32"))


def test_a_gated_layer_in_another_dtype_is_refused():
    inputs = keras.Input((4,))
    layer = GatedDense(4, blocks=2, dtype="mixed_float16", name="half")
    model = keras.Model(inputs, layer(inputs))
    with pytest.raises(ValueError, match="'half' with compute dtype 'float16'"):
        compact_inference(model)


@pytest.mark.parametrize("activation", [
    keras.layers.LeakyReLU(0.2),  # 0 stays 0: compact
    keras.layers.Activation("sigmoid"),  # 0 -> 0.5: the whole tensor
    keras.layers.ReLU(negative_slope=0.1, threshold=0.5),  # 0 -> -0.05
])
def test_activation_layers_between_gated_layers(rng, activation):
    inputs = keras.Input((6, 6, 3))
    h = GatedConv2D(8, 3, blocks=4, padding="same", seed=1)(inputs)
    h = activation(h)
    model = keras.Model(inputs, GatedConv2D(8, 3, blocks=2, seed=2)(h))
    _mixed_policies(model, rng)
    _assert_matches_model(model, rng.normal(size=(4, 6, 6, 3)).astype("float32"))


def test_a_batch_of_large_convolutions_runs_example_by_example(rng, monkeypatch):
    from keras_condcomp.models import compact_chain

    model = _cnn()
    assert compact_chain._loop_limit(compact_chain._chain(model)) is None  # too small
    monkeypatch.setattr(compact_chain, "LOOP_MIN_MACS", 0)
    monkeypatch.setattr(compact_chain, "LOOP_LARGE_MACS", 0)
    _mixed_policies(model, rng)
    c1, c2 = model.get_layer("c1"), model.get_layer("c2")
    c1.policy.bias.assign(np.array([9.0, -9.0, -9.0, 0.0], "float32"))
    model.get_layer("d1").policy.bias.assign(np.full(3, 50.0, "float32"))
    x = rng.normal(size=(7, 12, 12, 3)).astype("float32")
    first = _masks(model, x)[0]
    assert 0 < first.mean() <= 0.5 and first[:, 1:3].max() == 0
    _assert_matches_model(model, x)
    # Each example reads only its own held channels: NaN in the rows of
    # channels no example holds reaches the dense convolution, not the loop.
    kernel = np.asarray(c2.kernel).copy()
    kernel[:, :, 4:12] = 0.0
    c2.kernel.assign(kernel)
    expected = np.asarray(model(x, training=False))
    assert np.abs(expected).min() > 0
    kernel[:, :, 4:12] = np.nan
    c2.kernel.assign(kernel)
    with forced_execution("masked"):
        predict = compact_inference(model)
        assert np.isnan(keras.Model(model.inputs[0], c2.output)(x, training=False)).any()
        np.testing.assert_allclose(predict(x), expected, rtol=1e-5, atol=1e-5)
    # Most groups of the first layer active: the model's own graph.
    c1.policy.bias.assign(np.full(4, 9.0, "float32"))
    c2.kernel.assign(np.nan_to_num(kernel))
    _assert_matches_model(model, x)


@pytest.mark.parametrize("threads, limit", [(1, 0.5), (2, None)])
def test_the_loop_needs_larger_convolutions_on_several_threads(monkeypatch, threads, limit):
    from keras_condcomp.models import compact_chain

    chain = compact_chain._chain(_cnn())
    monkeypatch.setattr(compact_chain, "intra_op_threads", lambda: threads)
    monkeypatch.setattr(compact_chain, "LOOP_MIN_MACS", 1000)
    monkeypatch.setattr(compact_chain, "LOOP_LARGE_MACS", 1e12)
    assert compact_chain._loop_limit(chain) == limit
    monkeypatch.setattr(compact_chain, "LOOP_LARGE_MACS", 1000)
    assert compact_chain._loop_limit(chain) == compact_chain.LOOP_LARGE_MAX_FRACTION


def test_a_gated_mlp_never_loops_over_a_batch(monkeypatch):
    from keras_condcomp.models import compact_chain

    monkeypatch.setattr(compact_chain, "LOOP_MIN_MACS", 0)
    monkeypatch.setattr(compact_chain, "LOOP_LARGE_MACS", 0)
    assert compact_chain._loop_limit(compact_chain._chain(_mlp())) is None


def test_sampled_decisions_run_in_the_chain(rng):
    """`inference="sample"` draws each block from its probability; with
    probabilities 0 and 1 the draws are the threshold's decisions."""
    inputs = keras.Input((6, 6, 3))
    h = GatedConv2D(8, 3, blocks=4, padding="same", inference="sample", seed=1)(inputs)
    model = keras.Model(inputs, GatedDense(8, blocks=2, inference="sample", seed=2)(
        keras.layers.GlobalAveragePooling2D()(h)))
    for layer, bias in zip(_gated(model), ([60.0, -60.0, 60.0, -60.0], [-60.0, 60.0])):
        layer.policy.kernel.assign(np.zeros(layer.policy.kernel.shape, "float32"))
        layer.policy.bias.assign(np.array(bias, "float32"))
    _assert_matches_model(model, rng.normal(size=(3, 6, 6, 3)).astype("float32"))
