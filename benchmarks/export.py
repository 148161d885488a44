"""Exported gated MLP against the same-width dense MLP exported the same way.

For each density, the Bengio et al. CIFAR-10 MLP shape (3072 -> 24 blocks x
64 -> 24 x 64 -> 10) is built twice with the same kernels: with GatedDense
layers and with `keras.layers.Dense`. Both are exported with
`keras_condcomp.export` to ONNX (dynamic batch) and to LiteRT (static batch
1, builtin ops, float32), and timed at batch 1, single thread, in
onnxruntime (`intra_op_num_threads=1`, `inter_op_num_threads=1`) and in the
LiteRT interpreter (`num_threads=1`, its default XNNPACK delegate), all four
alternating call by call after a warm-up; the median of many calls is kept.

Masks: random per example, of a controlled size. Each input carries, in its
first 24 features, a random 0/1 selection of blocks (the others are uniform
noise); the first policy reads it (logit `10 s_j - 5`, plus small random
weights on every feature) and layer 1 copies it into one unit of each
block, which the second policy reads through a random permutation of the
blocks. Every example has `floor(24 d)` or `ceil(24 d)` active blocks per
layer (mean `24 d`); the measured densities (threshold masks of the real
layers) are recorded. The export budgets are measured on the benchmark
inputs (the largest number of active blocks of an example: nothing dropped),
so exported outputs equal Keras `predict`; that is checked.

Writes `benchmarks/results/export.json` and `export.png` and prints a table.

    python benchmarks/export.py              # densities 1/16 .. 1/2
    python benchmarks/export.py --repeats 50 --densities 0.0625
"""

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

INPUT_DIM, UNITS, BLOCKS, CLASSES = 3072, 1536, 24, 10
DENSITIES = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def _models(seed=0):
    import keras

    from keras_condcomp.layers import GatedDense

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((INPUT_DIM,), name="inputs")
    gated = GatedDense(UNITS, BLOCKS, activation="relu", name="gated_1")(inputs)
    gated = GatedDense(UNITS, BLOCKS, activation="relu", name="gated_2")(gated)
    gated = keras.layers.Dense(CLASSES, name="logits")(gated)
    dense = keras.layers.Dense(UNITS, activation="relu", name="dense_1")(inputs)
    dense = keras.layers.Dense(UNITS, activation="relu", name="dense_2")(dense)
    dense = keras.layers.Dense(CLASSES, name="logits")(dense)
    gated_model = keras.Model(inputs, gated, name="gated_mlp")
    dense_model = keras.Model(inputs, dense, name="dense_mlp")
    rng = np.random.default_rng(seed)
    g1, g2, head = gated_model.layers[1:]
    # Policy 1 reads the selection in features 0..23.
    z1 = rng.normal(0, 1e-3, (INPUT_DIM, BLOCKS)).astype("float32")
    z1[np.arange(BLOCKS), np.arange(BLOCKS)] = 10.0
    g1.policy.kernel.assign(z1)
    g1.policy.bias.assign(np.full(BLOCKS, -5.0, "float32"))
    # Layer 1 copies the selection into the first unit of each block ...
    k1 = g1.kernel.numpy()
    block = UNITS // BLOCKS
    k1[:BLOCKS] = 0.0
    k1[np.arange(BLOCKS), np.arange(BLOCKS) * block] = 50.0
    g1.kernel.assign(k1)
    # ... which policy 2 reads through a random permutation of the blocks.
    permutation = rng.permutation(BLOCKS)
    z2 = rng.normal(0, 1e-3, (UNITS, BLOCKS)).astype("float32")
    z2[np.arange(BLOCKS) * block, permutation] = 1.0
    g2.policy.kernel.assign(z2)
    g2.policy.bias.assign(np.full(BLOCKS, -25.0, "float32"))
    for source, target in zip((g1, g2, head), dense_model.layers[1:]):
        target.kernel.assign(source.kernel)
        target.bias.assign(source.bias)
    return gated_model, dense_model


def _inputs(density, n, seed=1):
    """`n` inputs whose selections have floor/ceil(24 density) blocks, mean 24 density."""
    rng = np.random.default_rng(seed)
    mean = BLOCKS * density
    low = math.floor(mean)
    counts = np.full(n, low)
    counts[: int(round((mean - low) * n))] += 1
    rng.shuffle(counts)
    x = rng.random((n, INPUT_DIM)).astype("float32")
    x[:, :BLOCKS] = 0.0
    for i, count in enumerate(counts):
        x[i, rng.choice(BLOCKS, size=count, replace=False)] = 1.0
    return x


def _ideal_speedup(budgets):
    dense = INPUT_DIM * UNITS + UNITS * UNITS + UNITS * CLASSES
    k1, k2 = budgets["gated_1"] / BLOCKS, budgets["gated_2"] / BLOCKS
    conditional = (
        (INPUT_DIM + UNITS) * BLOCKS  # policies
        + k1 * INPUT_DIM * UNITS + k1 * k2 * UNITS * UNITS + UNITS * CLASSES
    )
    return dense / conditional


def run(densities, repeats, workdir):
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from keras_condcomp.export import active_block_counts, export_litert, export_onnx
    from keras_condcomp.speed import median_latencies

    rows = []
    gated, dense = _models()
    for density in densities:
        x = _inputs(density, 64)
        counts = active_block_counts(gated, x)
        measured = {name: float(c.mean() / BLOCKS) for name, c in counts.items()}
        reference = gated.predict(x, verbose=0)
        files, calls, errors = {}, {}, {}
        for kind, model in (("gated", gated), ("dense", dense)):
            onnx_path = os.path.join(workdir, f"{kind}.onnx")
            litert_path = os.path.join(workdir, f"{kind}.tflite")
            budgets = export_onnx(model, onnx_path, representative_data=x)
            export_litert(model, litert_path, representative_data=x)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            interpreter = Interpreter(model_path=litert_path, num_threads=1)
            interpreter.allocate_tensors()
            detail = interpreter.get_input_details()[0]["index"]
            output = interpreter.get_output_details()[0]["index"]

            def onnx_call(batch, session=session, name=name):
                return session.run(None, {name: batch})[0]

            def litert_call(batch, interpreter=interpreter, detail=detail, output=output):
                interpreter.set_tensor(detail, batch)
                interpreter.invoke()
                return interpreter.get_tensor(output)

            calls[f"onnx_{kind}"], calls[f"litert_{kind}"] = onnx_call, litert_call
            files[f"onnx_{kind}"] = os.path.getsize(onnx_path)
            files[f"litert_{kind}"] = os.path.getsize(litert_path)
            if kind == "gated":
                gated_budgets = budgets
                errors["onnx"] = float(np.abs(onnx_call(x) - reference).max())
                errors["litert"] = float(max(
                    np.abs(litert_call(x[i:i + 1]) - reference[i:i + 1]).max() for i in range(len(x))
                ))
        batches = [x[i:i + 1] for i in range(16)]
        medians = median_latencies(calls, batches, repeats=repeats, warmup=20)
        for runtime in ("onnx", "litert"):
            rows.append({
                "runtime": runtime, "density": density, "measured_densities": measured,
                "budgets": gated_budgets,
                "computed_density": {k: v / BLOCKS for k, v in gated_budgets.items()},
                "gated_ms": medians[f"{runtime}_gated"] * 1e3,
                "dense_ms": medians[f"{runtime}_dense"] * 1e3,
                "speedup": medians[f"{runtime}_dense"] / medians[f"{runtime}_gated"],
                "ideal_speedup": _ideal_speedup(gated_budgets),
                "gated_bytes": files[f"{runtime}_gated"], "dense_bytes": files[f"{runtime}_dense"],
                "file_ratio": files[f"{runtime}_gated"] / files[f"{runtime}_dense"],
                "max_abs_error_vs_keras": errors[runtime], "repeats": repeats,
            })
            print(json.dumps({"progress": f"{runtime} d={density:.4f}", "speedup": rows[-1]["speedup"]}),
                  file=sys.stderr)
    return rows


def _table(rows):
    lines = [f"{'runtime':8} {'density':>8} {'measured':>9} {'budget':>7} {'dense ms':>9} "
             f"{'gated ms':>9} {'speedup':>8} {'ideal':>7} {'file ratio':>10} {'max err':>9}"]
    for r in rows:
        measured = np.mean(list(r["measured_densities"].values()))
        budget = "/".join(str(v) for v in r["budgets"].values())
        lines.append(
            f"{r['runtime']:8} {r['density']:>8.4f} {measured:>9.4f} {budget:>7} "
            f"{r['dense_ms']:>9.3f} {r['gated_ms']:>9.3f} {r['speedup']:>7.2f}x "
            f"{r['ideal_speedup']:>6.1f}x {r['file_ratio']:>10.3f} {r['max_abs_error_vs_keras']:>9.1e}"
        )
    return "\n".join(lines)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for runtime, style in (("onnx", "o-"), ("litert", "s-")):
        sel = sorted((r["density"], r["speedup"]) for r in rows if r["runtime"] == runtime)
        ax.plot(*zip(*sel), style, label=f"{runtime}, 1 thread, batch 1")
    ideal = sorted({(r["density"], r["ideal_speedup"]) for r in rows})
    ax.plot(*zip(*ideal), "k--", label="ideal (MACs at the budget)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(4.0, color="red", lw=0.8, ls=":", label="target at 1/16")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("density (mean fraction of active blocks)")
    ax.set_ylabel("speedup over the dense export")
    ax.set_title("Exported 3072-24x64-24x64-10 MLP", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    bad = [v for v in args.densities if not 1 / BLOCKS <= v <= 1]
    if bad:
        parser.error(f"--densities must be in [1/{BLOCKS}, 1], got {bad}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory() as workdir:
        rows = run(args.densities, args.repeats, workdir)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "export.json"), "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "load": os.getloadavg(), "rows": rows}, f, indent=1)
    _plot(rows, os.path.join(args.out, "export.png"))
    print(_table(rows))


if __name__ == "__main__":
    main()
