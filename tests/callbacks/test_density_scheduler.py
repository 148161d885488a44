import copy

import numpy as np
import pytest

from keras_condcomp.callbacks import ComputeMonitor, DensityScheduler
from tests.callbacks.conftest import make_model


def test_linear_schedule_values():
    scheduler = DensityScheduler(start=0.8, epochs=4, start_epoch=2)
    values = [scheduler.target_at(epoch, 0.2) for epoch in range(8)]
    np.testing.assert_allclose(values, [0.8, 0.8, 0.8, 0.65, 0.5, 0.35, 0.2, 0.2])
    assert DensityScheduler(start=0.6, end=0.3, epochs=3).target_at(1, 0.1) == pytest.approx(0.5)
    # The anneal ends on the target itself, not a rounding error from it.
    assert DensityScheduler(start=1.0, epochs=4).target_at(4, 0.2) == 0.2


def test_the_schedule_reaches_the_compiled_train_step(data):
    # The layers' configured target is 0.5 either way; only the schedule differs.
    x, y = data
    densities = {}
    for tau in (0.9, 0.1):
        model = make_model(sparsity_weight=20.0, policy_learning_rate=1.0)
        scheduler = DensityScheduler(schedule=lambda epoch, target, tau=tau: tau)
        history = model.fit(x, y, epochs=2, batch_size=16, callbacks=[scheduler], verbose=0)
        assert history.history["gated_1_target_density"] == pytest.approx([tau, tau])
        assert history.history["target_density"] == pytest.approx([tau, tau])
        densities[tau] = history.history["density"][-1]
        assert model.get_layer("gated_1").get_config()["target_density"] == 0.5
    assert densities[0.9] > 0.65 and densities[0.1] < 0.35


def test_survives_deepcopy_before_set_model_and_logs_anneal(data):
    x, y = data
    scheduler = copy.deepcopy(DensityScheduler(start=1.0, epochs=2))
    model = make_model(target_density=0.25)
    # ComputeMonitor without x: MACs from the logged training densities only.
    callbacks = [scheduler, ComputeMonitor()]
    history = model.fit(x, y, epochs=3, batch_size=32, callbacks=callbacks, verbose=0)
    np.testing.assert_allclose(history.history["gated_1_target_density"], [1.0, 0.625, 0.25])
    assert len(history.history["conditional_macs"]) == 3
    assert "inference_density" not in history.history
    assert model.get_layer("gated_1").current_target_density == pytest.approx(0.25)


def test_a_fit_stopped_mid_schedule_leaves_the_final_target(data):
    x, y = data
    model = make_model(target_density=0.25)
    history = model.fit(
        x, y, epochs=2, batch_size=32, verbose=0,
        callbacks=[DensityScheduler(start=1.0, epochs=10, start_epoch=0)],
    )
    assert history.history["gated_1_target_density"][-1] == pytest.approx(0.925)
    # As a reloaded copy of the model: the next fit without it trains towards 0.25.
    assert model.get_layer("gated_1").current_target_density == pytest.approx(0.25)


def test_numpy_numbers_are_accepted():
    scheduler = DensityScheduler(start=np.float32(0.5), epochs=np.int64(2), start_epoch=np.int64(1))
    assert (scheduler.start, scheduler.epochs, scheduler.start_epoch) == (0.5, 2, 1)
    assert type(scheduler.epochs) is int and type(scheduler.start_epoch) is int


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start": 0.0}, "start=0.0"),
        ({"start": float("nan")}, "start=nan"),
        ({"start": 1.2}, "start=1.2"),
        ({"end": -0.1}, "end=-0.1"),
        ({"epochs": 0}, "epochs=0"),
        ({"epochs": 2.5}, "epochs=2.5"),
        ({"start_epoch": -1}, "start_epoch=-1"),
        ({"schedule": 0.3}, "schedule=0.3"),
        ({"schedule": lambda e, t: t, "start": 0.5}, "not both"),
        ({"verbose": 2}, "verbose=2"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DensityScheduler(**kwargs)


def test_bad_schedule_value_is_reported_at_its_epoch(data):
    x, y = data
    scheduler = DensityScheduler(schedule=lambda epoch, target: 2.0)
    with pytest.raises(ValueError, match=r"Received: schedule\(epoch, target_density\)=2.0"):
        make_model().fit(x, y, epochs=1, callbacks=[scheduler], verbose=0)


def test_model_without_gated_layers(plain_model, data):
    with pytest.raises(ValueError, match="DensityScheduler needs a model with gated layers"):
        plain_model.fit(*data, epochs=1, callbacks=[DensityScheduler()], verbose=0)


def test_model_without_target_density(data):
    with pytest.raises(ValueError, match="no gated layer with a target_density"):
        make_model(target_density=None).fit(
            *data, epochs=1, callbacks=[DensityScheduler()], verbose=0
        )
