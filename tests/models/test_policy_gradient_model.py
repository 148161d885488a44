import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_condcomp import PolicyGradientModel
from keras_condcomp.layers import GatedDense
from keras_condcomp.models import build_gated_mlp
from keras_condcomp.ops import to_block_kernel
from keras_condcomp.profiling import profile_macs

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def tiny_model(input_dim=8, units=16, blocks=4, classes=3, **gate_kwargs):
    gate_kwargs.setdefault("target_density", 0.25)
    inputs = keras.Input((input_dim,))
    hidden = GatedDense(units, blocks=blocks, activation="relu", name="gate", seed=3, **gate_kwargs)(
        inputs
    )
    return PolicyGradientModel(inputs, keras.layers.Dense(classes, name="head")(hidden))


def toy_data(rng, n=64, input_dim=8, classes=3):
    x = rng.normal(size=(n, input_dim)).astype("float32")
    return x, (np.arange(n) % classes).astype("int64")


def test_fit_and_evaluate_log_policy_loss_and_densities(rng):
    model = tiny_model()
    model.compile("adam", LOSS, metrics=["accuracy"], policy_optimizer="adam")
    x, y = toy_data(rng)
    history = model.fit(x, y, epochs=2, batch_size=16, validation_data=(x, y), verbose=0)
    for key in ("loss", "accuracy", "policy_loss", "density", "gate_density"):
        assert key in history.history
        assert f"val_{key}" in history.history
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    mask = model.get_layer("gate").block_mask(x)
    np.testing.assert_allclose(logs["gate_density"], np.mean(mask), atol=1e-6)
    np.testing.assert_allclose(logs["density"], logs["gate_density"])


def test_logged_densities_weigh_every_example_alike(rng):
    model = tiny_model()
    model.compile("adam", LOSS, policy_optimizer="adam")
    x, y = toy_data(rng, n=33)
    expected = float(np.mean(model.get_layer("gate").block_mask(x)))
    for batch_size in (32, 33, 5):  # a last batch of 1, none, of 3
        logs = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
        assert logs["density"] == pytest.approx(expected)
        assert logs["gate_density"] == pytest.approx(expected)


def test_logged_loss_is_the_task_loss_and_policy_loss_has_the_regularisers(rng):
    # With a large L_v weight the gating regulariser is far below 0; it must
    # go to the policy's objective, not into the task loss that `loss` logs.
    model = tiny_model(variance_weight=1e3)
    model.compile("adam", LOSS, policy_optimizer="adam")
    x, y = toy_data(rng)
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert history.history["loss"][0] >= 0.0
    gate = model.get_layer("gate")
    regularisation = float(gate.gating_regularization(gate.block_probabilities(x)))
    assert regularisation < -1.0
    assert history.history["policy_loss"][0] < -1.0
    assert not gate.losses


def test_trains_on_digits_to_accuracy_and_density(digits):
    keras.utils.set_random_seed(0)
    model = build_gated_mlp(
        64, 10, units=256, blocks=16, layers=1, target_density=0.15,
        sparsity_weight=5.0, variance_weight=10.0, seed=0,
    )
    model.compile(
        keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"],
        policy_optimizer=keras.optimizers.Adam(1e-2),
    )
    model.fit(digits.x_train, digits.y_train, epochs=25, batch_size=32, verbose=0)
    logs = model.evaluate(digits.x_test, digits.y_test, verbose=0, return_dict=True)
    assert logs["accuracy"] > 0.93
    assert 0.02 < logs["density"] < 0.35


class SubclassedNet(PolicyGradientModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = GatedDense(16, blocks=4, activation="relu", target_density=0.5, name="g")
        self.head = keras.layers.Dense(3)

    def call(self, inputs, training=None):
        return self.head(self.gate(inputs, training=training))


def test_a_subclass_used_as_a_functional_model_leaves_the_others_subclassable(rng):
    bases = PolicyGradientModel.__bases__

    class Built(PolicyGradientModel):
        # Keras's pattern: a graph built in __init__, handed to super().__init__.
        def __init__(self, **kwargs):
            inputs = keras.Input((8,))
            hidden = GatedDense(16, blocks=4, activation="relu", target_density=0.5)(inputs)
            super().__init__(inputs=inputs, outputs=keras.layers.Dense(3)(hidden), **kwargs)

    class Called(PolicyGradientModel):
        pass

    x, y = toy_data(rng)
    inputs = keras.Input((8,))
    for model in (Built(baseline_momentum=0.5), Called(inputs, tiny_model()(inputs))):
        assert isinstance(model, PolicyGradientModel)
        model.compile("adam", LOSS, policy_optimizer="adam")
        assert "density" in model.fit(x, y, epochs=1, verbose=0).history
    assert PolicyGradientModel.__bases__ == bases
    model = SubclassedNet()
    model.compile("adam", LOSS, policy_optimizer="adam")
    assert "g_density" in model.fit(x, y, epochs=1, verbose=0).history


def test_subclassed_model_trains_and_logs(rng):
    model = SubclassedNet(baseline=None)
    model.compile("adam", LOSS, policy_optimizer="sgd")
    x, y = toy_data(rng)
    history = model.fit(x, y, epochs=1, verbose=0)
    assert "g_density" in history.history
    assert model.predict(x, verbose=0).shape == (64, 3)


def test_sample_weight_tf_data_and_callbacks(rng, tmp_path):
    model = tiny_model()
    model.compile("adam", LOSS, policy_optimizer="adam")
    x, y = toy_data(rng)
    weights = rng.uniform(size=len(x)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(16)
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_density", mode="min"),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
    ]
    model.fit(dataset, validation_data=(x, y), epochs=3, callbacks=callbacks, verbose=0)
    restored = keras.models.load_model(tmp_path / "best.keras")
    assert isinstance(restored, PolicyGradientModel)
    assert any((tmp_path / "tb").rglob("*.v2"))


def test_zero_sample_weight_gives_no_policy_gradient(rng):
    model = tiny_model(sparsity_weight=0.0)
    model.compile(
        keras.optimizers.SGD(0.0), LOSS,
        policy_optimizer=keras.optimizers.SGD(1.0),
    )
    x, y = toy_data(rng)
    before = [v.numpy() for v in model.get_layer("gate").policy.weights]
    model.fit(x, y, sample_weight=np.zeros(len(x)), batch_size=64, epochs=1, verbose=0)
    after = [v.numpy() for v in model.get_layer("gate").policy.weights]
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-7)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    moved = [v.numpy() for v in model.get_layer("gate").policy.weights]
    assert not np.allclose(moved[0], after[0])


@pytest.mark.parametrize(
    "gating",
    [{"sparsity_weight": 0.0}, {"sparsity_weight": 2.0, "variance_weight": 3.0}],
    ids=["reinforce", "with_regularisers"],
)
def test_examples_of_weight_zero_do_not_move_the_policy(rng, gating):
    # Two batches that differ only in the inputs of the examples weighted 0.
    x, y = toy_data(rng, n=16)
    other = x.copy()
    other[8:] = rng.normal(size=(8, 8))
    weights = np.r_[np.ones(8), np.zeros(8)].astype("float32")
    kernels = []
    for inputs in (x, other):
        keras.utils.set_random_seed(0)
        model = tiny_model(**gating)
        model.compile(keras.optimizers.SGD(0.1), LOSS, policy_optimizer=keras.optimizers.SGD(1.0))
        model.fit(inputs, y, sample_weight=weights, batch_size=16, shuffle=False, verbose=0)
        kernels.append(model.get_layer("gate").policy.kernel.numpy())
    assert np.any(kernels[0] != 0.0)
    np.testing.assert_allclose(kernels[0], kernels[1], atol=1e-6)


def test_a_subclassed_model_built_before_compile_compiles_and_trains(rng):
    x, y = toy_data(rng)
    model = SubclassedNet()
    model(x[:1])  # built first, as the multiple-devices guide does
    model.compile("adam", LOSS, policy_optimizer="adam")
    history = model.fit(x, y, epochs=1, verbose=0).history
    assert {"loss", "policy_loss", "density", "g_density"} <= set(history)
    model.compile("adam", LOSS)  # compiled again: the same metrics, once each
    names = [metric.name for metric in model.metrics]
    assert names.count("g_density") == 1 and names.count("policy_loss") == 1


def test_the_policy_cost_is_the_custom_loss_itself(rng):
    class Scaled(keras.losses.Loss):
        # `scale` is not in get_config, and there is no **kwargs.
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def call(self, y_true, y_pred):
            return self.scale * keras.losses.sparse_categorical_crossentropy(
                y_true, y_pred, from_logits=True
            )

    model = tiny_model()
    model.compile("adam", Scaled(100.0))
    x, y = toy_data(rng, n=8)
    y_pred = model(x)
    expected = 100.0 * keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
    np.testing.assert_allclose(model._per_example_loss(y, y_pred, None), expected, rtol=1e-5)
    model.fit(x, y, epochs=1, verbose=0)


def test_gated_layers_of_one_name_in_two_nested_models_are_refused():
    def block(name):
        inputs = keras.Input((8,))
        return keras.Model(inputs, GatedDense(8, blocks=2, name="g")(inputs), name=name)

    inputs = keras.Input((8,))
    model = PolicyGradientModel(inputs, block("first")(block("second")(inputs)))
    with pytest.raises(ValueError, match="several gated layers named 'g'"):
        model.compile("adam", LOSS)
    with pytest.raises(ValueError, match="several gated layers named 'g'"):
        profile_macs(model)


def _loaded_without_skipping(path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = keras.models.load_model(path)
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    return restored


def _assert_same_optimizer_state(model, restored):
    for name in ("optimizer", "policy_optimizer"):
        saved = [v.numpy() for v in getattr(model, name).variables]
        loaded = [v.numpy() for v in getattr(restored, name).variables]
        assert len(saved) == len(loaded)
        for a, b in zip(saved, loaded):
            np.testing.assert_array_equal(a, b)


def test_both_optimizers_survive_save_and_load(rng, tmp_path):
    model = tiny_model()
    model.compile(
        keras.optimizers.Adam(1e-3), LOSS,
        policy_optimizer=keras.optimizers.SGD(0.05, momentum=0.5),
    )
    x, y = toy_data(rng)
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    restored = _loaded_without_skipping(tmp_path / "m.keras")
    assert isinstance(restored.policy_optimizer, keras.optimizers.SGD)
    assert restored.policy_optimizer.learning_rate.numpy() == pytest.approx(0.05)
    assert restored.policy_optimizer.momentum == 0.5
    _assert_same_optimizer_state(model, restored)
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))
    restored.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("style", ["functional", "subclassed, built after compile"])
def test_backup_and_restore_resumes_both_optimizers(rng, tmp_path, style):
    x, y = toy_data(rng)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))

    class Preempted(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("preempted")

    def compiled():
        model = tiny_model() if style == "functional" else SubclassedNet()
        model.compile("adam", LOSS, policy_optimizer="adam")
        model(x[:2])  # BackupAndRestore needs a built model
        return model

    with pytest.raises(RuntimeError, match="preempted"):
        compiled().fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[backup, Preempted()])
    resumed = compiled()
    resumed.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[backup])
    # 4 steps an epoch; the network's Adam resumed after 2 epochs, not from 0.
    assert int(resumed.optimizer.iterations) == int(resumed.policy_optimizer.iterations) == 16


def test_evaluation_reads_the_baseline_without_moving_it(rng):
    model = tiny_model()
    model.compile("adam", LOSS, policy_optimizer="adam")
    x, y = toy_data(rng)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    trained = [model._baseline_average.numpy(), model._baseline_steps.numpy()]
    assert trained[1] == 4.0  # one step per training batch
    first = model.evaluate(x, y, verbose=0, return_dict=True)["policy_loss"]
    second = model.evaluate(x, y, verbose=0, return_dict=True)["policy_loss"]
    assert first == second
    assert [model._baseline_average.numpy(), model._baseline_steps.numpy()] == trained


def test_a_loss_scale_policy_optimizer_survives_save_and_load(rng, tmp_path):
    import warnings

    keras.config.set_dtype_policy("mixed_float16")
    model = tiny_model()
    model.compile(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), LOSS,
        policy_optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
    )
    x, y = toy_data(rng)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = keras.models.load_model(tmp_path / "m.keras")
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    saved = {v.path: v.numpy() for v in model.policy_optimizer.variables}
    loaded = {v.path: v.numpy() for v in restored.policy_optimizer.variables}
    assert saved.keys() == loaded.keys()
    for path, value in saved.items():
        np.testing.assert_array_equal(loaded[path], value)


def test_mixed_precision_trains(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = tiny_model()
    model.compile("adam", LOSS, policy_optimizer="adam")
    x, y = toy_data(rng)
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.get_layer("gate").compute_dtype == "float16"
    assert model.get_layer("gate").policy.compute_dtype == "float32"
    assert model.predict(x, verbose=0).shape == (64, 3)


def _trained_weights(strategy, x, y):
    keras.utils.set_random_seed(7)
    with strategy.scope():
        model = tiny_model(units=16, blocks=4)
        model.compile(
            keras.optimizers.SGD(0.1), LOSS, policy_optimizer=keras.optimizers.SGD(0.1)
        )
    # Masks sampled per replica differ from one device's; open every block
    # so the comparison tests loss scaling, not the sampler.
    model.get_layer("gate").policy.bias.assign(np.full(4, 30.0, "float32"))
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights]


def test_a_model_trained_on_two_replicas_reloads_its_optimizers(rng, tmp_path):
    x, y = toy_data(rng)
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        model = tiny_model()
        model.compile("adam", LOSS, policy_optimizer="adam")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    _assert_same_optimizer_state(model, _loaded_without_skipping(tmp_path / "m.keras"))


def test_mirrored_strategy_matches_one_device(rng):
    assert len(tf.config.list_logical_devices("CPU")) >= 2
    x, y = toy_data(rng)
    single = _trained_weights(tf.distribute.OneDeviceStrategy("/cpu:0"), x, y)
    mirrored = _trained_weights(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), x, y)
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _exact_policy_gradient(model, x, y):
    """Mean and per-sample standard deviation of the REINFORCE estimate
    `c(u) grad log pi(u)`, enumerating every mask `u`."""
    gate = model.get_layer("gate")
    head = model.get_layer("head")
    sigma = gate.policy(x)[0].numpy()
    first, second = 0.0, 0.0
    for bits in itertools.product([0.0, 1.0], repeat=gate.blocks):
        mask = np.array(bits, "float32")
        probability = np.prod(np.where(mask > 0, sigma, 1 - sigma))
        hidden = keras.ops.relu(x @ gate.kernel + gate.bias) * np.repeat(
            mask[None], gate.block_size, axis=1
        )
        cost = float(LOSS(y, head(hidden)))
        # grad of log pi w.r.t. the logits is u - sigma (kernel: x^T (u - sigma)).
        score = np.concatenate([(x.T * (mask - sigma)).ravel(), mask - sigma])
        first = first + probability * cost * score
        second = second + probability * (cost * score) ** 2
    return first, np.sqrt(second - first**2)


def test_reinforce_estimator_is_unbiased(rng):
    model = tiny_model(input_dim=3, units=6, blocks=3, sparsity_weight=0.0, target_density=None)
    model = PolicyGradientModel(model.inputs, model.outputs, baseline=None)
    model.compile(keras.optimizers.SGD(0.0), LOSS, policy_optimizer=keras.optimizers.SGD(1.0))
    gate = model.get_layer("gate")
    gate.policy.kernel.assign(rng.normal(size=(3, 3)).astype("float32"))
    gate.policy.bias.assign(np.array([0.5, -0.3, 0.1], "float32"))
    kernel = np.abs(rng.normal(size=(3, 6))).astype("float32")
    gate.block_kernel.assign(to_block_kernel(kernel, gate.blocks))
    model.get_layer("head").kernel.assign(3 * rng.normal(size=(6, 3)).astype("float32"))
    x = np.abs(rng.normal(size=(1, 3))).astype("float32")
    y = np.array([1])
    exact, spread = _exact_policy_gradient(model, x, y)
    assert np.abs(exact).max() > 1.0  # the check below is not vacuous

    n = 20000
    before = np.concatenate([v.numpy().ravel() for v in gate.policy.trainable_variables])
    model.train_on_batch(np.repeat(x, n, 0), np.repeat(y, n))
    after = np.concatenate([v.numpy().ravel() for v in gate.policy.trainable_variables])
    estimate = before - after  # SGD(1.0) steps by minus the gradient
    standard_error = spread / np.sqrt(n)
    assert np.all(np.abs(estimate - exact) <= 5 * standard_error + 1e-4)


def test_compile_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="loss=None"):
        model.compile("adam")
    inputs = keras.Input((4,))
    plain = PolicyGradientModel(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no gated layer"):
        plain.compile("adam", LOSS)
    gated = GatedDense(4, blocks=2)(inputs)
    two = PolicyGradientModel(inputs, [keras.layers.Dense(2)(gated), keras.layers.Dense(3)(gated)])
    with pytest.raises(ValueError, match="single output.*2 outputs"):
        two.compile("adam", LOSS)
    with pytest.raises(ValueError, match="baseline='mean'"):
        PolicyGradientModel(inputs, keras.layers.Dense(2)(inputs), baseline="mean")
    with pytest.raises(ValueError, match="baseline_momentum=1.5"):
        PolicyGradientModel(inputs, keras.layers.Dense(2)(inputs), baseline_momentum=1.5)


def test_compile_on_another_backend_says_training_needs_tensorflow(monkeypatch):
    # Checked on JAX by hand: the gated layers and predict run there (the
    # masked reference), fit failed inside Keras's stateless train step.
    model = tiny_model()
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="TensorFlow backend only.*'jax'"):
        model.compile("adam", LOSS)
