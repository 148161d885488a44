import keras
import numpy as np
import pytest

from keras_condcomp import profiling
from keras_condcomp.layers import GatedDense
from keras_condcomp.profiling import LayerProfile, ModelProfile, profile_macs, summary


def mixed_model(seed=0):
    """Conv, pooling, normalisation, two chained gated layers, a dense head."""
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.BatchNormalization(name="norm")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = GatedDense(32, blocks=4, activation="relu", target_density=0.5, name="g1",
                   policy_bias_initializer=keras.initializers.RandomNormal(0, 0.5, seed=seed))(h)
    h = keras.layers.Dropout(0.1, name="drop")(h)
    h = GatedDense(32, blocks=8, activation="relu", target_density=0.25, name="g2",
                   policy_bias_initializer=keras.initializers.RandomNormal(0, 0.5, seed=seed + 1))(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="mixed")


def test_targets_give_exact_counts_per_layer():
    profile = profile_macs(mixed_model())
    assert profile.density_source == "targets" and profile.examples is None
    rows = {row.name: row for row in profile.layers}
    assert list(rows) == ["conv", "pool", "norm", "flat", "g1", "drop", "g2", "logits"]
    # Conv2D: 3*3*1*4 kernel per output position, 8*8 positions.
    assert (rows["conv"].dense_macs, rows["conv"].parameters) == (36 * 64, 40)
    for name in ("pool", "norm", "flat", "drop"):
        assert rows[name].dense_macs == 0 and rows[name].conditional_macs == 0
        assert rows[name].counted and not rows[name].is_gated
    assert rows["norm"].parameters == 16
    g1, g2 = rows["g1"], rows["g2"]
    assert (g1.dense_macs, g1.policy_macs, g1.blocks) == (64 * 32, 64 * 4, 4)
    assert (g1.input_density, g1.density) == (1.0, 0.5)
    assert g1.conditional_macs == 256 + 2048 * 0.5
    # g2 reads g1's block-sparse output through Dropout: both sparsities count.
    assert (g2.dense_macs, g2.policy_macs, g2.blocks) == (32 * 32, 32 * 8, 8)
    assert (g2.input_density, g2.density) == (0.5, 0.25)
    assert g2.conditional_macs == 256 + 1024 * 0.5 * 0.25
    assert g1.parameters == 64 * 32 + 32 + 64 * 4 + 4
    assert rows["logits"].conditional_macs == rows["logits"].dense_macs == 320
    assert profile.dense_macs == 2304 + 2048 + 1024 + 320
    assert profile.policy_macs == 512
    assert profile.conditional_macs == 2304 + 1280 + 384 + 320
    assert profile.ideal_speedup == pytest.approx(5696 / 4288)
    assert profile.parameters == mixed_model().count_params()
    assert profile.uncounted == ()


def test_measured_densities_pair_input_and_output_per_example(rng):
    # Seeded weights: with others, 3 draws of 200 left the pairing's effect
    # (the last check) below 1e-4; with these it is 0.0119.
    keras.utils.set_random_seed(11)
    model = mixed_model(seed=3)
    x = rng.normal(size=(150, 8, 8, 1)).astype("float32")
    profile = profile_macs(model, x=x, batch_size=64)
    assert profile.density_source == "measured" and profile.examples == 150
    # Independent computation from the layers' own masks.
    g1, g2 = model.get_layer("g1"), model.get_layer("g2")
    g1_input = keras.Model(model.inputs[0], model.get_layer("flat").output)(x)
    mask1 = keras.ops.convert_to_numpy(g1.block_mask(g1_input))
    mask2 = keras.ops.convert_to_numpy(g2.block_mask(g1(g1_input)))
    d1, d2 = mask1.astype("float64").mean(axis=1), mask2.astype("float64").mean(axis=1)
    assert 0 < d1.mean() < 1 and 0 < d2.mean() < 1  # a real mix of blocks
    row1, row2 = profile.layer("g1"), profile.layer("g2")
    np.testing.assert_allclose(row1.density, d1.mean())
    np.testing.assert_allclose(row2.density, d2.mean())
    np.testing.assert_allclose(row2.input_density, d1.mean())
    np.testing.assert_allclose(row2.computed_fraction, (d1 * d2).mean())
    np.testing.assert_allclose(
        row2.conditional_macs, 256 + 1024 * (d1 * d2).mean(), rtol=1e-12
    )
    # The pairing matters: the product of the means is a different number.
    assert abs((d1 * d2).mean() - d1.mean() * d2.mean()) > 1e-4


def test_given_densities_and_a_tf_dataset(rng):
    model = mixed_model()
    profile = profile_macs(model, {"g1": 0.75, "g2": 0.5})
    assert profile.density_source == "given"
    assert profile.layer("g2").computed_fraction == 0.75 * 0.5
    import tensorflow as tf

    x = rng.random((40, 8, 8, 1)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(40))).batch(16)
    from_dataset = profile_macs(model, x=dataset)
    from_arrays = profile_macs(model, x=x, batch_size=7)
    assert from_dataset == from_arrays and from_dataset.examples == 40


def test_other_layer_kinds():
    inputs = keras.Input((10, 6))
    sequence = keras.layers.Dense(4, name="per_step")(inputs)  # 10 steps x 6*4
    image = keras.layers.Reshape((10, 4, 1))(sequence)
    separable = keras.layers.SeparableConv2D(3, 3, padding="same", name="sep")(image)
    transposed = keras.layers.Conv2DTranspose(2, 2, strides=2, name="up")(separable)
    depthwise = keras.layers.DepthwiseConv2D(3, name="dw")(transposed)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(depthwise)
    recurrent = keras.layers.LSTM(2, name="lstm")(sequence)
    outputs = keras.layers.Concatenate()([pooled, recurrent])
    profile = profile_macs(keras.Model(inputs, outputs))
    assert profile.layer("per_step").dense_macs == 10 * 6 * 4
    # Depthwise 3x3x1 plus pointwise 1x1x1x3, at 10x4 output positions.
    assert profile.layer("sep").dense_macs == (9 + 3) * 40
    # Transposed: the 2x2x2x3 kernel per *input* position (10x4).
    assert profile.layer("up").dense_macs == 24 * 40
    # Depthwise 3x3 over 2 channels, valid padding on 20x8 -> 18x6.
    assert profile.layer("dw").dense_macs == 18 * 18 * 6
    assert profile.layer("gap").dense_macs == 0
    assert profile.uncounted == ("lstm",)
    assert not profile.layer("lstm").counted


def test_nested_sequential_and_subclassed_models():
    block = keras.Sequential(
        [keras.Input((16,)), GatedDense(16, blocks=4, target_density=0.5, name="a"),
         GatedDense(8, blocks=2, target_density=0.5, name="b")], name="block",
    )
    inputs = keras.Input((16,))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="head")(block(inputs)))
    profile = profile_macs(outer)
    assert [row.name for row in profile.layers] == ["a", "b", "head"]
    assert profile.layer("b").computed_fraction == 0.25  # Sequential graphs are followed

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = GatedDense(16, blocks=4, target_density=0.5, name="a")
            self.b = GatedDense(8, blocks=2, target_density=0.5, name="b")
            self.head = keras.layers.Dense(3, name="head")

        def call(self, x):
            return self.head(self.b(self.a(x)))

    net = Net()
    net(np.zeros((1, 16), "float32"))
    profile = profile_macs(net)
    # No symbolic graph: b's input counts as dense, the head from its kernel.
    assert profile.layer("b").input_density == 1.0
    assert profile.layer("b").computed_fraction == 0.5
    assert profile.layer("head").dense_macs == 24


def test_each_call_counts_at_its_own_shapes_in_this_model():
    from keras_condcomp.layers import GatedConv2D

    # First called in another model, on 32x32 images; here on 8x8.
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")
    gated = GatedConv2D(8, 3, blocks=4, padding="same", target_density=0.5, name="gated")
    big = keras.Input((32, 32, 3))
    keras.Model(big, gated(conv(big)))
    small = keras.Input((8, 8, 3))
    profile = profile_macs(keras.Model(small, gated(conv(small))))
    assert profile.layer("conv").dense_macs == 8 * 8 * (3 * 3 * 3 * 4)
    assert profile.layer("gated").dense_macs == 8 * 8 * (3 * 3 * 4 * 8)
    # A shared layer called on an 8x8 map and on a pooled 4x4 one.
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, [shared(inputs), shared(keras.layers.MaxPooling2D()(inputs))])
    assert profile_macs(model).layer("shared").dense_macs == (64 + 16) * (3 * 3 * 3 * 4)
    # In a Sequential model, at its shapes too.
    sequential = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.MaxPooling2D(), conv])
    assert profile_macs(sequential).layer("conv").dense_macs == 4 * 4 * (3 * 3 * 3 * 4)


def test_gated_inputs_follow_this_models_graph_not_a_first_call_elsewhere():
    first = GatedDense(16, blocks=4, activation="relu", name="first")
    second = GatedDense(8, blocks=2, name="second")
    inputs = keras.Input((16,))
    direct = keras.Model(inputs, second(keras.layers.Dropout(0.5)(first(inputs))))
    assert profiling.gated_inputs(direct) == {"first": None, "second": "first"}
    # The same layers, a Dense between them: second's input is dense here.
    other = keras.Model(inputs, second(keras.layers.Dense(16)(first(inputs))))
    assert profiling.gated_inputs(other) == {"first": None, "second": None}
    assert profile_macs(other).layer("second").input_density == 1.0
    sequential = keras.Sequential([keras.Input((16,)), first, keras.layers.ReLU(), second])
    assert profiling.gated_inputs(sequential) == {"first": None, "second": "first"}

    class Scaled(keras.layers.Layer):  # no get_config: the model has no config
        def __init__(self, factor):
            super().__init__()
            self.factor = np.asarray(factor)

        def call(self, x):
            return x * self.factor

    a, b = GatedDense(16, blocks=4, name="a"), GatedDense(8, blocks=2, name="b")
    unserialisable = keras.Model(inputs, Scaled([2.0])(b(keras.layers.ReLU()(a(inputs)))))
    assert profiling.gated_inputs(unserialisable) == {"a": None, "b": "a"}


def test_layers_called_several_times_count_every_call(rng):
    shared_gate = GatedDense(16, blocks=4, target_density=0.5, name="shared_gate")
    shared_dense = keras.layers.Dense(16, name="shared_dense")
    first = GatedDense(16, blocks=4, target_density=0.25, name="first")
    inputs = keras.Input((16,))
    merged = shared_gate(first(inputs)) + shared_gate(shared_dense(shared_dense(inputs)))
    inner = keras.Model(inputs, merged, name="inner")
    outer_inputs = keras.Input((16,))
    outer = keras.Model(outer_inputs, keras.layers.Dense(3, name="head")(
        inner(inner(outer_inputs))))
    profile = profile_macs(outer)
    # inner runs twice: shared_gate 4 calls, shared_dense 4, first 2, head 1.
    assert profile.layer("shared_gate").dense_macs == 4 * 16 * 16
    assert profile.layer("shared_gate").policy_macs == 4 * 16 * 4
    assert profile.layer("shared_dense").dense_macs == 4 * 16 * 16
    assert profile.layer("first").dense_macs == 2 * 16 * 16
    assert profile.layer("head").dense_macs == 16 * 3
    # A shared layer's inputs count as dense (its calls read different ones).
    assert profile.layer("shared_gate").input_density == 1.0
    measured = profile_macs(outer, x=rng.normal(size=(9, 16)).astype("float32"))
    assert measured.dense_macs == profile.dense_macs


def test_bad_arguments_name_argument_and_value(rng):
    model = mixed_model()
    with pytest.raises(ValueError, match="densities.*'nope'"):
        profile_macs(model, {"nope": 0.5})
    with pytest.raises(ValueError, match=r"densities\['g1'\]=1.5"):
        profile_macs(model, {"g1": 1.5})
    with pytest.raises(ValueError, match="not both"):
        profile_macs(model, {"g1": 0.5}, x=np.zeros((2, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match="batch_size=0"):
        profile_macs(model, x=np.zeros((2, 8, 8, 1), "float32"), batch_size=0)
    with pytest.raises(ValueError, match="unbuilt"):
        profile_macs(keras.Sequential([GatedDense(4, blocks=2)]))
    with pytest.raises(ValueError, match="print_fn=3"):
        summary(model, print_fn=3)
    with pytest.raises(ValueError, match="density_source='guess'"):
        ModelProfile("m", (), density_source="guess")
    with pytest.raises(ValueError, match="'g9'"):
        profile_macs(model).layer("g9")


def test_summary_prints_the_profile(rng):
    model = mixed_model()
    printed = []
    summary(model, print_fn=printed.append)
    assert len(printed) == 1
    text = printed[0]
    assert 'Compute of "mixed"' in text and "Density (target)" in text
    g2_line = next(line for line in text.splitlines() if "g2 (GatedDense)" in line)
    assert [cell.strip() for cell in g2_line.split("│")[2:-1]] == [
        "1,320", "8", "1,024", "256", "0.500", "0.250", "384",
    ]
    assert "Dense MACs: 5,696   Conditional MACs: 4,288" in text
    assert "Ideal speedup: 1.33x" in text
    printed.clear()
    summary(model, x=rng.random((30, 8, 8, 1)).astype("float32"), print_fn=printed.append)
    assert "Density (measured)" in printed[0] and "measured on 30 examples" in printed[0]


def test_summary_flags_uncounted_layers():
    inputs = keras.Input((4, 3))
    outputs = keras.layers.LSTM(2, name="lstm")(inputs)
    printed = []
    profiling.summary(keras.Model(inputs, outputs), print_fn=printed.append)
    assert "MACs not known for: lstm" in printed[0]
    assert "lstm (LSTM) *" in printed[0]


def test_layer_profile_conditional_macs():
    row = LayerProfile("g", "GatedDense", 10, 1000, blocks=4, policy_macs=40,
                       input_density=0.5, density=0.5, computed_fraction=0.3)
    assert row.conditional_macs == 40 + 300
    assert LayerProfile("d", "Dense", 10, 8).conditional_macs == 8


def test_a_dense_over_unknown_steps_is_flagged_and_a_model_without_gates_takes_x():
    inputs = keras.Input((None, 4))
    steps = keras.Model(inputs, keras.layers.Dense(3, name="per_step")(inputs))
    row = profile_macs(steps).layer("per_step")
    assert (row.dense_macs, row.counted) == (0, False)
    inputs = keras.Input((4, 4))
    known = keras.Model(inputs, keras.layers.Dense(3, name="per_step")(inputs))
    assert profile_macs(known).layer("per_step").dense_macs == 4 * 4 * 3
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    profile = profile_macs(plain, x=np.zeros((5, 4), "float32"))
    assert (profile.examples, profile.dense_macs, profile.conditional_macs) == (5, 12, 12)
