"""Export to ONNX and LiteRT: parity with Keras, builtin ops only, skipping kept, errors."""

import os

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf

from keras_condcomp.cli import main
from keras_condcomp.export import (
    active_block_counts,
    block_budgets,
    export_litert,
    export_onnx,
    litert_op_names,
    litert_predict,
    onnx_predict,
)
from keras_condcomp.layers import GatedDense
from keras_condcomp.ops import masked_block_dense, to_block_kernel
from keras_condcomp.ops.static_budget_dense import static_budget_dense

ATOL = 1e-5


def _stack(seed, input_dim, layers, head, dense_first=False):
    """A random stack of GatedDense layers (and ordinary ones) with varied densities."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = keras.Input((input_dim,))
    hidden = inputs
    if dense_first:
        hidden = keras.layers.Dense(12, activation="tanh")(hidden)
    for units, blocks in layers:
        layer = GatedDense(units, blocks=blocks, activation="relu")
        hidden = layer(hidden)
        # Biases from mostly-off to mostly-on blocks: several densities.
        layer.policy.bias.assign(rng.normal(-0.5, 1.0, blocks).astype("float32"))
        if dense_first:
            hidden = keras.layers.Dropout(0.5)(hidden)
    outputs = keras.layers.Dense(head)(hidden)
    return keras.Model(inputs, outputs)


STACKS = {
    # name: (seed, input_dim, [(units, blocks)], head, dense_first, LiteRT batch)
    "two_gated": (0, 12, [(32, 8), (24, 4)], 3, False, 1),
    "mixed": (1, 10, [(32, 2), (16, 16)], 2, True, 4),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each stack, its data, and its ONNX and LiteRT exports (budgets measured on the data)."""
    folder = tmp_path_factory.mktemp("exported")
    found = {}
    for name, (seed, input_dim, layers, head, dense_first, batch) in STACKS.items():
        model = _stack(seed, input_dim, layers, head, dense_first)
        x = np.random.default_rng(seed + 10).normal(size=(17, input_dim)).astype("float32")
        onnx_path, litert_path = folder / f"{name}.onnx", folder / f"{name}.tflite"
        # Given explicitly, the most active blocks of an example are used even
        # above a layer's export_skip_limit: the skipping graphs are tested.
        most = {name: max(1, int(c.max())) for name, c in active_block_counts(model, x).items()}
        budgets = export_onnx(model, onnx_path, budget=most)
        assert export_litert(model, litert_path, batch_size=batch, budget=most) == budgets
        found[name] = (model, x, onnx_path, litert_path, budgets)
    return found


@pytest.mark.parametrize("name", sorted(STACKS))
def test_onnx_equals_keras_for_several_batch_sizes(exported, name):
    model, x, onnx_path, _, _ = exported[name]
    reference = model.predict(x, verbose=0)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    for batch_size in (1, 5, 17):
        np.testing.assert_allclose(
            onnx_predict(onnx_path, x, batch_size=batch_size), reference, atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("name", sorted(STACKS))
def test_litert_equals_keras_and_uses_builtin_ops_only(exported, name):
    model, x, _, litert_path, _ = exported[name]
    np.testing.assert_allclose(
        litert_predict(litert_path, x), model.predict(x, verbose=0), atol=ATOL, rtol=0
    )
    ops = litert_op_names(litert_path)
    assert not [op for op in ops if op.startswith("CUSTOM")], ops
    # The skipping is in the graph: top-k of the mask, gather of the tiles.
    assert {"TOPK_V2", "GATHER", "FULLY_CONNECTED"} <= set(ops), ops
    onnx_ops = {node.op_type for node in onnx.load(str(exported[name][2])).graph.node}
    assert {"TopK", "Gather"} <= onnx_ops and not {"If", "Loop"} & onnx_ops, onnx_ops


def test_default_budgets_are_the_most_active_blocks_or_every_block(exported):
    model, x, _, _, budgets = exported["two_gated"]
    counts = active_block_counts(model, x)
    assert budgets == {name: max(1, int(c.max())) for name, c in counts.items()}
    defaults = block_budgets(model, representative_data=x)
    for layer in model.layers[1:3]:
        most = budgets[layer.name]
        assert defaults[layer.name] == (most if most <= 0.4 * layer.blocks else layer.blocks)
    densities = [c.mean() / layer.blocks for c, layer in zip(counts.values(), model.layers[1:3])]
    assert all(0 < d < 1 for d in densities), densities
    # Under its budget, the first layer leaves input blocks of the second at
    # 0: the second reads only `budget` of them (input sparsity, exact).
    assert budgets[model.layers[1].name] < 8


def test_weights_of_inactive_blocks_are_not_read(tmp_path):
    """NaN weights in a block that never runs do not reach the exported outputs."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    layer = GatedDense(8, blocks=4, activation="relu")
    model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
    layer.policy.bias.assign(np.array([0.0, 0.0, 0.0, -1e4], "float32"))  # block 3 never runs
    x = np.random.default_rng(6).normal(size=(8, 6)).astype("float32")
    reference = model.predict(x, verbose=0)
    onnx_path, litert_path = tmp_path / "nan.onnx", tmp_path / "nan.tflite"
    kernel = layer.kernel.numpy()
    kernel[:, 6:] = np.nan
    layer.block_kernel.assign(to_block_kernel(kernel, layer.blocks))
    export_onnx(model, onnx_path, budget=2)
    export_litert(model, litert_path, budget=2)
    keep = active_block_counts(model, x)[layer.name] <= 2
    for outputs in (onnx_predict(onnx_path, x), litert_predict(litert_path, x)):
        assert np.all(np.isfinite(outputs))
        np.testing.assert_allclose(outputs[keep], reference[keep], atol=ATOL)


def test_input_sparsity_is_read_through_layers_that_keep_zeros(tmp_path):
    """Gated -> Dropout -> ReLU -> gated: the second reads only its budget's input blocks."""
    from keras_condcomp.export import _plan

    keras.utils.set_random_seed(11)
    inputs = keras.Input((10,))
    first = GatedDense(32, blocks=8, activation="tanh", name="first")
    second = GatedDense(12, blocks=4, name="second")
    hidden = keras.layers.ReLU()(keras.layers.Dropout(0.3)(first(inputs)))
    model = keras.Model(inputs, second(hidden))
    first.policy.bias.assign(np.linspace(-2, 1, 8).astype("float32"))
    second.policy.bias.assign(np.array([1, 1, -2, -2], "float32"))
    x = np.random.default_rng(11).normal(size=(9, 10)).astype("float32")
    budgets = {"first": 3, "second": 2}
    settings = _plan.trace_settings(model, [first, second], budgets)
    assert settings[id(second)] == {"budget": 2, "input_blocks": 8, "input_budget": 3}
    # A layer between them that does not keep zeros zero (relu(0) = -0.05
    # for that one): no hint.
    for between in (keras.layers.Dense(32), keras.layers.ReLU(negative_slope=0.1, threshold=0.5),
                    keras.layers.Activation("sigmoid")):
        a, b = GatedDense(32, blocks=8, name="first"), GatedDense(12, blocks=4, name="second")
        other = keras.Model(inputs, b(between(a(inputs))))
        settings = _plan.trace_settings(other, [a, b], budgets)
        assert "input_blocks" not in settings[id(b)], between
    counts = active_block_counts(model, x)
    keep = (counts["first"] <= 3) & (counts["second"] <= 2)
    assert 0 < keep.sum() < len(x), counts
    reference = model.predict(x, verbose=0)
    onnx_path, litert_path = tmp_path / "through.onnx", tmp_path / "through.tflite"
    export_onnx(model, onnx_path, budget=budgets)
    export_litert(model, litert_path, budget=budgets)
    top_ks = [n for n in onnx.load(onnx_path).graph.node if n.op_type == "TopK"]
    # first's blocks; second's blocks and its input blocks
    assert len(top_ks) == 3, [n.name for n in top_ks]
    for outputs in (onnx_predict(onnx_path, x), litert_predict(litert_path, x)):
        np.testing.assert_allclose(outputs[keep], reference[keep], atol=ATOL)


def test_budget_drops_the_active_blocks_of_highest_index():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 5)).astype("float32")
    kernel = rng.normal(size=(5, 12)).astype("float32")
    bias = rng.normal(size=12).astype("float32")
    mask = (rng.random((6, 4)) < 0.7).astype("float32")
    kept = mask * (np.cumsum(mask, axis=1) <= 2)
    for batch in (None, 6):
        fn = tf.function(
            lambda v: static_budget_dense(v, kernel, bias, mask, tf.nn.relu, budget=2),
            input_signature=[tf.TensorSpec([batch, 5])],
        )
        np.testing.assert_allclose(
            fn(x), masked_block_dense(x, kernel, bias, kept, tf.nn.relu), atol=1e-6
        )
    single = static_budget_dense(x[:1], kernel, bias, mask[:1], tf.nn.relu, budget=2)
    np.testing.assert_allclose(
        single, masked_block_dense(x[:1], kernel, bias, kept[:1], tf.nn.relu), atol=1e-6
    )


def test_budget_of_every_block_is_the_masked_product():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 8)).astype("float32")
    kernel = rng.normal(size=(8, 12)).astype("float32")
    mask = (rng.random((6, 4)) < 0.5).astype("float32")
    expected = masked_block_dense(x, kernel, None, mask, tf.nn.relu)
    # The input-sparsity hint is not needed when every block is computed.
    for hint in ({}, {"input_blocks": 4, "input_budget": 2}):
        got = static_budget_dense(x, kernel, None, mask, tf.nn.relu, budget=4, **hint)
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_int8_litert_is_smaller_and_close(tmp_path):
    model = _stack(11, 128, [(128, 4)], 3)  # weights large enough to be quantised
    x = np.random.default_rng(12).normal(size=(16, 128)).astype("float32")
    paths = {name: tmp_path / f"{name}.tflite" for name in ("float32", "int8")}
    export_litert(model, paths["float32"], budget=4)
    export_litert(model, paths["int8"], quantize="int8", budget=4)
    assert not [op for op in litert_op_names(paths["int8"]) if op.startswith("CUSTOM")]
    assert os.path.getsize(paths["int8"]) < 0.5 * os.path.getsize(paths["float32"])
    reference = model.predict(x, verbose=0)
    outputs = litert_predict(paths["int8"], x)
    # int8 weights: close to float, and the same decisions on most examples.
    assert np.abs(outputs - reference).max() <= 0.05 * np.abs(reference).max()
    assert np.mean(outputs.argmax(1) == reference.argmax(1)) >= 0.9


def test_block_budgets_defaults_and_checks():
    inputs = keras.Input((8,))
    # ceil(2 * target_density * blocks): 2 of 8, 4 of 8, 1 of 16.
    first = GatedDense(16, blocks=8, target_density=0.125, name="first")
    wide = GatedDense(16, blocks=8, target_density=0.25, name="wide")
    third = GatedDense(16, blocks=16, target_density=0.03, name="third")
    second = GatedDense(16, blocks=4, name="second")
    model = keras.Model(inputs, second(third(wide(first(inputs)))))
    with pytest.warns(UserWarning, match="computing all 4 blocks"):
        budgets = block_budgets(model)
    # 4 of 8 is above GatedDense.export_skip_limit (0.4): every block.
    assert budgets == {"first": 2, "wide": 8, "third": 1, "second": 4}
    given = {"first": 3, "wide": 4, "third": 16, "second": 1}
    assert block_budgets(model, given) == given
    with pytest.raises(ValueError, match="budget=9"):
        block_budgets(model, 9)
    with pytest.raises(ValueError, match="batch_size=0"):
        block_budgets(model, batch_size=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        active_block_counts(model, np.zeros((2, model.inputs[0].shape[1]), "float32"), batch_size=0)
    with pytest.raises(ValueError, match="not gated layers"):
        block_budgets(model, {"nope": 1})
    # Data in other forms: a list of examples is one array, as Keras reads it;
    # a dataset or a generator is named.
    examples = np.random.default_rng(0).normal(size=(5, model.inputs[0].shape[1]))
    np.testing.assert_array_equal(
        active_block_counts(model, examples.tolist())["first"],
        active_block_counts(model, examples)["first"],
    )
    dataset = tf.data.Dataset.from_tensor_slices(examples).batch(2)
    for data, kind in ((dataset, "_BatchDataset"), ((row for row in examples), "generator")):
        with pytest.raises(ValueError, match=f"representative_data.*a {kind}"):
            block_budgets(model, representative_data=data)


class _SampledTwin(GatedDense):
    supports_static_budget = False


@pytest.mark.parametrize(
    "make, kwargs, error, message",
    [
        (lambda: GatedDense(8, blocks=2, inference="sample"), {}, ValueError, "inference='sample'"),
        (lambda: _SampledTwin(8, blocks=2), {}, ValueError, "without an export path"),
        (lambda: GatedDense(8, blocks=2), {"batch_size": 0}, ValueError, "batch_size=0"),
        (lambda: GatedDense(8, blocks=2), {"quantize": "int4"}, ValueError, "quantize='int4'"),
        (lambda: GatedDense(8, blocks=2), {"budget": 3}, ValueError, "budget=3"),
    ],
)
def test_litert_errors_leave_nothing_at_path(tmp_path, make, kwargs, error, message):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, make()(inputs))
    path = tmp_path / "model.tflite"
    path.write_bytes(b"previous")
    with pytest.raises(error, match=message):
        export_litert(model, path, **kwargs)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.tflite"]


def test_non_builtin_op_is_named_and_nothing_is_written(tmp_path):
    class Erfinv(keras.layers.Layer):
        def call(self, inputs):
            return tf.math.erfinv(inputs)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Erfinv()(GatedDense(8, blocks=2)(inputs)))
    with pytest.raises(ValueError, match="not LiteRT builtins: Erfinv"):
        export_litert(model, tmp_path / "flex.tflite", budget=2)
    assert os.listdir(tmp_path) == []


def test_onnx_errors(tmp_path, monkeypatch):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, GatedDense(8, blocks=2)(inputs))
    with pytest.raises(ValueError, match="must end with '.onnx'"):
        export_onnx(model, tmp_path / "model.tflite")
    for opset in (3, 7, 99, 9.0):
        with pytest.raises(ValueError, match=f"opset={opset}"):
            export_onnx(model, tmp_path / "model.onnx", opset=opset)
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ValueError, match="is a folder.*folder.onnx"):
        export_onnx(model, tmp_path / "folder.onnx")
    (tmp_path / "folder.onnx").rmdir()
    with pytest.raises(ValueError, match="path=None"):
        export_onnx(model, None)
    with pytest.raises(ValueError, match="must be a keras.Model"):
        export_onnx(object(), tmp_path / "model.onnx")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install tf2onnx"):
        export_onnx(model, tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_exports_have_the_usual_permissions_and_both_formats_take_several_inputs(tmp_path):
    keras.utils.set_random_seed(0)
    first, second = keras.Input((4,), name="first"), keras.Input((4,), name="second")
    hidden = GatedDense(8, blocks=2, activation="relu")(keras.layers.Concatenate()([first, second]))
    model = keras.Model([first, second], keras.layers.Dense(3)(hidden))
    x = [np.random.default_rng(1).normal(size=(1, 4)).astype("float32") for _ in range(2)]
    expected = model.predict(x, verbose=0)
    umask = os.umask(0o022)
    try:
        export_onnx(model, tmp_path / "two.onnx", budget=2)
        export_litert(model, tmp_path / "two.tflite", budget=2)
    finally:
        os.umask(umask)
    for name in ("two.onnx", "two.tflite"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644
    # Exporting onto a symbolic link rewrites the file it names.
    os.symlink("two.onnx", tmp_path / "latest.onnx")
    export_onnx(model, tmp_path / "latest.onnx", budget=1)
    assert os.readlink(tmp_path / "latest.onnx") == "two.onnx"
    assert sorted(os.listdir(tmp_path)) == ["latest.onnx", "two.onnx", "two.tflite"]
    export_onnx(model, tmp_path / "two.onnx", budget=2)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "two.onnx"))
    feeds = {i.name: array for i, array in zip(session.get_inputs(), x)}
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=ATOL)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tmp_path / "two.tflite"))
    interpreter.allocate_tensors()
    details = sorted(interpreter.get_input_details(), key=lambda d: d["name"])
    for detail, array in zip(details, x):  # "first" < "second"
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    output = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(output, expected, atol=ATOL)
    with pytest.raises(ValueError, match="2 inputs and 1 outputs"):
        onnx_predict(tmp_path / "two.onnx", x[0])


def test_predict_helpers_take_no_examples_and_refuse_a_wrong_shape(exported):
    model, x, onnx_path, litert_path, _ = exported["mixed"]
    empty = x[:0]
    for predict in (onnx_predict, litert_predict):
        result = predict(onnx_path if predict is onnx_predict else litert_path, empty)
        assert result.shape == (0, 2)
        with pytest.raises(ValueError, match=r"`inputs` must have shape \(n, 10\).*\(17, 9\)"):
            predict(onnx_path if predict is onnx_predict else litert_path, x[:, :9])
    for batch_size in (0, -3, 1.5):
        with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
            onnx_predict(onnx_path, x, batch_size=batch_size)
    np.testing.assert_allclose(
        onnx_predict(onnx_path, x, batch_size=np.int64(5)), model.predict(x, verbose=0),
        atol=ATOL,
    )
    # Both take None for the runtime's own thread count.
    for predict, path in ((onnx_predict, onnx_path), (litert_predict, litert_path)):
        np.testing.assert_allclose(predict(path, x, num_threads=None), predict(path, x))


def test_a_mixed_precision_gated_layer_is_refused_with_the_way_out(tmp_path):
    inputs = keras.Input((4,))
    layer = GatedDense(8, blocks=2, dtype="mixed_float16")
    model = keras.Model(inputs, layer(inputs))
    for export, name in ((export_onnx, "m.onnx"), (export_litert, "m.tflite")):
        with pytest.raises(ValueError, match="computes in float16.*mixed_float16.*set_weights"):
            export(model, tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_a_gated_layer_called_twice_is_refused(tmp_path):
    # One trace setting a layer serves all its calls: the second call here
    # (a dense input) would read only the blocks the first call's input has.
    inputs = keras.Input((8,))
    first, shared = GatedDense(8, blocks=4, name="first"), GatedDense(8, blocks=4, name="shared")
    model = keras.Model(inputs, shared(first(inputs)) + shared(inputs))
    for export, name in ((export_onnx, "m.onnx"), (export_litert, "m.tflite")):
        with pytest.raises(ValueError, match="Export does not support.*'shared' 2 times"):
            export(model, tmp_path / name, budget=2)
    with pytest.raises(ValueError, match="gated_layer_inputs does not support.*'shared' 2"):
        active_block_counts(model, np.zeros((3, 8), "float32"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("layer, message", [
    (keras.layers.Activation("gelu"), "not valid ONNX.*Erfc"),
    (keras.layers.Normalization(mean=0.5, variance=2.0), "takes 3 inputs.*Normalization"),
])
def test_graphs_onnx_cannot_hold_are_refused_and_not_written(tmp_path, layer, message):
    inputs = keras.Input((8,))
    model = keras.Model(inputs, GatedDense(8, blocks=4, name="g")(layer(inputs)))
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "m.onnx", budget=2)
    assert os.listdir(tmp_path) == []


def test_a_wrapped_gated_layer_is_refused():
    from keras_condcomp.models import gated_layers

    inputs = keras.Input((5, 8))
    wrapped = keras.layers.TimeDistributed(GatedDense(8, blocks=4, name="inner"), name="steps")
    model = keras.Model(inputs, wrapped(inputs))
    with pytest.raises(ValueError, match="'inner' is wrapped in TimeDistributed 'steps'"):
        gated_layers(model)


def test_model_trained_by_the_cli_exports_and_matches(tmp_path, capsys, speed_not_measured):
    run = tmp_path / "run"
    # Policy trained by REINFORCE only (no density pressure): blocks stay on and off.
    assert main([
        "train", "--epochs", "1", "--units", "64", "--blocks", "4", "--layers", "1",
        "--sparsity-weight", "0", "--example-sparsity-weight", "0", "--variance-weight", "0",
        "--verbose", "0", "--out", str(run),
    ]) == 0
    model = keras.saving.load_model(run / "model.keras")
    x = np.random.default_rng(8).random((20, 64)).astype("float32")
    counts = active_block_counts(model, x)
    assert any(0 < c.mean() < 4 for c in counts.values()), counts
    # The command reads the dataset from results.json and reports the accuracy
    # of Keras and of the exported model in LiteRT on its test set.
    out = tmp_path / "model.tflite"
    capsys.readouterr()
    assert main(["export", str(run / "model.keras"), "--format", "litert", "--out", str(out),
                 "--budget", "4"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy on digits (scikit-learn, 8x8): keras" in printed, printed
    assert "(change +0.0000)" in printed, printed
    assert "4 of 4 (a layer computing every block runs its masked dense product)" in printed
    assert float(printed.split("max |logit difference| ")[1].split(";")[0]) <= ATOL
    reference = model.predict(x, verbose=0)
    np.testing.assert_allclose(litert_predict(out, x), reference, atol=ATOL)
    # A budget above a layer's blocks, and an unreadable results.json: one line each.
    assert main(["export", str(run / "model.keras"), "--format", "onnx",
                 "--out", str(tmp_path / "big.onnx"), "--budget", "5"]) == 1
    assert "budget=5" in capsys.readouterr().err
    (run / "results.json").write_text("{not json")
    assert main(["export", str(run / "model.keras"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 1
    assert "pass --dataset" in capsys.readouterr().err
    assert not (tmp_path / "big.onnx").exists() and not (tmp_path / "m.onnx").exists()
    # Skipping: 3 of the 4 blocks, exact on the examples with at most 3 active.
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, budget=3)
    within = np.all([c <= 3 for c in counts.values()], axis=0)
    assert within.any()
    np.testing.assert_allclose(
        onnx_predict(onnx_path, x)[within], reference[within], atol=ATOL
    )


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.keras"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 1
    assert "cannot load" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_gated_conv2d_stack_exports_and_matches(tmp_path):
    from keras_condcomp.layers import GatedConv2D

    keras.utils.set_random_seed(9)
    rng = np.random.default_rng(9)
    inputs = keras.Input((8, 8, 3))
    hidden = GatedConv2D(
        8, 3, blocks=4, padding="same", activation="relu", policy_grid=2
    )(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = GatedConv2D(12, 3, blocks=3, strides=1, activation="relu")(hidden)
    # GlobalAveragePooling2D, not Flatten: see the note on static shapes below.
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(hidden))
    model = keras.Model(inputs, outputs)
    gated = [layer for layer in model.layers if hasattr(layer, "policy")]
    for layer in gated:
        layer.policy.bias.assign(rng.normal(-0.3, 1.0, layer.blocks).astype("float32"))
    x = rng.normal(size=(7, 8, 8, 3)).astype("float32")
    reference = model.predict(x, verbose=0)
    litert_path, onnx_path = tmp_path / "cnn.tflite", tmp_path / "cnn.onnx"
    counts = active_block_counts(model, x)
    most = {name: max(1, int(c.max())) for name, c in counts.items()}
    budgets = export_litert(model, litert_path, budget=most)
    assert budgets == most
    assert any(budgets[layer.name] < layer.blocks for layer in gated), budgets
    ops = litert_op_names(litert_path)
    assert "CONV_2D" in ops and "GATHER" in ops and not [o for o in ops if o.startswith("CUSTOM")]
    np.testing.assert_allclose(litert_predict(litert_path, x), reference, atol=ATOL)
    # Dynamic batch: a conv budget counts the groups of the whole batch, so
    # it defaults to every group (no batch drops any).
    assert export_onnx(model, onnx_path) == {layer.name: layer.blocks for layer in gated}
    # The masks keep onnxruntime's NCHW layout: one transpose, the input's.
    transposes = [n for n in onnx.load(onnx_path).graph.node if n.op_type == "Transpose"]
    assert len(transposes) == 1, [n.name for n in transposes]
    for batch_size in (1, 7):
        np.testing.assert_allclose(
            onnx_predict(onnx_path, x, batch_size=batch_size), reference, atol=ATOL
        )
    # An explicit budget skips in ONNX too: batch 1, each example its own groups.
    skipping_path = tmp_path / "cnn_skipping.onnx"
    assert export_onnx(model, skipping_path, batch_size=1, budget=most) == most
    op_types = {node.op_type for node in onnx.load(skipping_path).graph.node}
    assert {"TopK", "Gather", "Conv"} <= op_types, op_types
    np.testing.assert_allclose(onnx_predict(skipping_path, x), reference, atol=ATOL)
    # The same budget with a dynamic batch: batch-wide, and said so.
    with pytest.warns(UserWarning, match="depends on the other examples of its batch"):
        block_budgets(model, budget=most, batch_size=None)


def test_the_padding_of_a_last_batch_takes_no_group_of_a_batch_wide_budget(tmp_path):
    """5 examples, a static batch of 4: the padding must not claim a GatedConv2D group."""
    from keras_condcomp.layers import GatedConv2D

    keras.utils.set_random_seed(13)
    inputs = keras.Input((8, 8, 1))
    conv = GatedConv2D(8, 3, padding="same", blocks=4, bias_initializer="ones", name="c")
    model = keras.Model(
        inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    )
    # Bright images run group 3 only; an all-zero image would run group 0.
    conv.policy.kernel.assign(np.array([[-10.0, 0.0, 0.0, 10.0]], "float32"))
    conv.policy.bias.assign(np.array([1.0, -9.0, -9.0, -1.0], "float32"))
    x = np.random.default_rng(13).random((5, 8, 8, 1)).astype("float32") + 0.5
    assert active_block_counts(model, x)["c"].tolist() == [1] * 5
    reference = model.predict(x, verbose=0)
    onnx_path, litert_path = tmp_path / "padded.onnx", tmp_path / "padded.tflite"
    with pytest.warns(UserWarning, match="other examples of its batch"):
        export_onnx(model, onnx_path, batch_size=4, budget=1)
    with pytest.warns(UserWarning, match="other examples of its batch"):
        export_litert(model, litert_path, batch_size=4, budget=1)
    for outputs in (onnx_predict(onnx_path, x), litert_predict(litert_path, x)):
        np.testing.assert_allclose(outputs, reference, atol=ATOL)


def test_budgets_above_the_skip_limit_export_the_masked_dense_graph(tmp_path):
    """Every block: one product with constant weights and the mask; no top-k, no gather."""
    from keras_condcomp.layers import GatedConv2D

    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    inputs = keras.Input((6, 6, 2))
    # ceil(2 * target_density * blocks): 1 of 8 (kept) and 2 of 8 (above 0.2).
    narrow = GatedConv2D(16, 3, blocks=8, padding="same", target_density=0.0625, name="narrow")
    wide = GatedConv2D(16, 3, blocks=8, padding="same", target_density=0.125, name="wide")
    hidden = keras.layers.GlobalAveragePooling2D()(wide(inputs))
    gated_dense = GatedDense(12, blocks=4, activation="relu", target_density=0.5, name="gated_dense")
    model = keras.Model(inputs, keras.layers.Dense(2)(gated_dense(hidden)))
    for layer in (wide, gated_dense):
        layer.policy.bias.assign(rng.normal(0.0, 1.0, layer.blocks).astype("float32"))
    narrow_model = keras.Model(inputs, narrow(inputs))
    assert block_budgets(narrow_model) == {"narrow": 1}
    # Skipping convolution groups never paid in onnxruntime: every group there.
    assert block_budgets(narrow_model, export_format="onnx") == {"narrow": 8}
    assert export_onnx(narrow_model, tmp_path / "narrow.onnx", batch_size=1) == {"narrow": 8}
    with pytest.raises(ValueError, match="export_format='tflite'"):
        block_budgets(narrow_model, export_format="tflite")
    assert block_budgets(model) == {"wide": 8, "gated_dense": 4}
    x = rng.normal(size=(5, 6, 6, 2)).astype("float32")
    mask = keras.ops.convert_to_numpy(wide.block_mask(x))
    assert 0 < mask.mean() < 1, mask
    path = tmp_path / "model.tflite"
    assert export_litert(model, path) == {"wide": 8, "gated_dense": 4}
    ops = litert_op_names(path)
    assert not {"TOPK_V2", "GATHER"} & set(ops) and "CONV_2D" in ops, ops
    np.testing.assert_allclose(litert_predict(path, x), model.predict(x, verbose=0), atol=ATOL)


def test_a_model_of_integer_inputs_exports_and_runs(tmp_path):
    inputs = keras.Input((6,), dtype="uint8")
    hidden = GatedDense(8, blocks=2, activation="relu", target_density=0.5, seed=1)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x = np.random.default_rng(0).integers(0, 255, size=(5, 6)).astype("uint8")
    expected = model.predict(x, verbose=0)
    export_onnx(model, tmp_path / "m.onnx", budget=2)
    np.testing.assert_allclose(onnx_predict(tmp_path / "m.onnx", x), expected, rtol=1e-5, atol=1e-4)
    export_litert(model, tmp_path / "m.tflite", budget=2)
    np.testing.assert_allclose(
        litert_predict(tmp_path / "m.tflite", x), expected, rtol=1e-5, atol=1e-4
    )
