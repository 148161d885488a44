"""The masks the benchmarks time are the densities they report."""

import importlib
import importlib.util
import json
import os
import sys

import keras
import numpy as np
import pytest

from keras_condcomp.layers import GatedDense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    # The scripts import their shared helpers as a script does, from their folder.
    folder = os.path.join(ROOT, "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(
        f"benchmark_{name}", os.path.join(folder, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conv_benchmark():
    return _load("gated_conv2d")


@pytest.mark.parametrize("density", [1 / 8, 3 / 16, 3 / 4])
def test_dense_stacks_get_the_selected_number_of_blocks_in_every_layer(density):
    controlled = _load("controlled_masks")
    inputs = keras.Input((40,))
    hidden = GatedDense(64, blocks=8, activation="relu", seed=1)(inputs)
    hidden = GatedDense(64, blocks=8, activation="relu", seed=2)(hidden)
    hidden = GatedDense(32, blocks=8, activation="relu", seed=3)(hidden)
    model = keras.Model(inputs, hidden)
    layers = model.layers[1:]
    rng = np.random.default_rng(0)
    controlled.steer_policies(layers, rng)
    x = controlled.selection_inputs(64, 40, 8, density, rng)
    selected = x[:, :8].sum(axis=1)
    assert set(selected) <= {np.floor(8 * density), np.ceil(8 * density)}
    assert selected.mean() == pytest.approx(8 * density, abs=1 / 64)
    h = x
    for layer in layers:
        mask = np.asarray(layer.block_mask(h))
        np.testing.assert_array_equal(mask.sum(axis=1), selected)
        # At random places: the masks differ between examples, every block used.
        assert len({tuple(row) for row in mask}) > 4
        assert mask.any(axis=0).all()
        h = np.asarray(layer(h, training=False))


@pytest.mark.parametrize("stack", ["cifar", "full-resolution"])
@pytest.mark.parametrize("density", [1 / 8, 1 / 4, 3 / 4])
def test_every_example_has_the_density_in_every_layer(conv_benchmark, stack, density):
    gated, dense = conv_benchmark._build(stack=stack)
    x, per_example = conv_benchmark._controlled_masks(gated, dense, 64, density)
    layers = conv_benchmark._gated_convs(gated)
    masks, h = [], x
    for layer in gated.layers[1:]:
        if layer in layers:
            masks.append(np.asarray(layer.block_mask(h)))
        h = np.asarray(layer(h, training=False))
    for mask in masks:
        np.testing.assert_array_equal(mask.sum(axis=1), density * 8)
        # Random per example: several different masks, and each group used.
        assert len({tuple(row) for row in mask}) > 3
        assert mask.any(axis=0).all()
    np.testing.assert_allclose(per_example, density)
    # The Conv2D stack has the same kernels.
    for g, d in zip(gated.layers[1:], dense.layers[1:]):
        if d.weights:
            np.testing.assert_array_equal(g.kernel.numpy(), d.kernel.numpy())


def test_densities_must_be_whole_groups(conv_benchmark):
    gated, dense = conv_benchmark._build()
    with pytest.raises(ValueError, match="--densities must be multiples of 1/8.*0.3"):
        conv_benchmark._controlled_masks(gated, dense, 4, 0.3)


def _write_result(path, rows, **fields):
    with open(path, "w") as f:
        json.dump({"cpu_count": 2, "tensor_inputs": False, "rows": rows, **fields}, f)
    return str(path)


def test_dense_results_combine_into_one_file(tmp_path):
    bench = _load("gated_dense")

    def row(threads, path, speedup):
        return {"shape": "layer_1024", "threads": threads, "batch": 1, "density": 0.25,
                "path": path, "seconds": 1e-3, "speedup": speedup, "ideal_speedup": 4.0,
                "weight_memory_ratio": 1.02}

    one = _write_result(tmp_path / "one.json", [row(1, "dense", 1.0), row(1, "auto", 1.5)])
    every = _write_result(tmp_path / "all.json", [row("all", "dense", 1.0), row("all", "auto", 1.2)])
    combined = bench._combined([one, every])
    assert combined["combined_from"] == ["one.json", "all.json"]
    assert [(r["threads"], r["path"], r["speedup"]) for r in combined["rows"]] == [
        (1, "dense", 1.0), (1, "auto", 1.5), ("all", "dense", 1.0), ("all", "auto", 1.2)]
    assert combined["cpu_count"] == 2

    again = _write_result(tmp_path / "again.json", [row(1, "auto", 1.4)])
    with pytest.raises(ValueError, match="one.json.*again.json.*threads=1.*path=auto"):
        bench._combined([one, again])
    other_machine = _write_result(tmp_path / "other.json", [], cpu_count=64)
    with pytest.raises(ValueError, match="other.json.*cpu_count=64"):
        bench._combined([one, other_machine])
    other_cpu = _write_result(tmp_path / "other_cpu.json", [], cpu="AMD EPYC (AVX2)")
    with pytest.raises(ValueError, match=r"other_cpu.json.*cpu='AMD EPYC \(AVX2\)'"):
        bench._combined([one, other_cpu])
    avx512 = _write_result(
        tmp_path / "avx512.json", [dict(row(1, "masked", 0.9), native_vector_lanes=16)]
    )
    avx2 = _write_result(
        tmp_path / "avx2.json", [dict(row(1, "native", 0.9), native_vector_lanes=8)]
    )
    assert len(bench._combined([one, avx512])["rows"]) == 3  # `one` records no lanes
    with pytest.raises(ValueError, match=r"avx2.json.*other vector lanes.*'16', '8'"):
        bench._combined([one, avx512, avx2])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read --combine file .*broken.json"):
        bench._combined([one, str(broken)])
    with pytest.raises(ValueError, match="not_a_result.json.*not a gated_dense result"):
        bench._combined([_write_result(tmp_path / "not_a_result.json", [1, 2])])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (["--batch-sizes", "0"], "--batch-sizes must be positive integers, got [0]"),
        (["--threads", "-1"], "--threads must be 0 (all cores) or positive, got [-1]"),
    ],
)
def test_benchmarks_refuse_bad_run_options_before_timing(capsys, arguments, message, tmp_path):
    dense = _load("gated_dense")
    with pytest.raises(SystemExit):
        dense.main([*arguments, "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        dense.main(["--out", str(tmp_path / "file")])
    assert "--out must be a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["gated_dense", "gated_conv2d"])
def test_quick_keeps_the_options_given(monkeypatch, name, tmp_path):
    bench = _load(name)
    seen = []
    monkeypatch.setattr(bench, "_worker", seen.append)
    out = ["--out", str(tmp_path)]
    bench.main(["--worker", "--quick", "--densities", "0.5", *out])
    bench.main(["--worker", "--quick", *out])
    bench.main(["--worker", "--batch-sizes", "4", *out])
    given, quick, full = seen
    assert given.densities == [0.5] and quick.densities == list(bench.QUICK["densities"])
    assert given.batch_sizes == quick.batch_sizes == list(bench.QUICK["batch_sizes"])
    assert full.densities == list(bench.DENSITIES) and full.batch_sizes == [4]
    assert given.threads == quick.threads == full.threads == 1


def test_the_wide_block_shapes_run_only_when_named(monkeypatch, tmp_path):
    bench = _load("gated_dense")
    seen = []
    monkeypatch.setattr(bench, "_worker", seen.append)
    bench.main(["--worker", "--out", str(tmp_path)])
    bench.main(["--worker", "--shapes", "layer_1024_blocks_256", "--out", str(tmp_path)])
    full, wide = seen
    assert full.shapes == ["bengio_cifar10_mlp", "layer_1024", "mnist_784_256"]
    assert wide.shapes == ["layer_1024_blocks_256"]
    assert bench.SHAPES["layer_1024_blocks_256"] == (1024, [(1024, 4)], None)


def test_every_block_major_product_form_is_the_dense_product():
    products = _load("block_major_products")
    rows = products.run([(6, 4, 3), (5, 2, 8)], [1, 3], repeats=1)
    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")
    forms = set(products._forms(None, engine))
    cells = {}
    for row in rows:
        cells.setdefault((row["input_dim"], row["batch"]), set()).add(row["form"])
        assert row["seconds"] > 0 and row["speedup"] > 0
    assert cells == {(d, b): forms for d in (6, 5) for b in (1, 3)}


def test_block_major_products_refuse_a_wrong_form(monkeypatch):
    products = _load("block_major_products")
    forms = products._forms

    def with_a_wrong_form(tf, engine):
        wrong = forms(tf, engine)
        wrong["copied"] = lambda x, block_kernel: tf.matmul(x, tf.reshape(block_kernel, (6, -1)))
        return wrong

    monkeypatch.setattr(products, "_forms", with_a_wrong_form)
    with pytest.raises(AssertionError, match="form 'copied'"):
        products.run([(6, 4, 3)], [3], repeats=1)


def test_block_major_products_refuse_bad_options_before_timing(capsys, tmp_path):
    products = _load("block_major_products")
    for arguments, message in [
        (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (["--threads", "-1"], "--threads must be 0 (all cores) or positive, got [-1]"),
    ]:
        with pytest.raises(SystemExit):
            products.main([*arguments, "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
