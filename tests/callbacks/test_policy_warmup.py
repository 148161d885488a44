import copy

import keras

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
    # The policy optimizer's step count (Adam's bias correction, a schedule)
    # started with the policy: 2 epochs of 4 steps, not the warm-up's too.
    assert int(model.optimizer.iterations) == 16 and int(model.policy_optimizer.iterations) == 8
    # A later warm-up takes its own steps back out, not the trained ones.
    model.fit(x, y, epochs=2, batch_size=16, callbacks=[PolicyWarmup(1)], verbose=0)
    assert int(model.policy_optimizer.iterations) == 8 + 4
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


def test_a_fit_stopped_by_an_exception_gives_the_schedule_back(data):
    from keras_condcomp.callbacks import DensityScheduler

    x, y = data
    model = make_model(target_density=0.25)
    layer = model.get_layer("gated_1")

    class Interrupted(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    schedule = [PolicyWarmup(3), DensityScheduler(start=1.0, epochs=4), Interrupted()]
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=4, callbacks=schedule, verbose=0)
    assert layer.policy_enabled and layer.current_target_density == 0.25
    # The next fit, without the callbacks, trains the policy towards 0.25.
    history = model.fit(x, y, epochs=1, verbose=0)
    assert history.history["density"][0] < 1.0
