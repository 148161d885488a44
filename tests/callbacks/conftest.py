import keras
import numpy as np
import pytest

from keras_condcomp.models import build_gated_mlp

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_model(target_density=0.5, policy_learning_rate=0.1, **gate_kwargs):
    """A one-layer gated MLP whose policy starts at sigma = 0.5 everywhere."""
    gate_kwargs.setdefault("policy_initializer", "zeros")
    model = build_gated_mlp(
        8, 3, units=16, blocks=4, layers=1, target_density=target_density, seed=2,
        **gate_kwargs,
    )
    model.compile(
        keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"],
        policy_optimizer=keras.optimizers.Adam(policy_learning_rate),
    )
    return model


@pytest.fixture
def data(rng):
    x = rng.normal(size=(64, 8)).astype("float32")
    return x, (np.arange(64) % 3).astype("int64")


@pytest.fixture
def plain_model():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile("adam", LOSS)
    return model
