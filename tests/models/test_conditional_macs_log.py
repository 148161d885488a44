import keras
import numpy as np
import pytest

from keras_condcomp import PolicyGradientModel
from keras_condcomp.layers import GatedDense
from keras_condcomp.profiling import profile_macs

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def two_gate_model(between=None):
    inputs = keras.Input((12,))
    h = GatedDense(24, blocks=4, activation="relu", target_density=0.5, name="g1", seed=1)(inputs)
    h = (between or keras.layers.Dropout(0.2))(h)
    h = GatedDense(16, blocks=8, activation="relu", target_density=0.25, name="g2", seed=2)(h)
    return PolicyGradientModel(inputs, keras.layers.Dense(3, name="head")(h))


# A layer between the gated ones that keeps zeros zero: the step (a traced
# graph) profiles the model, testing that layer eagerly.
@pytest.mark.parametrize("between", ["dropout", "relu", "activation"])
def test_conditional_macs_logged_and_equal_to_the_profile(rng, between):
    model = two_gate_model({"dropout": None, "relu": keras.layers.ReLU(),
                            "activation": keras.layers.Activation("relu")}[between])
    model.compile("adam", LOSS, metrics=["accuracy"], policy_optimizer="adam")
    x = rng.normal(size=(96, 12)).astype("float32")
    y = (np.arange(96) % 3).astype("int64")
    history = model.fit(x, y, epochs=2, batch_size=32, validation_data=(x, y), verbose=0)
    profile = profile_macs(model)
    for key in ("conditional_macs", "val_conditional_macs"):
        for value in history.history[key]:
            # Between every block skipped and every block run.
            assert profile.policy_macs + 48 <= value <= profile.dense_macs + profile.policy_macs
    logs = model.evaluate(x, y, batch_size=20, verbose=0, return_dict=True)
    measured = profile_macs(model, x=x)
    assert 0 < measured.layer("g2").computed_fraction < measured.layer("g2").density < 1
    np.testing.assert_allclose(logs["conditional_macs"], measured.conditional_macs, rtol=1e-5)
