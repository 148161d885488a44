"""GatedDense inference speed against keras.layers.Dense, side by side.

For each shape, density and batch size, one process times each of these
against `dense` alone, the two alternating call by call after a warm-up,
median of many calls (the `dense` row is the median of its pairs). The
warm-up is `keras_condcomp.speed.WARMUP_CALLS` (100) calls of each: until a
graph's 90th call or so TensorFlow's executor hands each of its ops to
another thread, which slowed the graphs of more ops (until session 48 the
warm-up was 3 calls, and the gated paths were timed in that phase: 784 ->
256 at 3/4, two threads, `"auto"` 0.90x-0.92x of Dense against 1.01x-1.06x
after 100 calls):

- `dense`: the same-width `keras.layers.Dense` stack (same kernels),
- `masked`: the gated stack computing densely and masking (the reference),
- `auto` and every forced path of `keras_condcomp.ops.EXECUTION_PATHS`
  (`native`: the native kernels' op, `keras_condcomp.ops.native_kernels`),
- `auto_tf`: `auto` traced without the native kernels (its TensorFlow
  paths, as where no compiler builds them),
- `tuned`: the gated stack with each layer's path chosen by
  `keras_condcomp.models.tune_execution` for that batch size,
- `compact`: `keras_condcomp.models.compact_inference(model)`: on the
  native kernels, one eager op call for the whole stack at any batch size
  (no graph), else at batch 1 the layers as one graph chain, each gated
  layer's active blocks passed to the next without being placed among
  zeros, and above batch 1 the model's graph,
- `dense_ops`: the Dense stack as eager TensorFlow ops (matmul, bias,
  ReLU), no graph: what the Dense stack gains from skipping the graph call
  that `compact`'s native chain skips,
- `eager`: `model(x)` called eagerly, outside any `tf.function` (each gated
  layer then runs as one compiled graph), timed against the Dense stack
  called eagerly (its speedup is over that, not over `dense`),
- `tf_dense_copy`: the gated stack as TensorFlow ops on a copy of each
  gated kernel in Dense's layout (twice the kernels' memory, so not a path
  of the engine): the policy's mask, Dense's product, the skipped blocks
  zeroed. What `auto_tf` could reach where it falls back to the dense
  product, had it such a copy (the engine's fallback reads the block-major
  kernel, of which no 2-D view is Dense's),
- two bounds, as speedups over dense in the `call` and `stream` columns:
  `floor_call`, a graph that only slices its input (the fixed cost of a
  call: no graph beats dense by more), and `floor_stream`, a graph that
  reads every kernel of the dense stack once (no path that reads every
  weight, as any must when every block is used by some example of the
  batch, beats dense by more).

Apart from `eager` and `compact` (graphs of its own), every model
runs as one `tf.function` over `model(x, training=False)`. Every graph,
`compact`'s included, is called as its concrete function
(`keras_condcomp.speed.numpy_calls`), so graph-call overhead is the same
for all. (Until session 28 the benchmarks called the `tf.function`s, about
0.1 ms more a call: the tables of earlier sessions carry that cost.) The
masks are the layers' own threshold policies (policy cost included), random
per example and of a controlled size: the inputs and policy weights are
built so that every example has `floor(blocks d)` or `ceil(blocks d)`
active blocks in every gated layer (`controlled_masks.py`, as in
`export.py`). (Policy biases set so that each block was open for a fraction
`d` of random inputs, as before, gave the right mean but not per example:
on the Bengio MLP at 1/16, 59 and 107 of 256 examples had no active block
in the two layers, others up to 6 and 9.)

Each call gets a numpy batch, as `model.predict_on_batch` and most
`model(x)` calls do (consecutive batches of the benchmark's examples in
turn; the JSON records their densities, `timed_layer_densities`);
`--tensor-inputs` feeds TensorFlow tensors instead, as a `tf.data`
pipeline would (`model.predict` batches its input through one), which
saves each call the conversion (the same for every model, so a larger
share of the faster ones' time; `_tensor_inputs` in the result names).

Threads are pinned before TensorFlow starts, in a fresh process per setting:
`--threads 1` sets `tf.config.threading` intra-op and inter-op parallelism to
1; `--threads 0` leaves TensorFlow's defaults (all cores).

Each row records the vector lanes of the native kernels timed
(`native_vector_lanes`: 16 built for AVX-512, 8 without it, None where no
compiler built them). To time the AVX2 build on an AVX-512 machine, give
the build a compiler that adds `-mno-avx512f` (its cache entry is its own,
keyed by the compiler's path):

    printf '#!/bin/sh\nexec c++ "$@" -mno-avx512f\n' > /tmp/cxx-avx2 && chmod +x /tmp/cxx-avx2
    CXX=/tmp/cxx-avx2 python benchmarks/gated_dense.py --paths auto native

Writes `gated_dense.json` and `gated_dense.png` (speedup over dense vs
density, with the ideal line) to `--out` (default `benchmarks/results`;
`gated_dense_quick.*` with `--quick`, `*_tensor_inputs.*` with
`--tensor-inputs`) and prints a table.

    python benchmarks/gated_dense.py            # full run (about 40 minutes on 2 cores)
    python benchmarks/gated_dense.py --quick    # Bengio shape, batch 1 and 50

The default shapes are the issue's three (`DEFAULT_SHAPES`); two more, of
blocks wider than 64 units, run when named (`--shapes
layer_1024_blocks_128 layer_1024_blocks_256`: 1024 -> 1024 in 8 or 4
blocks).

A full run can be made in parts (`--shapes`, `--threads`, `--out`), whose
result files `--combine` then merges into `gated_dense.json` and its plot:

    python benchmarks/gated_dense.py --combine part1.json part2.json
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from controlled_masks import selection_inputs, steer_policies
from run_options import (
    HelpFormatter,
    add_sweep_options,
    check_run_options,
    cpu_description,
    fill_defaults,
)

SHAPES = {
    # name: (input_dim, [(units, blocks), ...], head units or None)
    "bengio_cifar10_mlp": (3072, [(1536, 24), (1536, 24)], 10),
    "layer_1024": (1024, [(1024, 16)], None),
    "mnist_784_256": (784, [(256, 16)], None),
    # Not in the default grid: blocks wider than 64 units.
    "layer_1024_blocks_128": (1024, [(1024, 8)], None),
    "layer_1024_blocks_256": (1024, [(1024, 4)], None),
}
# The issue's three shapes: the grid's default.
DEFAULT_SHAPES = ("bengio_cifar10_mlp", "layer_1024", "mnist_784_256")
DENSITIES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)
BATCH_SIZES = (1, 50, 256)
PATHS = ("auto", "native", "per_example", "grouped", "static_capacity")
QUICK = {"shapes": ("bengio_cifar10_mlp",), "densities": (1 / 16, 3 / 4), "batch_sizes": (1, 50),
         "threads": (1,)}
# Forced per_example gathers every pair's tiles: skip it when that is huge.
PER_EXAMPLE_MAX_GATHER = 2e8


def _build(shape, seed=0):
    import keras

    from keras_condcomp.layers import GatedDense

    input_dim, layers, head = SHAPES[shape]
    inputs = keras.Input((input_dim,))
    gated, dense = inputs, inputs
    for units, blocks in layers:
        gated = GatedDense(units, blocks=blocks, activation="relu", seed=seed)(gated)
        dense = keras.layers.Dense(units, activation="relu")(dense)
    if head:
        gated = keras.layers.Dense(head)(gated)
        dense = keras.layers.Dense(head)(dense)
    gated_model, dense_model = keras.Model(inputs, gated), keras.Model(inputs, dense)
    steer_policies(
        [layer for layer in gated_model.layers if isinstance(layer, GatedDense)],
        np.random.default_rng(seed),
    )
    for g, d in zip(gated_model.layers[1:], dense_model.layers[1:]):
        d.kernel.assign(g.kernel)
        d.bias.assign(g.bias)
    return gated_model, dense_model


def _densities(gated_model, x):
    """`(examples, gated layers)`: the fraction of active blocks of each example of `x`."""
    from keras_condcomp.layers import GatedDense

    h = x
    per_example = []
    for layer in gated_model.layers[1:]:
        if isinstance(layer, GatedDense):
            per_example.append(np.asarray(layer.block_mask(h)).mean(axis=1))
        h = np.asarray(layer(h, training=False))
    return np.stack(per_example, axis=1)


def _ideal_speedup(shape, densities):
    """Dense MACs / conditional MACs (policies and input sparsity included)."""
    input_dim, layers, head = SHAPES[shape]
    dense = conditional = 0.0
    d, in_density = input_dim, 1.0
    for (units, blocks), density in zip(layers, densities):
        dense += d * units
        conditional += d * blocks + in_density * density * d * units
        d, in_density = units, density
    if head:
        dense += d * head
        conditional += d * head
    return dense / conditional


def _weight_bytes(model):
    return int(sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights))


def _dense_copy_stack(gated):
    """The gated stack as TensorFlow ops on its gated kernels copied to
    Dense's layout (`tf_dense_copy`)."""
    import tensorflow as tf

    from keras_condcomp.layers import GatedDense
    from keras_condcomp.ops import masked_block_dense

    copies = {id(layer): tf.Variable(layer.kernel) for layer in gated.layers[1:]
              if isinstance(layer, GatedDense)}

    def call(x):
        for layer in gated.layers[1:]:
            if isinstance(layer, GatedDense):
                x = masked_block_dense(x, copies[id(layer)], layer.bias, layer.block_mask(x),
                                       layer.activation)
            else:
                x = layer(x, training=False)
        return x

    return call


def _dense_ops(dense, x):
    """The Dense stack's inference as eager TensorFlow ops."""
    import tensorflow as tf

    for layer in dense.layers[1:]:
        x = tf.nn.bias_add(tf.matmul(x, layer.kernel.value), layer.bias.value)
        x = layer.activation(x)
    return x


def _worker(args):
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_condcomp.models import compact_inference
    from keras_condcomp.ops import forced_execution
    from keras_condcomp.ops.native_kernels import native_kernels_disabled, native_vector_lanes
    from keras_condcomp.speed import (
        median_latencies, numpy_calls, paired_latencies, timed_batches, tuned_inference,
    )

    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes:
        gated, dense = _build(shape)
        input_dim, layers, _ = SHAPES[shape]
        memory = _weight_bytes(gated) / _weight_bytes(dense)
        for density in args.densities:
            data = selection_inputs(512, input_dim, layers[0][1], density, rng)
            per_example = _densities(gated, data)
            layer_densities = per_example.mean(axis=0).tolist()
            for batch in args.batch_sizes:
                # Calls at batch 1 are short and noisy: 8x the repeats.
                repeats = max(args.repeats, args.repeats * 8 // batch)
                # The examples timed, and their densities. (Eight batches,
                # as before, gave batch 1 eight examples, whose masks were
                # denser than the rest: 0.073 and 0.083 at 1/16.)
                batches = timed_batches(data, batch, repeats)
                timed_densities = per_example[:len(batches) * batch].mean(axis=0).tolist()
                if args.tensor_inputs:
                    batches = [tf.constant(b) for b in batches]
                spec = tf.TensorSpec([None, input_dim], "float32")
                functions = {"dense": tf.function(lambda x: dense(x, training=False), input_signature=[spec])}
                with native_kernels_disabled("auto_tf"):
                    auto_tf = tf.function(lambda x: gated(x, training=False),
                                          input_signature=[spec])
                    auto_tf.get_concrete_function()
                functions["auto_tf"] = auto_tf
                # Bounds: the fixed cost of a call, and of streaming every kernel once.
                functions["floor_call"] = tf.function(lambda x: x[:, :1], input_signature=[spec])
                kernels = [layer.kernel for layer in dense.layers[1:]]
                functions["floor_stream"] = tf.function(
                    lambda x: x[:, :1] + tf.add_n([tf.reduce_sum(k) for k in kernels]),
                    input_signature=[spec],
                )
                functions["tf_dense_copy"] = tf.function(_dense_copy_stack(gated),
                                                         input_signature=[spec])
                reference = functions["tf_dense_copy"](batches[0]).numpy()
                if not np.allclose(reference, gated(batches[0], training=False), atol=1e-4):
                    sys.exit(f"tf_dense_copy differs from the gated model ({shape}, batch {batch})")
                paths = ("masked",) + tuple(args.paths)
                for path in paths:
                    widest = batch * density * sum(b for _, b in SHAPES[shape][1]) * input_dim * 64
                    if path == "per_example" and widest > PER_EXAMPLE_MAX_GATHER:
                        continue
                    fn = tf.function(lambda x: gated(x, training=False), input_signature=[spec])
                    with forced_execution(path):
                        fn.get_concrete_function()
                    functions[path] = fn
                # The model's layers as one chain, their active blocks passed on.
                functions["compact"] = compact_inference(gated)
                calls = numpy_calls(functions)
                calls["dense_ops"] = lambda x: _dense_ops(dense, x).numpy()
                # Each layer's path chosen by timing for this batch size.
                calls["tuned"], _ = tuned_inference(
                    gated, data[: max(64, batch)], batch, repeats=20
                )
                # Each against Dense alone: paths of one model timed in one
                # alternation would find the tiles the previous path read for
                # the same batch still in cache (measured: +30% for "auto" at
                # batch 1, none at batch 50).
                timed = paired_latencies(calls, "dense", batches, repeats=repeats)
                # `model(x)` called eagerly, as a new user first does (each
                # gated layer runs as one compiled graph), against Dense eagerly.
                eager = median_latencies({
                    "dense": lambda x: dense(x, training=False).numpy(),
                    "eager": lambda x: gated(x, training=False).numpy(),
                }, batches, repeats=repeats)
                timed["eager"] = (eager["eager"], eager["dense"])
                ideal = _ideal_speedup(shape, layer_densities)
                for name, (seconds, paired_dense) in timed.items():
                    rows.append({
                        "shape": shape, "density": density, "layer_densities": layer_densities,
                        "timed_layer_densities": timed_densities,
                        "batch": batch, "threads": args.threads or "all", "path": name,
                        "seconds": seconds, "speedup": paired_dense / seconds,
                        "ideal_speedup": ideal, "weight_memory_ratio": memory,
                        # 16: the native kernels built for AVX-512, 8: without
                        # it (AVX2); None: not built (no compiler).
                        "native_vector_lanes": native_vector_lanes(),
                    })
                print(json.dumps({"progress": f"{shape} d={density:.3f} b={batch}"}), file=sys.stderr)
    print(json.dumps(rows))


def _table(rows):
    lines = [f"{'shape':20} {'thr':>3} {'batch':>5} {'density':>7} {'dense ms':>9} "
             f"{'auto':>6} {'tuned':>6} {'compact':>7} {'native':>6} {'auto_tf':>7} {'per_ex':>6} "
             f"{'grouped':>7} {'static':>6} {'masked':>6} "
             f"{'ideal':>6} {'auto/ideal':>10} {'call':>6} {'stream':>6} {'eager':>6} "
             f"{'dense_ops':>9} {'tf_dense_copy':>13}"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["shape"], r["threads"], r["batch"], r["density"]), {})[r["path"]] = r
    for (shape, threads, batch, density), paths in keyed.items():
        def sp(name):
            return f"{paths[name]['speedup']:.2f}x" if name in paths else "-"
        ideal = paths["dense"]["ideal_speedup"]
        lines.append(
            f"{shape:20} {threads!s:>3} {batch:>5} {density:>7.3f} "
            f"{paths['dense']['seconds'] * 1e3:>9.3f} {sp('auto'):>6} {sp('tuned'):>6} "
            f"{sp('compact'):>7} {sp('native'):>6} {sp('auto_tf'):>7} "
            f"{sp('per_example'):>6} "
            f"{sp('grouped'):>7} {sp('static_capacity'):>6} {sp('masked'):>6} "
            f"{ideal:>5.1f}x "
            f"{paths['auto']['speedup'] / ideal if 'auto' in paths else float('nan'):>10.2f} "
            f"{sp('floor_call'):>6} {sp('floor_stream'):>6} {sp('eager'):>6} "
            f"{sp('dense_ops'):>9} {sp('tf_dense_copy'):>13}"
        )
    return "\n".join(lines)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(shapes), len(batches), figsize=(4 * len(batches), 3.2 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for threads in sorted({str(r["threads"]) for r in rows}):
                sel = [r for r in rows if r["shape"] == shape and r["batch"] == batch and str(r["threads"]) == threads]
                for name, style in (("auto", "o-"), ("compact", "D-")):
                    line = sorted((r["density"], r["speedup"]) for r in sel if r["path"] == name)
                    if line:
                        ax.plot(*zip(*line), style, label=f"{name}, {threads} thread(s)")
            ideal = sorted({(r["density"], r["ideal_speedup"]) for r in rows if r["shape"] == shape and r["batch"] == batch})
            if ideal:
                ax.plot(*zip(*ideal), "k--", label="ideal (MACs)")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{shape}, batch {batch}", fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel("speedup over Dense")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        help=f"default: {', '.join(DEFAULT_SHAPES)}; --quick: bengio_cifar10_mlp")
    add_sweep_options(parser, DENSITIES, BATCH_SIZES, PATHS, QUICK)
    parser.add_argument("--repeats", type=int, default=30,
                        help="timed calls per path; 8x at batch 1")
    parser.add_argument("--quick", action="store_true",
                        help="the defaults of --shapes, --densities, --batch-sizes and "
                             "--threads become the Bengio shape, densities 1/16 and 3/4, "
                             "batches 1 and 50, 1 thread (options given are kept)")
    parser.add_argument("--tensor-inputs", action="store_true",
                        help="feed TensorFlow tensors (as from a tf.data pipeline) instead "
                             "of numpy arrays: each call then skips the conversion")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder the JSON and PNG results are written to")
    parser.add_argument("--combine", nargs="+", metavar="RESULTS_JSON",
                        help="merge these result files (runs of separate settings) into "
                             "gated_dense.json and its plot in --out, without timing anything")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.combine:
        try:
            result = _combined(args.combine)
        except ValueError as error:
            parser.error(str(error))
        _write(args.out, "gated_dense", result)
        return
    fill_defaults(args, {"shapes": DEFAULT_SHAPES, "densities": DENSITIES,
                         "batch_sizes": BATCH_SIZES, "threads": (1, 0)}, QUICK)
    bad = [v for v in args.densities if not 0 < v <= 1]
    if bad:
        parser.error(f"--densities must be in (0, 1], got {bad}")
    check_run_options(parser, args)
    if args.worker:
        args.threads = args.threads[0]
        return _worker(args)
    rows = []
    for threads in args.threads:
        command = [sys.executable, __file__, "--worker", "--threads", str(threads),
                   "--repeats", str(args.repeats), "--shapes", *args.shapes,
                   "--densities", *map(str, args.densities),
                   "--batch-sizes", *map(str, args.batch_sizes), "--paths", *args.paths]
        command += ["--tensor-inputs"] if args.tensor_inputs else []
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode:
            sys.exit(f"benchmark worker failed (threads={threads})")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    name = "gated_dense_quick" if args.quick else "gated_dense"
    name += "_tensor_inputs" if args.tensor_inputs else ""
    _write(args.out, name, {"cpu": cpu_description(), "cpu_count": os.cpu_count(),
                            "tensor_inputs": args.tensor_inputs, "rows": rows})


def _write(out, name, result):
    """Writes `name`.json and its plot to `out` and prints the table."""
    rows = result["rows"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    _plot(rows, os.path.join(out, f"{name}.png"))
    print(_table(rows))
    shapes = sorted({r["shape"] for r in rows})
    print("weight memory gated/dense: " + ", ".join(
        f"{s} {next(r['weight_memory_ratio'] for r in rows if r['shape'] == s):.3f}x" for s in shapes))
    lanes = sorted({str(r.get("native_vector_lanes", "not recorded")) for r in rows})
    print(f"native kernels' vector lanes: {', '.join(lanes)}")


def _combined(paths):
    """The rows of several result files as one result, each setting once.

    Raises ValueError naming the file that is unreadable, is not a result of
    this benchmark, was made on another CPU (as recorded; files from before
    session 39 record none), with another number of cores, with the other
    kind of input or with native kernels of other vector lanes (where
    recorded: since session 49), or times a setting (shape, threads, batch,
    density, path) that another file times.
    """
    rows, seen, kinds, cores, cpus, lanes = [], {}, set(), set(), set(), set()
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read --combine file {path!r}: {error}") from None
        if not (
            isinstance(result, dict) and isinstance(result.get("rows"), list)
            and all(isinstance(row, dict) and "path" in row for row in result["rows"])
        ):
            raise ValueError(
                f"--combine file {path!r} is not a gated_dense result (a 'rows' list of timings)"
            )
        kinds.add(bool(result.get("tensor_inputs", False)))
        cores.add(result.get("cpu_count"))
        cpus.add(result.get("cpu"))
        if len(kinds) > 1 or len(cores) > 1 or len(cpus) > 1:
            raise ValueError(
                f"--combine file {path!r} differs from the ones before in its kind of input, "
                f"cpu_count or cpu (tensor_inputs={result.get('tensor_inputs', False)}, "
                f"cpu_count={result.get('cpu_count')}, cpu={result.get('cpu')!r})"
            )
        lanes.update(
            str(row["native_vector_lanes"]) for row in result["rows"] if "native_vector_lanes" in row
        )
        if len(lanes) > 1:
            raise ValueError(
                f"--combine file {path!r} times native kernels built for other vector "
                f"lanes than the files before it (native_vector_lanes: {sorted(lanes)})"
            )
        for row in result["rows"]:
            key = tuple(str(row.get(k)) for k in ("shape", "threads", "batch", "density", "path"))
            if key in seen:
                raise ValueError(
                    f"--combine files {seen[key]!r} and {path!r} both time shape={key[0]}, "
                    f"threads={key[1]}, batch={key[2]}, density={key[3]}, path={key[4]}"
                )
            seen[key] = path
            rows.append(row)
    return {"cpu": cpus.pop(), "cpu_count": cores.pop(), "tensor_inputs": kinds.pop(),
            "combined_from": [os.path.basename(p) for p in paths], "rows": rows}


if __name__ == "__main__":
    main()
