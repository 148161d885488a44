"""Exported gated MLP against the same-width dense MLP exported the same way.

For each density, the Bengio et al. CIFAR-10 MLP shape (3072 -> 24 blocks x
64 -> 24 x 64 -> 10) is built twice with the same kernels: with GatedDense
layers and with `keras.layers.Dense`. Both are exported with
`keras_condcomp.export` to ONNX (twice: with the default dynamic batch,
runtime "onnx", and with a static batch of 1, "onnx_batch1") and to LiteRT
(static batch 1, builtin ops, float32), and timed at batch 1, single thread,
in onnxruntime (`intra_op_num_threads=1`, `inter_op_num_threads=1`) and in
the LiteRT interpreter (`num_threads=1`, its default XNNPACK delegate). Each
gated export is timed against the dense export of its runtime, the two
alternating after a warm-up (median of many calls), in three cache regimes:

- "interleaved": call by call. On this machine (32 MiB last-level cache) the
  28 MiB dense MLP stays mostly in cache between its calls while it pushes
  out the weights the gated model read: the regime least favourable to the
  gated model.
- "warm": runs of 25 calls each: every model in its own steady state, like
  a model serving a stream alone.
- "cold": a 64 MiB buffer is written before every call: both read their
  weights from memory, like a model larger than the caches (the dense MLP
  on a phone) or one called now and then.

Masks: random per example, of a controlled size (`controlled_masks.py`,
shared with `gated_dense.py`). Each input carries, in its
first 24 features, a random 0/1 selection of blocks (the others are uniform
noise); the first policy reads it (logit `10 s_j - 5`, plus small random
weights on every feature) and layer 1 copies it into one unit of each
block, which the second policy reads through a random permutation of the
blocks. Every example has `floor(24 d)` or `ceil(24 d)` active blocks per
layer (mean `24 d`); the measured densities (threshold masks of the real
layers) are recorded. The export budgets are the exporters' defaults
measured on the benchmark inputs (the largest number of active blocks of an
example: nothing dropped; every block for a layer where that is above its
`export_skip_limit`), so exported outputs equal Keras `predict`; that is
checked. Where a default is every block, the skipping graph is also timed
with the largest numbers of active blocks as explicit budgets (rows
"forced_skip"), to show what the limit avoids.

The CNN stack of `benchmarks/gated_conv2d.py` (32x32x3; 3x3 convolutions of
64, 128, 128 filters in 8 groups; pooling; a 10-unit head) is timed the same
way at densities 1/8 to 1/2, with that benchmark's masks: every example has
exactly `8 d` active groups in every layer, at random places (so the
budgets, the most active groups of an input, equal the mean). Its ONNX
export uses a static batch of 1 (a GatedConv2D budget counts the groups of a
batch).

Writes `benchmarks/results/export.json` and `export.png` and prints a table.

    python benchmarks/export.py              # MLP densities 1/16 .. 1/2, CNN 1/8 .. 1/2
    python benchmarks/export.py --repeats 50 --densities 0.0625 --cnn-densities
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

import gated_conv2d
from controlled_masks import selection_inputs, steer_policies
from run_options import HelpFormatter, check_run_options, cpu_description
from keras_condcomp.speed import evict_caches

INPUT_DIM, UNITS, BLOCKS, CLASSES = 3072, 1536, 24, 10
DENSITIES = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
# The CNN stack of benchmarks/gated_conv2d.py: 32x32x3, 3x3 "same" convolutions
# of (filters, groups), 2x2 max pooling after the first two, global average
# pooling, a 10-unit head.
CNN_INPUT, CNN_LAYERS = gated_conv2d.INPUT_SHAPE, gated_conv2d.LAYERS
CNN_DENSITIES = (1 / 8, 1 / 4, 1 / 2)
# How each exported gated model and its dense export share the CPU caches
# (options of `keras_condcomp.speed.median_latencies`).
CACHE_REGIMES = {
    # Call by call: each model finds the caches as the other left them.
    "interleaved": {},
    # Runs of 25 calls: each in its own steady state, like a model serving a
    # stream alone.
    "warm": {"consecutive": 25},
    # 64 MiB written before every call: weights read from memory.
    "cold": {"before_call": evict_caches},
}


def _models(seed=0):
    import keras

    from keras_condcomp.layers import GatedDense

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((INPUT_DIM,), name="inputs")
    gated = GatedDense(UNITS, blocks=BLOCKS, activation="relu", name="gated_1")(inputs)
    gated = GatedDense(UNITS, blocks=BLOCKS, activation="relu", name="gated_2")(gated)
    gated = keras.layers.Dense(CLASSES, name="logits")(gated)
    dense = keras.layers.Dense(UNITS, activation="relu", name="dense_1")(inputs)
    dense = keras.layers.Dense(UNITS, activation="relu", name="dense_2")(dense)
    dense = keras.layers.Dense(CLASSES, name="logits")(dense)
    gated_model = keras.Model(inputs, gated, name="gated_mlp")
    dense_model = keras.Model(inputs, dense, name="dense_mlp")
    g1, g2, head = gated_model.layers[1:]
    steer_policies([g1, g2], np.random.default_rng(seed))
    for source, target in zip((g1, g2, head), dense_model.layers[1:]):
        target.kernel.assign(source.kernel)
        target.bias.assign(source.bias)
    return gated_model, dense_model


def _cnn_models(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    return gated_conv2d._build(seed)


def _cnn_ideal_speedup(budgets):
    size, channels = CNN_INPUT[0], CNN_INPUT[2]
    dense = conditional = 0.0
    for i, ((filters, groups), budget) in enumerate(zip(CNN_LAYERS, budgets.values())):
        macs = size * size * 9 * channels * filters
        dense += macs
        conditional += channels * groups + macs * budget / groups
        channels = filters
        if i < len(CNN_LAYERS) - 1:
            size //= 2
    return (dense + channels * CLASSES) / (conditional + channels * CLASSES)


def _inputs(density, n, seed=1):
    """`n` inputs whose selections have floor/ceil(24 density) blocks, mean 24 density."""
    return selection_inputs(n, INPUT_DIM, BLOCKS, density, np.random.default_rng(seed))


def _ideal_speedup(budgets):
    dense = INPUT_DIM * UNITS + UNITS * UNITS + UNITS * CLASSES
    k1, k2 = budgets["gated_1"] / BLOCKS, budgets["gated_2"] / BLOCKS
    conditional = (
        (INPUT_DIM + UNITS) * BLOCKS  # policies
        + k1 * INPUT_DIM * UNITS + k1 * k2 * UNITS * UNITS + UNITS * CLASSES
    )
    return dense / conditional


def run(densities, repeats, workdir, shape="mlp"):
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from keras_condcomp.export import (
        active_block_counts, block_budgets, export_litert, export_onnx,
    )
    from keras_condcomp.models.policy_gradient_model import gated_layers
    from keras_condcomp.speed import median_latencies

    rows = []
    gated, dense = _models() if shape == "mlp" else _cnn_models()
    blocks = {layer.name: layer.blocks for layer in gated_layers(gated)}
    for density in densities:
        if shape == "mlp":
            x = _inputs(density, 64)
        else:
            x, _ = gated_conv2d._controlled_masks(gated, dense, 64, density, seed=1)
        counts = active_block_counts(gated, x)
        measured = {name: float(c.mean() / blocks[name]) for name, c in counts.items()}
        reference = gated.predict(x, verbose=0)
        # The default budgets, and where a layer's default is every block
        # (above its export_skip_limit), the skipping graph forced with the
        # most active blocks of an input as explicit budgets.
        most = {name: max(1, int(c.max())) for name, c in counts.items()}
        variants = {"default": None}
        if any(
            block_budgets(gated, representative_data=x, batch_size=1, export_format=f) != most
            for f in ("litert", "onnx")
        ):
            variants["forced_skip"] = most
        # A GatedConv2D budget counts the groups of a batch: its ONNX export
        # uses batch 1. The MLP's is timed both with the default dynamic batch
        # ("onnx") and with a static batch of 1 ("onnx_batch1").
        onnx_batches = {"onnx": None, "onnx_batch1": 1} if shape == "mlp" else {"onnx": 1}
        files, calls, errors, budgets = {}, {}, {}, {}
        exports = [("dense", dense, None)] + [
            (f"gated_{variant}", gated, budget) for variant, budget in variants.items()
        ]
        for kind, model, budget in exports:
            for runtime, batch_size in onnx_batches.items():
                path = os.path.join(workdir, f"{kind}_{runtime}.onnx")
                budgets[f"{runtime}_{kind}"] = export_onnx(
                    model, path, representative_data=x, batch_size=batch_size, budget=budget
                )
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                name = session.get_inputs()[0].name
                calls[f"{runtime}_{kind}"] = (
                    lambda batch, session=session, name=name: session.run(None, {name: batch})[0]
                )
                files[f"{runtime}_{kind}"] = os.path.getsize(path)
            litert_path = os.path.join(workdir, f"{kind}.tflite")
            budgets[f"litert_{kind}"] = export_litert(
                model, litert_path, representative_data=x, budget=budget
            )
            interpreter = Interpreter(model_path=litert_path, num_threads=1)
            interpreter.allocate_tensors()
            detail = interpreter.get_input_details()[0]["index"]
            output = interpreter.get_output_details()[0]["index"]

            def litert_call(batch, interpreter=interpreter, detail=detail, output=output):
                interpreter.set_tensor(detail, batch)
                interpreter.invoke()
                return interpreter.get_tensor(output)

            calls[f"litert_{kind}"] = litert_call
            files[f"litert_{kind}"] = os.path.getsize(litert_path)
            if kind != "dense":
                for runtime in (*onnx_batches, "litert"):
                    errors[f"{runtime}_{kind}"] = float(max(
                        np.abs(calls[f"{runtime}_{kind}"](x[i:i + 1]) - reference[i:i + 1]).max()
                        for i in range(len(x))
                    ))
        batches = [x[i:i + 1] for i in range(16)]
        for variant in variants:
            kind = f"gated_{variant}"
            for runtime in (*onnx_batches, "litert"):
                used = budgets[f"{runtime}_{kind}"]
                ideal = (_ideal_speedup if shape == "mlp" else _cnn_ideal_speedup)(used)
                pair = {"dense": calls[f"{runtime}_dense"], "gated": calls[f"{runtime}_{kind}"]}
                for cache, options in CACHE_REGIMES.items():
                    timed = median_latencies(pair, batches, repeats=repeats, warmup=20, **options)
                    rows.append({
                        "shape": shape, "runtime": runtime, "cache": cache, "density": density,
                        "budgets_from": variant,
                        "measured_densities": measured, "budgets": used,
                        "computed_density": {k: v / blocks[k] for k, v in used.items()},
                        "gated_ms": timed["gated"] * 1e3, "dense_ms": timed["dense"] * 1e3,
                        "speedup": timed["dense"] / timed["gated"], "ideal_speedup": ideal,
                        "gated_bytes": files[f"{runtime}_{kind}"],
                        "dense_bytes": files[f"{runtime}_dense"],
                        "file_ratio": files[f"{runtime}_{kind}"] / files[f"{runtime}_dense"],
                        "max_abs_error_vs_keras": errors[f"{runtime}_{kind}"], "repeats": repeats,
                    })
                    print(json.dumps({
                        "progress": f"{shape} {variant} {runtime} {cache} d={density:.4f}",
                        "speedup": rows[-1]["speedup"],
                    }), file=sys.stderr)
    return rows


def _table(rows):
    lines = [f"{'shape':5} {'budgets':11} {'runtime':11} {'cache':11} {'density':>8} {'measured':>9} {'budget':>8} {'dense ms':>9} "
             f"{'gated ms':>9} {'speedup':>8} {'ideal':>7} {'file ratio':>10} {'max err':>9}"]
    for r in rows:
        measured = np.mean(list(r["measured_densities"].values()))
        budget = "/".join(str(v) for v in r["budgets"].values())
        lines.append(
            f"{r['shape']:5} {r['budgets_from']:11} {r['runtime']:11} {r['cache']:11} {r['density']:>8.4f} {measured:>9.4f} {budget:>8} "
            f"{r['dense_ms']:>9.3f} {r['gated_ms']:>9.3f} {r['speedup']:>7.2f}x "
            f"{r['ideal_speedup']:>6.1f}x {r['file_ratio']:>10.3f} {r['max_abs_error_vs_keras']:>9.1e}"
        )
    return "\n".join(lines)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in ("mlp", "cnn") if any(r["shape"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 3.8), squeeze=False)
    titles = {"mlp": "MLP 3072-24x64-24x64-10", "cnn": "CNN 32x32x3, 64-128-128 filters, 8 groups"}
    for ax, shape in zip(axes[0], shapes):
        sel_rows = [r for r in rows if r["shape"] == shape]
        labels = {"onnx": "onnx, dynamic batch" if shape == "mlp" else "onnx, batch 1",
                  "onnx_batch1": "onnx, static batch 1", "litert": "litert"}
        for runtime, color in (("onnx", "C0"), ("onnx_batch1", "C2"), ("litert", "C1")):
            for cache, style in (("interleaved", "o-"), ("warm", "^--"), ("cold", "s:")):
                sel = sorted(
                    (r["density"], r["speedup"]) for r in sel_rows
                    if r["runtime"] == runtime and r["cache"] == cache
                    and r["budgets_from"] == "default"
                )
                if sel:
                    ax.plot(*zip(*sel), style, color=color, label=f"{labels[runtime]}, {cache}")
        forced = [(r["density"], r["speedup"]) for r in sel_rows if r["budgets_from"] != "default"]
        if forced:
            ax.plot(*zip(*forced), "x", color="grey",
                    label="skipping forced above the skip limit (all)")
        ideal = sorted({(r["density"], r["ideal_speedup"]) for r in sel_rows
                        if r["budgets_from"] == "default"})
        ax.plot(*zip(*ideal), "k--", label="ideal (MACs at the budget)")
        ax.axhline(1.0, color="grey", lw=0.8)
        if shape == "mlp":
            ax.axhline(4.0, color="red", lw=0.8, ls=":", label="target at 1/16")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("density (mean fraction of active blocks)")
        ax.set_ylabel("speedup over the dense export")
        ax.set_title(f"Exported {titles[shape]}, 1 thread, batch 1", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--cnn-densities", nargs="*", type=float, default=list(CNN_DENSITIES),
                        help="densities of the GatedConv2D stack (none: skip it)")
    parser.add_argument("--repeats", type=int, default=500,
                        help="timed calls per runtime, model and regime")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder the JSON and PNG results are written to")
    args = parser.parse_args(argv)
    bad = [v for v in args.densities if not 1 / BLOCKS <= v <= 1]
    if bad:
        parser.error(f"--densities must be in [1/{BLOCKS}, 1], got {bad}")
    bad = gated_conv2d._not_whole_groups(args.cnn_densities)
    if bad:
        parser.error(f"--cnn-densities must be multiples of 1/{CNN_LAYERS[0][1]} in (0, 1], "
                     f"got {bad}")
    check_run_options(parser, args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory() as workdir:
        rows = run(args.densities, args.repeats, workdir)
        if args.cnn_densities:
            rows += run(args.cnn_densities, args.repeats, workdir, shape="cnn")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "export.json"), "w") as f:
        json.dump({"cpu": cpu_description(), "cpu_count": os.cpu_count(), "load": os.getloadavg(),
                   "rows": rows}, f, indent=1)
    _plot(rows, os.path.join(args.out, "export.png"))
    print(_table(rows))


if __name__ == "__main__":
    main()
