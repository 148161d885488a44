import copy

import numpy as np
import pytest

from keras_condcomp.callbacks import PolicyWarmup
from tests.callbacks.conftest import make_model


def test_blocks_open_and_policy_frozen_during_warmup_then_on(data):
    x, y = data
    model = make_model(target_density=0.25, sparsity_weight=5.0)
    layer = model.get_layer("gated_1")
    policy_before = [w.numpy().copy() for w in layer.policy.weights]
    kernel_before = layer.kernel.numpy().copy()
    warmup = copy.deepcopy(PolicyWarmup(2))
    history = model.fit(
        x, y, epochs=2, batch_size=16, validation_data=(x, y), callbacks=[warmup], verbose=0
    )
    assert history.history["density"] == [1.0, 1.0]
    assert history.history["val_density"] == [1.0, 1.0]
    assert history.history["policy_enabled"] == [0.0, 0.0]
    for before, after in zip(policy_before, layer.policy.weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert not np.allclose(kernel_before, layer.kernel.numpy())
    # Training ended inside the warm-up: the policy is switched back on.
    assert layer.policy_enabled
    history = model.fit(
        x, y, epochs=4, initial_epoch=2, batch_size=16, callbacks=[warmup], verbose=0
    )
    assert history.history["policy_enabled"] == [1.0, 1.0]
    assert max(history.history["density"]) < 0.9
    assert not np.allclose(policy_before[0], layer.policy.kernel.numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"epochs": -1}, "epochs=-1"), ({"epochs": 1.5}, "epochs=1.5"),
     ({"epochs": True}, "epochs=True"), ({"epochs": 1, "verbose": 3}, "verbose=3")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyWarmup(**kwargs)


def test_model_without_gated_layers(plain_model, data):
    with pytest.raises(ValueError, match="PolicyWarmup needs a model with gated layers"):
        plain_model.fit(*data, epochs=1, callbacks=[PolicyWarmup(1)], verbose=0)
