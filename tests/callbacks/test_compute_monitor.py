import copy
import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_condcomp.callbacks import ComputeMonitor, DensityScheduler, PolicyWarmup
from keras_condcomp.profiling import profile_macs
from tests.callbacks.conftest import make_model


def test_logs_tensorboard_and_png(data, tmp_path):
    x, y = data
    model = make_model(target_density=0.5)
    monitor = copy.deepcopy(
        ComputeMonitor(x, y, log_dir=tmp_path / "logs", plot_path=tmp_path / "plot.png")
    )
    history = model.fit(
        x, y, epochs=2, batch_size=16, validation_data=(x, y), verbose=0,
        callbacks=[DensityScheduler(start=1.0, epochs=1), monitor],
    ).history
    layer = model.get_layer("gated_1")
    # The last epoch's inference density is the threshold mask's on x.
    mask = np.asarray(layer.block_mask(x))
    assert history["gated_1_inference_density"][-1] == pytest.approx(mask.mean())
    assert history["inference_density"][-1] == pytest.approx(mask.mean())
    expected = profile_macs(model, x=x).conditional_macs
    assert history["inference_conditional_macs"][-1] == pytest.approx(expected)
    for prefix in ("", "val_"):
        density = history[f"{prefix}gated_1_density"][-1]
        assert history[f"{prefix}conditional_macs"][-1] == pytest.approx(
            profile_macs(model, {"gated_1": float(density)}).conditional_macs
        )
    assert history["dense_macs"][-1] == 8 * 16 + 16 * 3
    # Per-class usage on x from the same masks.
    usage = monitor.block_usage["gated_1"]
    np.testing.assert_allclose(usage[1], mask[y == 1].mean(axis=0))
    with open(tmp_path / "plot.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "plot.png") > 5000
    tags = {}
    for path in glob.glob(str(tmp_path / "logs" / "compute" / "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    assert tags["inference_density"] == [0, 1]
    assert tags["target_density"] == [0, 1]
    assert tags["gated_1_block_usage"] == [0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"x": np.zeros(3)}, "shape"),
        ({"y": np.zeros(3, int)}, "x=None"),
        ({"x": np.zeros((3, 8)), "y": np.zeros(4, int)}, "shape"),
        ({"x": [np.zeros((3, 8)), np.zeros((4, 8))]}, r"shapes \[\(3, 8\), \(4, 8\)\]"),
        ({"x": {"a": np.zeros((3, 8)), "b": np.zeros(3)}}, "shapes"),
        ({"x": np.zeros((3, 8)), "y": np.zeros(3)}, "dtype float64"),
        ({"plot_path": "usage.pdf"}, "plot_path='usage.pdf'"),
        ({"log_dir": 3}, "log_dir=3"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"x": (row for row in np.zeros((3, 8)))}, "a generator"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ComputeMonitor(**kwargs)


def test_model_without_gated_layers(plain_model, data):
    with pytest.raises(ValueError, match="ComputeMonitor needs a model with gated layers"):
        plain_model.fit(*data, epochs=1, callbacks=[ComputeMonitor()], verbose=0)


def test_inference_density_during_a_warm_up_is_what_predict_uses(data):
    x, y = data
    # Zero policy weights: every logit 0, so the threshold policy runs no block.
    model = make_model(target_density=0.5)
    history = model.fit(
        x, y, epochs=1, batch_size=16, validation_data=(x, y), verbose=0,
        callbacks=[PolicyWarmup(1), ComputeMonitor(x)],
    ).history
    assert history["val_density"] == [1.0]  # evaluation follows the warm-up
    assert history["inference_density"] == [0.0]
    assert float(np.mean(model.get_layer("gated_1").block_mask(x))) == 0.0


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_model_of_two_inputs(rng, as_dict):
    import keras

    from keras_condcomp import PolicyGradientModel
    from keras_condcomp.layers import GatedDense

    left, right = keras.Input((8,), name="left"), keras.Input((4,), name="right")
    joined = keras.layers.Concatenate()([left, right])
    hidden = GatedDense(16, blocks=4, activation="relu", target_density=0.5, seed=1)(joined)
    model = PolicyGradientModel([left, right], keras.layers.Dense(3)(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs = [rng.normal(size=(20, 8)), rng.normal(size=(20, 4))]
    x = dict(zip(["left", "right"], inputs)) if as_dict else inputs
    y = np.arange(20) % 3
    monitor = ComputeMonitor(x, y, batch_size=8)
    logs = model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor]).history
    mask = model.layers[-2].block_mask(np.concatenate(inputs, axis=1).astype("float32"))
    assert logs["inference_density"] == [pytest.approx(float(np.mean(mask)))]
    assert logs["inference_conditional_macs"] == [
        pytest.approx(profile_macs(model, x=x).conditional_macs)
    ]


def test_a_gated_layer_called_twice(rng):
    import keras

    from keras_condcomp import PolicyGradientModel
    from keras_condcomp.layers import GatedDense

    inputs = keras.Input((8,))
    shared = GatedDense(8, blocks=4, activation="relu", target_density=0.5, seed=1, name="shared")
    model = PolicyGradientModel(inputs, keras.layers.Dense(3)(shared(shared(inputs))))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = rng.normal(size=(20, 8)).astype("float32"), np.arange(20) % 3
    monitor = ComputeMonitor(x, y)
    logs = model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor]).history
    first = shared.block_mask(x)
    second = shared.block_mask(shared(x))
    expected = (float(np.mean(first)) + float(np.mean(second))) / 2
    assert logs["shared_inference_density"] == [pytest.approx(expected)]
    assert set(monitor.block_usage["shared"]) == {0, 1, 2}


def test_macs_that_cannot_be_counted_are_left_out_with_a_warning(data, monkeypatch):
    import keras_condcomp.profiling

    def refuse(*args, **kwargs):
        raise ValueError("not countable here")

    monkeypatch.setattr(keras_condcomp.profiling, "profile_macs", refuse)
    x, y = data
    model = make_model()
    with pytest.warns(UserWarning, match="leaves the MACs out of the logs: not countable here"):
        history = model.fit(
            x, y, epochs=1, verbose=0, callbacks=[ComputeMonitor(x)]
        ).history
    assert "inference_conditional_macs" not in history
    assert "inference_density" in history


def test_a_fit_that_raised_leaves_no_writer_open_for_the_next(data, tmp_path):
    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("stopped")

    x, y = data
    model = make_model()
    monitor = ComputeMonitor(x, log_dir=tmp_path)
    with pytest.raises(RuntimeError, match="stopped"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor, Stop()])
    first = monitor._writer
    closed = []
    first.close = lambda close=first.close: (closed.append(True), close())[1]
    model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    assert closed and monitor._writer is None


def test_measure_without_examples_says_so():
    monitor = ComputeMonitor()
    monitor.set_model(make_model())
    with pytest.raises(ValueError, match="create the monitor with `x`"):
        monitor.measure()


def test_labels_in_a_column_and_curves_whatever_the_order_and_validation_freq(data, tmp_path):
    x, y = data
    model = make_model(target_density=0.5)
    # (n, 1) labels, as keras.datasets.cifar10 gives them: classes, not one-hot.
    monitor = ComputeMonitor(x, y[:, None], plot_path=tmp_path / "plot.png")
    history = model.fit(
        x, y, epochs=2, batch_size=16, validation_data=(x, y), validation_freq=2, verbose=0,
        callbacks=[monitor, DensityScheduler(start=1.0, epochs=1)],  # monitor first
    ).history
    assert sorted(monitor.block_usage["gated_1"]) == [0, 1, 2]
    assert [record["target_density"] for record in monitor.history] == pytest.approx(
        history["target_density"]
    )
    assert ["val_density" in record for record in monitor.history] == [False, True]
    assert os.path.getsize(tmp_path / "plot.png") > 5000


def test_an_output_of_one_unit_has_no_predicted_classes(rng, tmp_path):
    from keras_condcomp.layers import GatedDense
    from keras_condcomp.models import PolicyGradientModel

    inputs = keras.Input((8,))
    hidden = GatedDense(16, blocks=4, activation="relu", target_density=0.5, name="g")(inputs)
    model = PolicyGradientModel(inputs, keras.layers.Dense(1)(hidden))
    model.compile(
        "adam", keras.losses.BinaryCrossentropy(from_logits=True), policy_optimizer="adam"
    )
    x = rng.normal(size=(32, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    monitor = ComputeMonitor(x, plot_path=tmp_path / "plot.png")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    mask = np.asarray(model.get_layer("g").block_mask(x))
    assert list(monitor.block_usage["g"]) == ["all"]
    np.testing.assert_allclose(monitor.block_usage["g"]["all"], mask.mean(axis=0))
    assert os.path.exists(tmp_path / "plot.png")
