"""GatedConv2D inference speed against keras.layers.Conv2D, side by side.

The stack (CIFAR-like): 32x32x3 input, three 3x3 "same" convolutions with
ReLU of 64, 128 and 128 filters in 8 groups, 2x2 max pooling after the first
two (`--stack full-resolution`: none, 32x32 feature maps throughout, 4x the
work a call), global average pooling and a 10-unit dense head. For each
density and batch size, one process times each of these against `conv2d`
alone, the two alternating call by call after a warm-up
(`keras_condcomp.speed.WARMUP_CALLS` calls of each: a graph's steady
speed; 3 until session 48), median of many calls:

- `conv2d`: the same-width `keras.layers.Conv2D` stack (same kernels),
- `masked`: the gated stack computing densely and masking (the reference),
- `auto` and every forced path of `keras_condcomp.ops.CONV2D_EXECUTION_PATHS`,
- `tuned`: each layer's path chosen by timing for the batch size
  (`keras_condcomp.models.tune_execution`),
- `compact`: `keras_condcomp.models.compact_inference(model)`, the layers
  run as one chain, each gated layer's active groups passed to the next
  (through pooling) without being placed among zeros; above batch 1, one
  example after another when the first layer's density allows it,
- `floor_call`, a graph that only slices its input: the fixed cost of a
  call, shown as the `call` bound (no graph beats Conv2D by more),
- `eager`: `model(x)` called eagerly, outside any `tf.function` (each gated
  layer then runs as one compiled graph), timed against the Conv2D stack
  called eagerly (its speedup is over that).

Apart from `eager` and `compact` (graphs of its own), every model runs
as one `tf.function` over `model(x, training=False)`, every graph called
as its concrete function as in `benchmarks/gated_dense.py`. The masks
are the layers' own threshold policies (policy cost included), with
weights and inputs built so that every example has exactly `density * 8`
active groups in every gated layer, a run of consecutive groups starting
at a random group (see
`_controlled_masks`; the convolutions' costs do not depend on the values
they multiply). A skipped group upstream gives zero input channels
downstream (max pooling keeps them zero), so the second and third layers
also skip input channels. (Policy biases set so that each group was open
for a fraction `density` of random images, as before, gave the right mean
but not per example: at 1/4, 33, 73 and 81 of 256 examples had no active
group in the three layers, and such an example costs a layer almost
nothing.)

Inputs are fed as in `benchmarks/gated_dense.py` (see there): numpy
batches, consecutive batches of the examples in turn (the JSON records
their densities, `timed_layer_densities`), or TensorFlow tensors with
`--tensor-inputs` (`_tensor_inputs` in the result names).

Threads are pinned before TensorFlow starts, in a fresh process per setting:
`--threads 1` sets `tf.config.threading` intra-op and inter-op parallelism to
1; `--threads 0` leaves TensorFlow's defaults (all cores).

Writes `benchmarks/results/gated_conv2d.json` and `gated_conv2d.png`
(speedup over Conv2D vs density, with the ideal line; `_quick` and
`_full_resolution` in the names for those runs) and prints a table.

    python benchmarks/gated_conv2d.py            # full run (minutes)
    python benchmarks/gated_conv2d.py --quick    # density 1/4, batch 1, 1 thread
    python benchmarks/gated_conv2d.py --stack full-resolution --quick
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from run_options import (
    HelpFormatter,
    add_sweep_options,
    check_run_options,
    cpu_description,
    fill_defaults,
)

INPUT_SHAPE = (32, 32, 3)
LAYERS = [(64, 8), (128, 8), (128, 8)]  # (filters, blocks), 3x3 "same"
# Layers followed by 2x2 max pooling, per stack: "cifar" (the default)
# pools after the first two; "full-resolution" keeps 32x32 feature maps
# throughout (4x the work a call; global pooling still ends both).
STACKS = {"cifar": (0, 1), "full-resolution": ()}
HEAD = 10
DENSITIES = (1 / 8, 1 / 4, 1 / 2, 3 / 4)
BATCH_SIZES = (1, 32)
PATHS = ("auto", "per_example", "grouped")
QUICK = {"densities": (1 / 4,), "batch_sizes": (1,), "threads": (1,)}


def _build(seed=0, stack="cifar"):
    import keras

    from keras_condcomp.layers import GatedConv2D

    inputs = keras.Input(INPUT_SHAPE)
    gated, dense = inputs, inputs
    for i, (filters, blocks) in enumerate(LAYERS):
        gated = GatedConv2D(filters, 3, blocks=blocks, padding="same", activation="relu", seed=seed)(gated)
        dense = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(dense)
        if i in STACKS[stack]:
            gated = keras.layers.MaxPooling2D()(gated)
            dense = keras.layers.MaxPooling2D()(dense)
    gated = keras.layers.Dense(HEAD)(keras.layers.GlobalAveragePooling2D()(gated))
    dense = keras.layers.Dense(HEAD)(keras.layers.GlobalAveragePooling2D()(dense))
    gated_model, dense_model = keras.Model(inputs, gated), keras.Model(inputs, dense)
    _copy_weights(gated_model, dense_model)
    return gated_model, dense_model


def _copy_weights(gated_model, dense_model):
    for g, d in zip(gated_model.layers[1:], dense_model.layers[1:]):
        if d.weights:
            d.kernel.assign(g.kernel)
            d.bias.assign(g.bias)


# How `_controlled_masks` steers every layer's mask (see there).
CODES = 8  # arcs an input can ask of the second and third layers: one per start
CARRIER_STEPS = np.arange(CODES) / CODES  # thresholds of the carrier channels


def _not_whole_groups(densities, groups=LAYERS[0][1]):
    """The densities that are not a whole number of groups of `groups`."""
    return [d for d in densities if not 0 < d <= 1 or abs(d * groups - round(d * groups)) > 1e-6]


def _gated_convs(gated_model):
    from keras_condcomp.layers import GatedConv2D

    return [layer for layer in gated_model.layers if isinstance(layer, GatedConv2D)]


def _set_carriers(layers, count):
    """Kernels of the first two gated layers that carry each input's code.

    Every input is constant in its last channel, `u = (code + 1/2) / 8`.
    Channel `c` of every group of the first layer is `relu(u - c / 8)` (its
    kernel reads the centre of the last input channel), and so are channels
    `c` and `8 + c` of every group of the second layer (reading channel 0,
    `u`, of each of the first layer's groups: the sum over its `count`
    active groups, divided by `count`). These eight values determine the
    code whatever groups are active and, positive, keep every input channel
    of an active group in use downstream.
    """
    first, second = layers[:2]
    for layer, size in ((first, 8), (second, 16)):
        if layer.filters // layer.blocks != size:
            raise ValueError(
                f"the carriers need {size} filters a group in {layer.name}. "
                f"Received: filters={layer.filters}, blocks={layer.blocks}"
            )
    kernel = np.zeros(first.kernel.shape, "float32")
    for c in range(CODES):
        kernel[1, 1, -1, np.arange(first.blocks) * 8 + c] = 1.0
    first.kernel.assign(kernel)
    first.bias.assign(-np.tile(CARRIER_STEPS, first.blocks).astype("float32"))
    kernel = np.zeros(second.kernel.shape, "float32")
    for column in range(second.filters):
        kernel[1, 1, np.arange(first.blocks) * 8, column] = 1.0 / count
    second.kernel.assign(kernel)
    second.bias.assign(-np.tile(CARRIER_STEPS, 2 * second.blocks).astype("float32"))


def _arc_targets(starts, count, blocks):
    """`(len(starts), blocks)`: +1 on `count` consecutive groups from each start, else -1."""
    offsets = (np.arange(blocks)[None, :] - np.asarray(starts)[:, None]) % blocks
    return np.where(offsets < count, 1.0, -1.0)


def _controlled_masks(gated_model, dense_model, n, density, seed=0):
    """Inputs and weights giving every example `density * blocks` active
    groups in every gated layer; returns `(inputs, per-example densities
    (n, layers))`, the densities measured by the layers. The Conv2D stack
    gets the same kernels.

    - First layer: the input's first two channels have means `1/2 + r cos t`
      and `1/2 + r sin t` (plus noise of mean 0); the policy of group `j`
      reads `cos(t - 2 pi j / 8)`, open above `cos(pi k / 8)`: the `k`
      groups around angle `t`, from a random start.
    - Second and third layers: their policies read the carrier channels of
      `_set_carriers` (the input's code, through the `k` active groups of
      the layer before), and open `k` groups from start `code` (second)
      and `(3 code + 1) mod 8` (third), solved exactly from the eight
      carrier values of each code.
    """
    layers = _gated_convs(gated_model)
    blocks = layers[0].blocks
    if any(layer.blocks != blocks for layer in layers):
        raise ValueError(
            f"every gated layer needs {blocks} groups, as {layers[0].name}. "
            f"Received: {[layer.blocks for layer in layers]}"
        )
    if _not_whole_groups([density], blocks):
        raise ValueError(
            f"--densities must be multiples of 1/{blocks} in (0, 1] here (whole "
            f"groups in every example). Received: {density}"
        )
    count = int(round(density * blocks))
    rng = np.random.default_rng(seed)
    x = rng.random((n, *INPUT_SHAPE)).astype("float32") * 0.4
    x -= x.mean(axis=(1, 2), keepdims=True)  # noise of mean 0 in every channel
    starts = rng.integers(0, blocks, n)
    angle = 2 * np.pi * (starts + (count - 1) / 2) / blocks
    radius = 0.25
    x[..., 0] += 0.5 + radius * np.cos(angle)[:, None, None]
    x[..., 1] += 0.5 + radius * np.sin(angle)[:, None, None]
    codes = rng.integers(0, CODES, n)
    x[..., -1] = ((codes + 0.5) / CODES)[:, None, None]
    # First layer: logit_j = 4 (cos(t - a_j) - cos(pi k / 8)); every group at k = 8.
    group_angles = 2 * np.pi * np.arange(blocks) / blocks
    scale = 4.0 / radius
    kernel = np.zeros(layers[0].policy.kernel.shape, "float32")
    kernel[0], kernel[1] = scale * np.cos(group_angles), scale * np.sin(group_angles)
    threshold = np.cos(np.pi * count / blocks) if count < blocks else -2.0
    bias = -scale * 0.5 * (np.cos(group_angles) + np.sin(group_angles)) - 4.0 * threshold
    layers[0].policy.kernel.assign(kernel)
    layers[0].policy.bias.assign(bias.astype("float32"))
    _set_carriers(layers, count)
    _copy_weights(gated_model, dense_model)
    # The carriers' values for each code: (codes, 8), invertible.
    values = np.maximum(0.0, (np.arange(CODES)[:, None] + 0.5) / CODES - CARRIER_STEPS[None, :])
    for layer, size, start_of in (
        (layers[1], 8, lambda code: code), (layers[2], 16, lambda code: (3 * code + 1) % CODES)
    ):
        # logits (codes, blocks) = count * values @ weights: one weight per carrier.
        targets = _arc_targets(start_of(np.arange(CODES)), count, blocks)
        weights = np.linalg.solve(values, targets) / count
        kernel = np.zeros(layer.policy.kernel.shape, "float32")
        for group in range(blocks):
            kernel[group * size: group * size + CODES] = weights
        layer.policy.kernel.assign(kernel)
        layer.policy.bias.assign(np.zeros(blocks, "float32"))
    # Measured by the layers themselves.
    h, per_example = x, []
    for layer in gated_model.layers[1:]:
        if layer in layers:
            per_example.append(np.asarray(layer.block_mask(h)).mean(axis=1))
        h = np.asarray(layer(h, training=False))
    per_example = np.stack(per_example, axis=1)
    if not np.allclose(per_example, count / blocks):
        raise RuntimeError(
            f"the masks are not {count} of {blocks} groups in every example: mean "
            f"densities {per_example.mean(axis=0)} (the stack is not the one built here)"
        )
    return x, per_example


def _ideal_speedup(per_example, stack="cifar"):
    """Dense MACs / conditional MACs (policies and input sparsity included)."""
    size = INPUT_SHAPE[0]
    channels = INPUT_SHAPE[2]
    dense = 0.0
    conditional = np.zeros(len(per_example))
    in_density = np.ones(len(per_example))
    for i, (filters, blocks) in enumerate(LAYERS):
        macs = size * size * 9 * channels * filters
        dense += macs
        conditional += channels * blocks + in_density * per_example[:, i] * macs
        in_density = per_example[:, i]
        channels = filters
        if i in STACKS[stack]:
            size //= 2
    dense += channels * HEAD
    conditional += channels * HEAD
    return float(dense / conditional.mean())


def _worker(args):
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_condcomp.models import compact_inference
    from keras_condcomp.ops import forced_execution
    from keras_condcomp.speed import (
        median_latencies, numpy_calls, paired_latencies, timed_batches, tuned_inference,
    )

    import keras

    keras.utils.set_random_seed(0)  # the same kernels in every process
    gated, dense = _build(stack=args.stack)
    spec = tf.TensorSpec([None, *INPUT_SHAPE], "float32")
    rows = []
    for density in args.densities:
        data, per_example = _controlled_masks(gated, dense, 256, density)
        layer_densities = per_example.mean(axis=0).tolist()
        ideal = _ideal_speedup(per_example, args.stack)
        for batch in args.batch_sizes:
            # Calls at batch 1 are short and noisy: 8x the repeats.
            repeats = max(args.repeats, args.repeats * 8 // batch)
            # The examples timed, and their densities. (Eight batches, as
            # before, gave batch 1 eight examples, whose masks at density
            # 1/4 were 0.30, 0.42 and 0.34 dense in the three layers.)
            batches = timed_batches(data, batch, repeats)
            timed_densities = per_example[:len(batches) * batch].mean(axis=0).tolist()
            if args.tensor_inputs:
                batches = [tf.constant(b) for b in batches]
            functions = {
                "conv2d": tf.function(lambda x: dense(x, training=False), input_signature=[spec]),
                # Bound: the fixed cost of a call (no graph beats Conv2D by more).
                "floor_call": tf.function(lambda x: x[:, 0, 0, :], input_signature=[spec]),
            }
            for path in ("masked",) + tuple(args.paths):
                fn = tf.function(lambda x: gated(x, training=False), input_signature=[spec])
                with forced_execution(path):
                    fn.get_concrete_function()
                functions[path] = fn
            # The model's layers as one chain, their active groups passed on.
            functions["compact"] = compact_inference(gated)
            calls = numpy_calls(functions)
            # Each layer's path chosen by timing for this batch size.
            calls["tuned"], _ = tuned_inference(gated, data[: max(32, batch)], batch, repeats=10)
            # Each against Conv2D alone (see benchmarks/gated_dense.py).
            timed = paired_latencies(calls, "conv2d", batches, repeats=repeats)
            # `model(x)` called eagerly (see benchmarks/gated_dense.py).
            eager = median_latencies({
                "conv2d": lambda x: dense(x, training=False).numpy(),
                "eager": lambda x: gated(x, training=False).numpy(),
            }, batches, repeats=repeats)
            timed["eager"] = (eager["eager"], eager["conv2d"])
            for name, (seconds, paired_conv2d) in timed.items():
                rows.append({
                    "density": density, "layer_densities": layer_densities,
                    "timed_layer_densities": timed_densities,
                    "batch": batch, "threads": args.threads or "all", "path": name,
                    "seconds": seconds, "speedup": paired_conv2d / seconds,
                    "ideal_speedup": ideal,
                })
            print(json.dumps({"progress": f"d={density:.3f} b={batch}"}), file=sys.stderr)
    print(json.dumps(rows))


def _table(rows):
    lines = [f"{'thr':>3} {'batch':>5} {'density':>7} {'conv ms':>8} {'auto':>6} "
             f"{'tuned':>6} {'compact':>7} {'per_ex':>6} {'grouped':>7} {'masked':>6} {'ideal':>6} "
             f"{'auto/ideal':>10} "
             f"{'call':>6} {'eager':>6}"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["threads"], r["batch"], r["density"]), {})[r["path"]] = r
    for (threads, batch, density), paths in keyed.items():
        def sp(name):
            return f"{paths[name]['speedup']:.2f}x" if name in paths else "-"
        ideal = paths["conv2d"]["ideal_speedup"]
        auto = paths["auto"]["speedup"] / ideal if "auto" in paths else float("nan")
        lines.append(
            f"{threads!s:>3} {batch:>5} {density:>7.3f} {paths['conv2d']['seconds'] * 1e3:>8.3f} "
            f"{sp('auto'):>6} {sp('tuned'):>6} {sp('compact'):>7} {sp('per_example'):>6} "
            f"{sp('grouped'):>7} {sp('masked'):>6} "
            f"{ideal:>5.1f}x {auto:>10.2f} {sp('floor_call'):>6} {sp('eager'):>6}"
        )
    return "\n".join(lines)


def _plot(rows, path, stack="cifar"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.4), squeeze=False)
    for j, batch in enumerate(batches):
        ax = axes[0][j]
        for threads in sorted({str(r["threads"]) for r in rows}):
            styles = (("auto", "o-"), ("compact", "D-"), ("per_example", "s:"), ("grouped", "^:"))
            for name, style in styles:
                sel = sorted(
                    (r["density"], r["speedup"]) for r in rows
                    if r["batch"] == batch and str(r["threads"]) == threads and r["path"] == name
                )
                if sel:
                    ax.plot(*zip(*sel), style, label=f"{name}, {threads} thread(s)")
        ideal = sorted({(r["density"], r["ideal_speedup"]) for r in rows if r["batch"] == batch})
        ax.plot(*zip(*ideal), "k--", label="ideal (MACs)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"3 gated 3x3 convs (64-128-128, 8 groups, {stack}), batch {batch}",
                     fontsize=8)
        ax.set_xlabel("density (every gated layer)")
        ax.set_ylabel("speedup over Conv2D stack")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_sweep_options(parser, DENSITIES, BATCH_SIZES, PATHS, QUICK)
    parser.add_argument("--repeats", type=int, default=40,
                        help="timed calls per path; more below batch 8 (8x at batch 1)")
    parser.add_argument("--stack", choices=sorted(STACKS), default="cifar",
                        help="cifar: max pooling after the first two convolutions; "
                             "full-resolution: none (32x32 feature maps throughout)")
    parser.add_argument("--quick", action="store_true",
                        help="the defaults of --densities, --batch-sizes and --threads become "
                             "density 1/4, batch 1, 1 thread (options given are kept)")
    parser.add_argument("--tensor-inputs", action="store_true",
                        help="feed TensorFlow tensors (as from a tf.data pipeline) instead "
                             "of numpy arrays: each call then skips the conversion")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder the JSON and PNG results are written to")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fill_defaults(args, {"densities": DENSITIES, "batch_sizes": BATCH_SIZES, "threads": (1, 0)},
                  QUICK)
    bad = _not_whole_groups(args.densities)
    if bad:
        parser.error(f"--densities must be multiples of 1/{LAYERS[0][1]} in (0, 1] "
                     f"(whole groups), got {bad}")
    check_run_options(parser, args)
    if args.worker:
        args.threads = args.threads[0]
        return _worker(args)
    rows = []
    for threads in args.threads:
        command = [sys.executable, __file__, "--worker", "--threads", str(threads),
                   "--repeats", str(args.repeats), "--densities", *map(str, args.densities),
                   "--batch-sizes", *map(str, args.batch_sizes), "--paths", *args.paths,
                   "--stack", args.stack]
        command += ["--tensor-inputs"] if args.tensor_inputs else []
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode:
            sys.exit(f"benchmark worker failed (threads={threads})")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    os.makedirs(args.out, exist_ok=True)
    name = "gated_conv2d" + ("" if args.stack == "cifar" else "_" + args.stack.replace("-", "_"))
    name += "_quick" if args.quick else ""
    name += "_tensor_inputs" if args.tensor_inputs else ""
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"cpu": cpu_description(), "cpu_count": os.cpu_count(),
                   "load_average": os.getloadavg(), "stack": args.stack,
                   "tensor_inputs": args.tensor_inputs, "rows": rows}, f, indent=1)
    _plot(rows, os.path.join(args.out, f"{name}.png"), args.stack)
    print(_table(rows))


if __name__ == "__main__":
    main()
