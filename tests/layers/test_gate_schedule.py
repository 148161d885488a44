"""GatedDense's training-time schedule state (current tau, policy on/off)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_condcomp.layers import DecisionRecorder, GatedDense

TAU = 0.5


def built_layer(**kwargs):
    kwargs.setdefault("target_density", TAU)
    layer = GatedDense(
        16, blocks=4, activation="relu", sparsity_weight=1.0, seed=1,
        policy_initializer="zeros", **kwargs,
    )
    layer.build((None, 8))
    return layer


def test_traced_call_reads_the_current_target_density(rng):
    layer = built_layer()
    x = rng.normal(size=(6, 8)).astype("float32")

    @tf.function
    def regularization():
        with DecisionRecorder() as recorder:
            layer(x, training=True)
        return recorder.decisions[0].regularization

    # Zero policy weights: sigma = 0.5 everywhere, so L_b + L_e = (4 + 1) |0.5 - tau|.
    np.testing.assert_allclose(regularization(), 0.0, atol=1e-6)
    layer.set_current_target_density(0.1)
    np.testing.assert_allclose(regularization(), 5 * 0.4, rtol=1e-5)
    assert regularization.experimental_get_tracing_count() == 1
    assert layer.target_density == TAU and layer.get_config()["target_density"] == TAU
    assert layer.current_target_density == pytest.approx(0.1)


def test_policy_off_opens_every_block_and_stops_the_policy_gradient(rng):
    layer = built_layer(policy_bias_initializer=keras.initializers.Constant(-3.0))
    x = rng.normal(size=(32, 8)).astype("float32")
    layer.set_policy_enabled(False)
    with tf.GradientTape() as tape:
        with DecisionRecorder() as recorder:
            y = layer(x, training=True)
        decision = recorder.decisions[0]
        objective = tf.reduce_sum(decision.logits) + decision.regularization
    np.testing.assert_array_equal(decision.mask, np.ones((32, 4)))
    assert float(decision.regularization) == 0.0
    for gradient in tape.gradient(objective, layer.policy.trainable_variables):
        assert gradient is None or not np.any(gradient)
    dense = keras.layers.Dense(16, activation="relu")
    dense.build((None, 8))
    dense.set_weights([layer.kernel.numpy(), layer.bias.numpy()])
    np.testing.assert_allclose(y, dense(x), atol=1e-6)
    # predict and other calls outside the model's steps still use the policy.
    assert float(np.mean(layer.block_mask(x))) < 0.2
    layer.set_policy_enabled(True)
    with DecisionRecorder() as recorder:
        layer(x, training=True)
    assert float(np.mean(recorder.decisions[0].mask)) < 0.5


def test_schedule_state_is_not_a_weight_and_survives_saving(tmp_path, rng):
    inputs = keras.Input((8,))
    layer = GatedDense(16, blocks=4, activation="relu", target_density=0.25, name="g")
    model = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
    assert len(layer.weights) == 4 and len(model.weights) == 6
    layer.set_current_target_density(0.9)
    layer.set_policy_enabled(False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.get_layer("g")
    assert again.target_density == 0.25 and again.current_target_density == 0.25
    assert again.policy_enabled
    x = rng.normal(size=(5, 8)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("value", [0.0, 1.5, "0.2", None, True])
def test_bad_current_target_density(value):
    with pytest.raises(ValueError, match=f"value={value!r}"):
        built_layer().set_current_target_density(value)


def test_no_target_density_to_schedule():
    with pytest.raises(ValueError, match="target_density=None"):
        built_layer(target_density=None).set_current_target_density(0.3)


def test_policy_enabled_must_be_bool():
    with pytest.raises(ValueError, match="enabled=1"):
        built_layer().set_policy_enabled(1)
