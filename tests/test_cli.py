import argparse
import json
import os
import subprocess
import sys

import keras
import pytest

from keras_condcomp.cli import main
from tests.test_data import fake_mnist

TINY = ["--epochs", "1", "--units", "32", "--blocks", "4", "--layers", "1",
        "--speed-repeats", "3", "--verbose", "0"]


def test_train_writes_results_and_model(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("test_accuracy", "dense_test_accuracy", "equal_macs_dense_test_accuracy",
                "density", "layer_densities", "dense_macs", "conditional_macs",
                "speedup_batch1", "speedup_batch256", "tuned_speedup_batch1",
                "tuned_speedup_batch256", "compact_speedup_batch1", "compact_speedup_batch256"):
        assert key in results
    assert 0 <= results["density"] <= 1 and results["speedup_batch1"] > 0
    assert results["dense_macs"] == 64 * 32 + 32 * 10
    assert sorted(os.listdir(out)) == ["model.keras", "results.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".keras-condcomp")]
    assert results["config"]["sparsity_deviation"] == "absolute"


@pytest.mark.parametrize("schedule, last_rate", [("cosine", 0.0), ("constant", 1e-3)])
def test_learning_rates_follow_the_schedule_over_the_run(schedule, last_rate):
    import argparse

    from keras_condcomp.cli import _learning_rate

    args = argparse.Namespace(lr_schedule=schedule, epochs=4, batch_size=32)
    rate = _learning_rate(1e-3, args, train_size=100)  # 4 steps an epoch, 16 in all
    at = (lambda step: float(rate(step))) if callable(rate) else (lambda step: float(rate))
    assert at(0) == pytest.approx(1e-3)
    assert at(16) == pytest.approx(last_rate, abs=1e-9)


def test_train_cnn_writes_results_and_model(tmp_path):
    out = tmp_path / "run"
    arguments = ["--model", "cnn", "--filters", "8,8", "--blocks", "4", "--epochs", "1",
                 "--batch-size", "256", "--speed-repeats", "1", "--verbose", "0",
                 "--policy-grid", "2", "--sparsity-deviation", "squared", "--out", str(out)]
    assert main(["train", *arguments]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "cnn"
    model = keras.saving.load_model(out / "model.keras")
    # Each policy reads the channel means of 2 x 2 cells: 1 then 8 channels.
    assert [layer.policy.kernel.shape for layer in model.layers if hasattr(layer, "policy")] \
        == [(4, 4), (32, 4)]
    for key in ("test_accuracy", "dense_test_accuracy", "density", "conditional_macs",
                "speedup_batch1", "speedup_batch256", "tuned_speedup_batch1",
                "tuned_speedup_batch256", "compact_speedup_batch1", "compact_speedup_batch256"):
        assert key in results
    assert sorted(results["layer_densities"]) == ["gated_conv_1", "gated_conv_2"]
    assert results["policy_grids"] == {"gated_conv_1": 2, "gated_conv_2": 2}
    assert {layer.sparsity_deviation for layer in model.layers if hasattr(layer, "policy")} \
        == {"squared"}
    # digits are 8x8x1: 3x3 convs of 8 filters at 8x8, then 8 -> 8 at 4x4, the head
    assert results["dense_macs"] == 64 * 9 * 1 * 8 + 16 * 9 * 8 * 8 + 8 * 10
    assert sorted(os.listdir(out)) == ["model.keras", "results.json"]
    # Its export reads the flat digits of results.json's dataset as images.
    exported = tmp_path / "cnn.tflite"
    assert main(["export", str(out / "model.keras"), "--format", "litert",
                 "--out", str(exported)]) == 0
    assert exported.exists()


def test_export_of_a_cnn_budget_with_a_dynamic_batch_is_checked_one_example_a_call(
    tmp_path, capsys, speed_not_measured
):
    from keras_condcomp.data import load_dataset
    from keras_condcomp.export import onnx_predict

    out = tmp_path / "run"
    assert main(["train", "--model", "cnn", "--filters", "8", "--blocks", "4", "--epochs", "1",
                 "--batch-size", "256", "--speed-repeats", "1", "--verbose", "0",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    exported = tmp_path / "cnn.onnx"
    with pytest.warns(UserWarning, match="depends on the other examples of its batch"):
        assert main(["export", str(out / "model.keras"), "--format", "onnx", "--budget", "1",
                     "--out", str(exported)]) == 0
    printed = capsys.readouterr().out
    assert "Checked one example a call" in printed
    digits = load_dataset("digits")
    one_by_one = onnx_predict(exported, digits.x_test.reshape(-1, 8, 8, 1), batch_size=1)
    accuracy = float((one_by_one.argmax(1) == digits.y_test).mean())
    assert f"exported (onnx) {accuracy:.4f}" in printed
    # A static batch of 4 cannot be run one example a call: said so.
    with pytest.warns(UserWarning, match="depends on the other examples of its batch"):
        assert main(["export", str(out / "model.keras"), "--format", "onnx", "--budget", "1",
                     "--batch-size", "4", "--out", str(tmp_path / "cnn4.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "Checked 4 examples a call" in printed and "one example a call" not in printed


def test_train_on_mnist_directory(tmp_path, rng, speed_not_measured):
    fake_mnist(tmp_path, rng, compress=True)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--dataset", "mnist", "--data-dir", str(tmp_path),
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == f"MNIST (12/5 images from {tmp_path.name})"
    # Absolute, so that export finds the data from any folder.
    assert results["config"]["data_dir"] == str(tmp_path.resolve())


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--units", "30", "--blocks", "4"], "--units (30) must be divisible by --blocks (4)"),
        (["--target-density", "0"], "--target-density must be in (0, 1]"),
        (["--epochs", "-2"], "--epochs must be a positive integer"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], "not a directory"),
        (["--dataset", "nope"], "dataset='nope'"),
        (["--lr-schedule", "linear"], "--lr-schedule: invalid choice: 'linear'"),
        (["--policy-grid", "2"], "--policy-grid (2) applies to --model cnn only"),
        (["--model", "cnn", "--policy-grid", "5"],
         "--policy-grid (5) must be at most 4, the rows of the last gated convolution's input"),
        (["--model", "cnn", "--filters", "8,12", "--blocks", "8"],
         "--filters must be comma-separated positive integers divisible by --blocks (8)"),
        (["--model", "cnn", "--filters", "8,8,8,8,8", "--blocks", "4"],
         "5 convolutions pool the 8x8 images 4 times; at most 4 convolutions fit"),
        # Refused before loading: a missing directory would be reported otherwise.
        (["--model", "cnn", "--dataset", "mnist", "--data-dir", "/nonexistent",
          "--policy-grid", "20"], "--policy-grid (20) must be at most 14"),
        (["--sparsity-weight", "nan"], "--sparsity-weight must be a finite number, got 'nan'"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number, got 'inf'"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got '-1'"),
        (["--model", "cnn", "--units", "7"], "--units (7) applies to --model mlp only"),
        (["--filters", "8,8"], "--filters (8,8) applies to --model cnn only"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(
    tmp_path, capsys, arguments, message
):
    out = tmp_path / "run"
    try:
        code = main(["train", *arguments, "--out", str(out)])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code != 0
    stderr = capsys.readouterr().err
    assert message in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    assert not out.exists()


def test_an_out_that_cannot_be_a_folder_is_refused_before_training(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep")
    for out, message in ((taken, "exists and is not a folder"),
                         (taken / "run", "taken is not a folder"),
                         ("", "--out must name a folder")):
        assert main(["train", *TINY, "--out", str(out)]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in last and "Training" not in last
    assert taken.read_text() == "keep" and os.listdir(tmp_path) == ["taken"]


def test_console_command_reports_bad_input_in_one_line(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "keras_condcomp", "train", "--units", "30", "--blocks", "4",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "--units (30) must be divisible by --blocks (4)" in last
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "export"])
def test_help_shows_real_defaults_only(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    # An option without a default says in its help what happens instead.
    assert "(default: None)" not in help_text
    if command == "train":
        assert "examples per training step (default: 32)" in help_text
    else:
        assert "when not given, float32" in help_text


def test_a_layer_that_runs_no_block_is_flagged():
    from keras_condcomp.cli import _density_and_speed_line

    results = dict(layer_densities={"g1": 0.0, "g2": 0.5}, density=0.25, ideal_speedup=3.0,
                   speedup_batch1=1.0, speedup_batch256=1.0, tuned_speedup_batch1=1.0,
                   tuned_speedup_batch256=1.0)
    line = _density_and_speed_line(results)
    assert "warning: g1 runs no block at inference" in line and "g2 runs" not in line


def test_sigterm_stops_train_like_ctrl_c_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "keras_condcomp", "train", "--epochs", "2000", "--units", "32",
         "--blocks", "4", "--layers", "1", "--verbose", "0", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # Stopped once training has begun (its first line is printed before fit).
    first = process.stdout.readline()
    assert first, process.stderr.read()
    process.terminate()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + 15, stderr
    assert "interrupted (SIGTERM)" in stderr and "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


@pytest.fixture
def command_signal_handlers():
    """console_main's handlers for the test, the process's own back after."""
    import signal

    from keras_condcomp import _interrupts

    before = {signum: signal.getsignal(signum) for signum in _interrupts.SIGNALS}
    _interrupts.install()
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


class _SignalAtBatchTwo(keras.callbacks.Callback):
    """Sends this process a SIGTERM as batch 2 of fit, evaluate or predict
    begins; `ended` lists the batches that ran to their end."""

    def __init__(self):
        super().__init__()
        self.ended = []

    def on_batch_begin(self, batch, logs=None):
        if batch == 2:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # handled before kill returns

    def on_batch_end(self, batch, logs=None):
        self.ended.append(batch)

    on_train_batch_begin = on_test_batch_begin = on_predict_batch_begin = on_batch_begin
    on_train_batch_end = on_test_batch_end = on_predict_batch_end = on_batch_end


def test_a_signal_during_fit_stops_it_at_the_next_batch_end(command_signal_handlers):
    import signal

    import numpy as np

    from keras_condcomp import _interrupts

    signaller = _SignalAtBatchTwo()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((64, 4)), np.zeros((64, 2))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with _interrupts.stops_at_batch_ends() as stop:
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[signaller, stop])
    # Batch 2 ran to its end: the signal was not raised inside it.
    assert signaller.ended == [0, 1, 2] and _interrupts.pending() == "SIGTERM"
    # Outside fit, and for a second signal, it is raised at once.
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("step", ["evaluate", "predict"])
def test_a_signal_while_the_job_evaluates_stops_it_at_the_next_batch_end(
    command_signal_handlers, step
):
    import numpy as np

    from keras_condcomp import _interrupts, cli

    signaller = _SignalAtBatchTwo()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "sparse_categorical_crossentropy")
    # The job's own callback is passed last: wrap the model's method so
    # that the test's callback runs first.
    method = getattr(model, step)
    setattr(model, step, lambda *a, callbacks, **k: method(
        *a, callbacks=[signaller, *callbacks], **{**k, "batch_size": 4}))
    x, y = np.zeros((64, 4), "float32"), np.zeros(64, "int64")
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        if step == "evaluate":
            cli._evaluated(model, x, y)
        else:
            cli._accuracy(model, x, y, batch_size=4)
    assert signaller.ended == [0, 1, 2] and _interrupts.pending() == "SIGTERM"


def test_a_signal_while_the_model_is_built_stops_the_job_once_it_is_built(
    command_signal_handlers
):
    # Building traces the layers and may load the native ops: an interrupt
    # raised inside them could surface as another error with a traceback.
    import signal

    import numpy as np

    from keras_condcomp import cli

    steps = []

    def build():
        os.kill(os.getpid(), signal.SIGTERM)  # handled before kill returns
        steps.append("built")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
        model.fit = lambda *a, **k: steps.append("fit")
        return model

    args = argparse.Namespace(epochs=1, batch_size=4, verbose=0)
    x = np.zeros((8, 4))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        cli._trained(build, args, x, x[:, :2], x, x[:, :2])
    assert steps == ["built"]


def test_an_error_after_a_signal_is_reported_as_the_interrupt(
    command_signal_handlers, monkeypatch, capsys
):
    import signal

    from keras_condcomp import _interrupts, cli

    def interrupted_in_native_code(argv=None):
        with _interrupts.stops_at_batch_ends():
            os.kill(os.getpid(), signal.SIGTERM)
            raise TypeError("Failed to convert elements of (None,) to Tensor")

    monkeypatch.setattr(cli, "main", interrupted_in_native_code)
    assert cli.console_main() == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "keras-condcomp: interrupted (SIGTERM)\n"
    monkeypatch.undo()

    # Also when main() turned that error into a one-line CommandError.
    def export_broken_by_a_signal(args):
        with _interrupts.stops_at_batch_ends():
            os.kill(os.getpid(), signal.SIGTERM)
            raise cli.CommandError("the exporter failed")

    monkeypatch.setattr(cli, "train", export_broken_by_a_signal)
    monkeypatch.setattr(sys, "argv", ["keras-condcomp", "train"])
    assert cli.console_main() == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "keras-condcomp: interrupted (SIGTERM)\n"

    # Without a signal, an error is not hidden.
    def broken(argv=None):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "main", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.console_main()


def test_an_export_that_cannot_be_written_is_one_line(
    tmp_path, monkeypatch, capsys, speed_not_measured
):
    import keras_condcomp.export

    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0

    def unwritable(model, path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(keras_condcomp.export, "export_onnx", unwritable)
    assert main(["export", str(out / "model.keras"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 1
    assert "cannot write --out" in capsys.readouterr().err


def test_an_existing_out_folder_holds_the_staging_files_and_main_runs_in_a_thread(
    tmp_path, monkeypatch, speed_not_measured
):
    # A mount point or a folder in a read-only parent: stage inside it.
    # And main() from a worker thread.
    import tempfile
    import threading

    out = tmp_path / "mounted"
    out.mkdir()
    staged = []
    made = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        if kwargs.get("prefix") == ".keras-condcomp-":
            staged.append(kwargs["dir"])
        return made(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(["train", *TINY, "--out", str(out)])))
    worker.start()
    worker.join()
    assert codes == [0]
    assert staged and set(staged) == {str(out)}
    assert sorted(os.listdir(out)) == ["model.keras", "results.json"]
