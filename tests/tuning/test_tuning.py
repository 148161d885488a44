import argparse
import copy
import json
import math
import os
import socket
import subprocess
import sys
import warnings

import keras
import keras_tuner
import pytest

from keras_condcomp import tuning
from keras_condcomp.profiling import profile_macs
from keras_condcomp.tuning import (
    ComputeAwareScore,
    GatedCNNHyperModel,
    GatedMLPHyperModel,
    TrialResult,
    compute_aware_score,
    pareto_front,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "tune_speed_accuracy.py")
TINY = ["--max-trials", "2", "--epochs", "2", "--train-examples", "400",
        "--layers", "1", "--units", "16", "32"]


def test_score_formula_is_scale_free():
    assert compute_aware_score(0.8, 1000, 1000) == 0.8
    half = compute_aware_score(0.8, 500, 1000, macs_weight=0.05)
    assert half == pytest.approx(0.85)
    # The same ratio in other units gives the same score.
    assert compute_aware_score(0.8, 5e8, 1e9, macs_weight=0.05) == pytest.approx(half)
    assert compute_aware_score(0.8, 4000, 1000, macs_weight=0.05) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="reference_macs=0"):
        compute_aware_score(0.8, 10, 0)
    with pytest.raises(ValueError, match="macs_weight=-1"):
        compute_aware_score(0.8, 10, 10, macs_weight=-1)
    with pytest.raises(ValueError, match="macs_weight=nan"):
        compute_aware_score(0.8, 10, 10, macs_weight=float("nan"))
    with pytest.raises(ValueError, match="reference_macs=inf"):
        compute_aware_score(0.8, 10, float("inf"))
    for name in ("", 3):
        with pytest.raises(ValueError, match=f"name={name!r}"):
            tuning.compute_aware_objective(name)


def test_below_the_accuracy_floor_compute_earns_nothing():
    # A collapsed policy: chance accuracy at a sliver of the compute.
    collapsed = dict(accuracy=0.10, conditional_macs=900, reference_macs=500_000, macs_weight=0.2)
    useful = dict(accuracy=0.93, conditional_macs=250_000, reference_macs=500_000, macs_weight=0.2)
    assert compute_aware_score(**collapsed) > compute_aware_score(**useful)  # no floor
    assert compute_aware_score(**collapsed, min_accuracy=0.5) == 0.10
    assert compute_aware_score(**collapsed, min_accuracy=0.5) < compute_aware_score(
        **useful, min_accuracy=0.5
    )
    callback = ComputeAwareScore(reference_macs=500_000, macs_weight=0.2, min_accuracy=0.5)
    logs = {"accuracy": 0.10, "conditional_macs": 900.0}
    callback.on_epoch_end(0, logs)
    assert logs["compute_aware_score"] == 0.10
    with pytest.raises(ValueError, match="min_accuracy=1.5"):
        compute_aware_score(0.5, 1, 1, min_accuracy=1.5)
    with pytest.raises(ValueError, match="min_accuracy=-0.1"):
        tuning.GatedMLPHyperModel(8, 3, min_accuracy=-0.1)
    hypermodel = tuning.GatedMLPHyperModel(8, 3, min_accuracy=0.4)
    assert hypermodel.min_accuracy == 0.4


def test_callback_writes_scores_validates_and_deep_copies():
    callback = copy.deepcopy(ComputeAwareScore(reference_macs=2000, macs_weight=0.1))
    logs = {"accuracy": 0.5, "conditional_macs": 1000.0,
            "val_accuracy": 0.6, "val_conditional_macs": 4000.0}
    callback.on_epoch_end(0, logs)
    assert logs["compute_aware_score"] == pytest.approx(0.6)
    assert logs["val_compute_aware_score"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="conditional_macs.*Logged: \\['accuracy'"):
        callback.on_epoch_end(0, {"accuracy": 0.5})
    # A fit without validation data says why the objective will be missing.
    callback.on_train_begin()
    callback.on_epoch_end(0, {"accuracy": 0.5, "conditional_macs": 1000.0})
    with pytest.warns(UserWarning, match="no `val_compute_aware_score`"):
        callback.on_train_end()
    callback.on_train_begin()
    callback.on_epoch_end(0, dict(logs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_train_end()
    for kwargs, message in (
        ({"reference_macs": -3}, "reference_macs=-3"),
        ({"reference_macs": 5, "accuracy": ""}, "accuracy=''"),
        ({"reference_macs": 5, "macs_weight": "big"}, "macs_weight='big'"),
    ):
        with pytest.raises(ValueError, match=message):
            ComputeAwareScore(**kwargs)


def test_pareto_front_keeps_only_undominated_results():
    results = [TrialResult(str(i), a, m, {}) for i, (a, m) in enumerate(
        [(0.9, 100.0), (0.9, 200.0), (0.95, 300.0), (0.85, 50.0), (0.95, 300.0), (0.8, 60.0)]
    )]
    front = pareto_front(results)
    assert [r.trial_id for r in front] == ["3", "0", "2", "4"]
    assert not results[0].dominates(results[0])
    assert len(set(front)) == 4  # hashable, hyperparameters and all
    with pytest.raises(ValueError, match="trial 'x' with accuracy=nan"):
        pareto_front(results + [TrialResult("x", float("nan"), 10.0, {})])


def test_untuned_hyperparameters_take_their_defaults():
    hp = keras_tuner.HyperParameters()
    GatedMLPHyperModel((8,), 3).build(hp)
    assert hp.values == {"layers": 2, "units": 256, "blocks": 8, "target_density": 0.25,
                         "sparsity_weight": 1.0, "variance_weight": 1.0,
                         "policy_learning_rate": 0.01}
    hp = keras_tuner.HyperParameters()
    GatedCNNHyperModel((8, 8, 1), 3).build(hp)
    assert {k: hp.values[k] for k in ("conv_layers", "filters", "blocks")} == {
        "conv_layers": 2, "filters": 32, "blocks": 8}


def test_the_score_comes_before_the_callbacks_that_read_it():
    class Recorded(keras.Model):
        def fit(self, *args, callbacks=None, **kwargs):
            return callbacks

    stopping = keras.callbacks.EarlyStopping("val_compute_aware_score", mode="max")
    score = ComputeAwareScore(reference_macs=100)
    hypermodel = GatedMLPHyperModel((8,), 3)
    assert hypermodel.fit(None, Recorded(), callbacks=[stopping, score]) == [score, stopping]
    added, kept = hypermodel.fit(None, Recorded(), callbacks=[stopping])
    assert isinstance(added, ComputeAwareScore) and kept is stopping


def test_hypermodel_space_and_arguments():
    hypermodel = GatedMLPHyperModel((8, 8), 10)
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    assert set(hp.values) == {
        "layers", "units", "blocks", "target_density", "sparsity_weight",
        "variance_weight", "policy_learning_rate",
    }
    gated = [layer for layer in model.layers if hasattr(layer, "policy")]
    assert len(gated) == hp.values["layers"]
    assert gated[0].target_density == hp.values["target_density"]
    assert model.policy_optimizer.learning_rate.numpy() == pytest.approx(
        hp.values["policy_learning_rate"]
    )
    # Default reference: dense MACs of 3 x 512 units on 64 inputs, 10 classes.
    assert hypermodel.reference_macs == 512 * (64 + 2 * 512 + 10)
    hp = keras_tuner.HyperParameters()
    hp.Fixed("units", 20)
    hp.Fixed("blocks", 8)
    with pytest.raises(ValueError, match="units=20, blocks=8"):
        hypermodel.build(hp)
    for fixed, message in (({"blocks": 0}, "blocks=0"),
                           ({"policy_learning_rate": -0.1}, "policy_learning_rate=-0.1")):
        hp = keras_tuner.HyperParameters()
        for key, value in fixed.items():
            hp.Fixed(key, value)
        with pytest.raises(ValueError, match=message):
            hypermodel.build(hp)
    for kwargs, message in (({"seed": "abc"}, "seed='abc'"), ({"seed": -5}, "seed=-5"),
                            ({"learning_rate": float("inf")}, "learning_rate=inf")):
        with pytest.raises(ValueError, match=message):
            GatedMLPHyperModel((4,), 3, **kwargs)
    with pytest.raises(ValueError, match="num_classes=1"):
        GatedMLPHyperModel((4,), 1)
    with pytest.raises(ValueError, match=r"input_shape=\(0,\)"):
        GatedMLPHyperModel((0,), 3)


def test_cnn_hypermodel_space_reference_and_a_real_search(digits, tmp_path):
    images = (8, 8, 1)
    hypermodel = GatedCNNHyperModel(images, 10, learning_rate=1e-2, seed=0)
    # Widest: 3 x (3x3 same conv of 64 filters) on 8x8 -> 4x4 -> 2x2 maps, 10 logits.
    assert hypermodel.reference_macs == (
        8 * 8 * 9 * 1 * 64 + 4 * 4 * 9 * 64 * 64 + 2 * 2 * 9 * 64 * 64 + 64 * 10
    )
    hp = keras_tuner.HyperParameters()
    hp.Fixed("conv_layers", 1)
    hp.Fixed("filters", 16)
    model = hypermodel.build(hp)
    assert set(hp.values) == {
        "conv_layers", "filters", "blocks", "target_density", "sparsity_weight",
        "variance_weight", "policy_learning_rate",
    }
    gated = [layer for layer in model.layers if hasattr(layer, "policy")]
    assert [type(layer).__name__ for layer in gated] == ["GatedConv2D"]
    assert gated[0].blocks == hp.values["blocks"]
    tuner = keras_tuner.RandomSearch(
        hypermodel, objective=tuning.compute_aware_objective(), max_trials=1,
        hyperparameters=hp, directory=str(tmp_path), project_name="cnn", seed=1,
    )
    x_train = digits.x_train[:300].reshape(-1, *images)
    x_test = digits.x_test[:100].reshape(-1, *images)
    tuner.search(x_train, digits.y_train[:300], epochs=1, batch_size=64, verbose=0,
                 validation_data=(x_test, digits.y_test[:100]))
    (trial,) = tuner.oracle.trials.values()
    macs = trial.metrics.get_last_value("val_conditional_macs")
    assert 0 < macs <= profile_macs(tuner.get_best_models(1)[0]).dense_macs + 16
    assert trial.score == pytest.approx(compute_aware_score(
        trial.metrics.get_last_value("val_accuracy"), macs, hypermodel.reference_macs,
        hypermodel.macs_weight,
    ))
    with pytest.raises(ValueError, match=r"length 3.*input_shape=\(64,\)"):
        GatedCNNHyperModel((64,), 10)


class CountingHyperModel(GatedMLPHyperModel):
    fits = 0

    def fit(self, hp, model, *args, **kwargs):
        CountingHyperModel.fits += 1
        return super().fit(hp, model, *args, **kwargs)


def tiny_search(directory, max_trials, overwrite):
    hp = keras_tuner.HyperParameters()
    hp.Fixed("layers", 1)
    hp.Choice("units", [16, 32])
    return keras_tuner.RandomSearch(
        CountingHyperModel((64,), 10, learning_rate=1e-2, seed=0),
        objective=tuning.compute_aware_objective(), max_trials=max_trials,
        hyperparameters=hp, directory=str(directory), project_name="digits",
        overwrite=overwrite, seed=3,
    )


def test_random_search_resumes_and_prints_the_front(digits, tmp_path):
    keras.utils.set_random_seed(0)
    x, y = digits.x_train[:400], digits.y_train[:400]
    fit_kwargs = dict(epochs=2, batch_size=64, verbose=0,
                      validation_data=(digits.x_test[:200], digits.y_test[:200]))
    CountingHyperModel.fits = 0
    tuner = tiny_search(tmp_path, 2, overwrite=True)
    tuner.search(x, y, **fit_kwargs)
    assert CountingHyperModel.fits == 2
    first = {t.trial_id: t.score for t in tuner.oracle.trials.values()}
    resumed = tiny_search(tmp_path, 3, overwrite=False)
    resumed.search(x, y, **fit_kwargs)
    assert CountingHyperModel.fits == 3  # only the new trial ran
    trials = resumed.oracle.trials
    assert sorted(trials) == ["0", "1", "2"]
    assert all(t.status == "COMPLETED" for t in trials.values())
    assert {k: trials[k].score for k in first} == first
    hypermodel = resumed.hypermodel
    for trial in trials.values():
        metrics = trial.metrics
        expected = compute_aware_score(
            metrics.get_last_value("val_accuracy"),
            metrics.get_last_value("val_conditional_macs"),
            hypermodel.reference_macs, hypermodel.macs_weight,
        )
        assert trial.score == pytest.approx(expected)
    # The logged MACs are those of the trial's network (1 x units, 10 logits).
    best = resumed.get_best_models(1)[0]
    dense = profile_macs(best).dense_macs
    best_trial = resumed.oracle.get_best_trials(1)[0]
    units = best_trial.hyperparameters.values["units"]
    assert dense == 64 * units + units * 10
    assert 0 < best_trial.metrics.get_last_value("val_conditional_macs") < dense + 64 * 8 * 2
    printed = []
    plot = tmp_path / "front.png"
    front = tuning.print_pareto_front(resumed, plot_path=str(plot), print_fn=printed.append)
    results = tuning.trial_results(resumed)
    assert front and all(not any(o.dominates(r) for o in results) for r in front)
    assert f"Pareto front: {len(front)} of 3 completed trials" in printed[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no 'val_top5'"):
        tuning.trial_results(resumed, accuracy="val_top5")
    # A plot that cannot be written fails after the table is printed.
    printed = []
    with pytest.raises(OSError):
        tuning.print_pareto_front(resumed, plot_path=str(tmp_path / "no" / "front.png"),
                                  print_fn=printed.append)
    assert "Pareto front" in printed[0]


def test_a_workers_tuner_says_the_chief_holds_the_trials():
    class OracleClient:  # what a distributed search's worker holds
        pass

    with pytest.raises(ValueError, match="only the chief's tuner holds the trials"):
        tuning.trial_results(OracleClient())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_search_chief_and_two_workers(tmp_path, monkeypatch):
    port = str(_free_port())

    def start(tuner_id, *extra):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERASTUNER_TUNER_ID": tuner_id,
               "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port,
               "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.Popen(
            [sys.executable, EXAMPLE, "--directory", str(tmp_path / tuner_id), *TINY, *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    processes = {"chief": start("chief", "--plot", str(tmp_path / "front.png"))}
    processes.update({name: start(name) for name in ("tuner0", "tuner1")})
    outputs = {}
    try:
        for name, process in processes.items():
            outputs[name] = process.communicate(timeout=240)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    for name, process in processes.items():
        assert process.returncode == 0, (name, outputs[name][1][-2000:])
    for name in ("tuner0", "tuner1"):
        assert f"worker {name} done" in outputs[name][0]
    # The chief's oracle holds the whole search: both trials, run by the workers.
    assert "of 2 completed trials" in outputs["chief"][0]
    assert (tmp_path / "front.png").exists()
    # Reload the chief's state here (its files are named after its tuner id).
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    reloaded = keras_tuner.RandomSearch(
        GatedMLPHyperModel((64,), 10), objective=tuning.compute_aware_objective(),
        max_trials=2, directory=str(tmp_path / "chief"), project_name="speed_accuracy",
        overwrite=False,
    )
    trials = reloaded.oracle.trials
    assert len(trials) == 2 and all(t.status == "COMPLETED" for t in trials.values())
    assert all(math.isfinite(t.score) for t in trials.values())
    # Each worker ran and saved a trial of its own.
    ran = {name: sorted(os.listdir(tmp_path / name / "speed_accuracy"))
           for name in ("tuner0", "tuner1")}
    assert all(any(entry.startswith("trial_") for entry in entries) for entries in ran.values()), ran


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_speed_accuracy", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_refuses_to_continue_a_search_with_other_options(tmp_path, capsys):
    example = _example_module()
    directory = str(tmp_path / "search")
    parser = argparse.ArgumentParser()

    def options(**changed):
        values = dict(dataset="digits", data_dir=None, epochs=2, batch_size=32,
                      train_examples=None, layers=1, units=[16, 32], macs_weight=0.02,
                      min_accuracy=0.0, seed=0)
        return argparse.Namespace(directory=directory, **{**values, **changed})

    example._check_same_search(parser, options())  # nothing recorded: a new search
    os.makedirs(os.path.join(directory, "speed_accuracy"))
    example._record_search(options())
    example._check_same_search(parser, options())  # the same search continues
    example._check_same_search(parser, options(units=[32, 16]))  # the same choices
    with pytest.raises(SystemExit):
        example._check_same_search(parser, options(macs_weight=1.0, units=[64]))
    assert "--units [16, 32] -> [64], --macs-weight 0.02 -> 1.0" in capsys.readouterr().err
    # A search recorded before --min-accuracy existed ran without a floor.
    path = example._options_path(options())
    with open(path) as f:
        recorded = json.load(f)
    del recorded["min_accuracy"]
    with open(path, "w") as f:
        json.dump(recorded, f)
    example._check_same_search(parser, options())
    with pytest.raises(SystemExit):
        example._check_same_search(parser, options(min_accuracy=0.5))


@pytest.mark.parametrize("option, value, message", [
    ("--macs-weight", "-1", "--macs-weight must be a finite non-negative number"),
    ("--units", "0", "--units must be positive integers"),
    ("--seed", "-1", "--seed must be in [0, 2**32)"),
    ("--min-accuracy", "2", "--min-accuracy must be in [0, 1]"),
])
def test_the_example_refuses_bad_options(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit):
        _example_module().main(["--directory", str(tmp_path / "search"), option, value])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "search").exists()
