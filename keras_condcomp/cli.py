"""The `keras-condcomp` command line.

`keras-condcomp train` trains the conditional MLP of Bengio et al. next to a
same-width and an equal-MACs dense MLP, measures the inference speedup side by
side (single thread) and writes `results.json` and `model.keras` to `--out`;
with `--model cnn` it trains a gated CNN (GatedConv2D layers) on the images
next to the same-width Conv2D CNN instead.
`keras-condcomp export MODEL.keras --format onnx|litert --out PATH` exports it
with the skipping kept (`keras_condcomp.export`).
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

from keras_condcomp import _interrupts
from keras_condcomp.models.cnn import DEFAULT_POLICY_GRID
from keras_condcomp.regularizers import DEVIATIONS

__all__ = ["console_main", "main"]

SPEED_BATCH_SIZES = (1, 256)
# Gating defaults per --model. The cnn ones: on digits, targets below 0.5
# made the threshold policy close every group at inference (with policies
# reading the means over the whole image).
# Cosine decay steadied the mlp across seeds; on the cnn (seed 0, digits, 50
# epochs) it gave 0.822 test accuracy against 0.908 with constant rates. The
# gated cnn learns slowly while its policies still drop groups at random:
# 150 epochs took it from 0.908 to 0.961 (guide "Gated convolutions").
MODEL_DEFAULTS = {
    "mlp": {"epochs": 50, "blocks": 16, "target_density": 0.22, "sparsity_weight": 5.0,
            "variance_weight": 10.0, "example_sparsity_weight": 80.0,
            "lr_schedule": "cosine", "units": 2048, "layers": 2},
    "cnn": {"epochs": 150, "blocks": 8, "target_density": 0.5, "sparsity_weight": 1.0,
            "variance_weight": 1.0, "example_sparsity_weight": 1.0,
            "lr_schedule": "constant", "filters": "32,64"},
}
# The options of one model only: refused with the other.
MODEL_ONLY_OPTIONS = {"units": "mlp", "layers": "mlp", "filters": "cnn", "policy_grid": "cnn"}


class CommandError(Exception):
    """A problem to report in one line, with a non-zero exit."""


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        return value

    return parse


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"--seed must be an integer in [0, 2**32), got {text!r}")
    return value


def _number(name, low, high, low_open=True, high_open=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{name} must be in {interval}, got {text!r}")
        return value

    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is None: the option's help
    then says what happens when it is not given."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-condcomp", description="Conditional computation for Keras 3."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a gated MLP or CNN with REINFORCE next to dense baselines",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    train.add_argument(
        "--dataset", default="digits",
        help="'digits' (embedded), 'mnist' (IDX files from --data-dir, else TFDS) or 'tfds:NAME'",
    )
    train.add_argument(
        "--data-dir", default=None,
        help="directory of the dataset's files (for tfds:NAME, TFDS's own data directory, "
             "which it writes to)",
    )
    train.add_argument(
        "--epochs", type=_positive_int("--epochs"), default=None,
        help=f"default: {MODEL_DEFAULTS['mlp']['epochs']} for mlp, "
             f"{MODEL_DEFAULTS['cnn']['epochs']} for cnn (every model of the job)",
    )
    train.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32,
                       help="examples per training step")
    train.add_argument(
        "--model", choices=("mlp", "cnn"), default="mlp",
        help="'mlp': GatedDense layers (--units, --layers); 'cnn': GatedConv2D "
             "layers (--filters) on the images, against a same-width Conv2D CNN",
    )
    train.add_argument("--units", type=_positive_int("--units"), default=None,
                       help=f"mlp: units of each gated layer (default: "
                            f"{MODEL_DEFAULTS['mlp']['units']})")
    train.add_argument(
        "--blocks", type=_positive_int("--blocks"), default=None,
        help=f"blocks per gated layer (default: {MODEL_DEFAULTS['mlp']['blocks']} for mlp, "
             f"{MODEL_DEFAULTS['cnn']['blocks']} for cnn)",
    )
    train.add_argument("--layers", type=_positive_int("--layers"), default=None,
                       help=f"mlp: gated layers (default: {MODEL_DEFAULTS['mlp']['layers']})")
    train.add_argument(
        "--filters", default=None,
        help="cnn: comma-separated filters of the gated 3x3 convolutions, each but the "
             f"last followed by 2x2 pooling (default: {MODEL_DEFAULTS['cnn']['filters']})",
    )
    train.add_argument(
        "--policy-grid", type=_positive_int("--policy-grid"), default=None,
        help="cnn: each policy reads the channel means over a g x g grid of cells "
             f"(default: {DEFAULT_POLICY_GRID}, or fewer on a layer whose input has fewer rows; "
             "1: the means over the whole image)",
    )
    inf = float("inf")
    train.add_argument(
        "--target-density", type=_number("--target-density", 0, 1), default=None,
        help=f"default: {MODEL_DEFAULTS['mlp']['target_density']} for mlp, "
             f"{MODEL_DEFAULTS['cnn']['target_density']} for cnn",
    )
    train.add_argument(
        "--sparsity-weight", type=_number("--sparsity-weight", 0, inf, False, True),
        default=None, help=f"default: {MODEL_DEFAULTS['mlp']['sparsity_weight']} for mlp, "
                           f"{MODEL_DEFAULTS['cnn']['sparsity_weight']} for cnn",
    )
    train.add_argument(
        "--variance-weight", type=_number("--variance-weight", 0, inf, False, True),
        default=None, help=f"default: {MODEL_DEFAULTS['mlp']['variance_weight']} for mlp, "
                           f"{MODEL_DEFAULTS['cnn']['variance_weight']} for cnn",
    )
    train.add_argument(
        "--example-sparsity-weight",
        type=_number("--example-sparsity-weight", 0, inf, False, True), default=None,
        help="weight of L_e (each example's density near the target) apart from L_b "
             f"(default: {MODEL_DEFAULTS['mlp']['example_sparsity_weight']} for mlp, "
             f"{MODEL_DEFAULTS['cnn']['example_sparsity_weight']} for cnn)",
    )
    train.add_argument(
        "--sparsity-deviation", choices=DEVIATIONS, default="absolute",
        help="how L_b and L_e measure a deviation from the target: absolute (the paper) "
             "or squared (as the authors' code squares them: the density settles above the target)",
    )
    train.add_argument(
        "--learning-rate", type=_number("--learning-rate", 0, inf, True, True), default=1e-3,
        help="Adam's learning rate of the networks (where the cosine decay starts)",
    )
    train.add_argument(
        "--policy-learning-rate",
        type=_number("--policy-learning-rate", 0, inf, True, True),
        default=1e-2, help="Adam's learning rate of the policies (where the cosine decay starts)",
    )
    train.add_argument(
        "--lr-schedule", choices=("cosine", "constant"), default=None,
        help="learning rates of every model (network and policy): cosine decay to 0 "
             f"over the run, or constant (default: {MODEL_DEFAULTS['mlp']['lr_schedule']} "
             f"for mlp, {MODEL_DEFAULTS['cnn']['lr_schedule']} for cnn)",
    )
    train.add_argument("--seed", type=_seed, default=0,
                       help="seed of the weights, the validation split and the sampled masks")
    train.add_argument("--out", default="runs/latest", help="output directory")
    train.add_argument(
        "--speed-repeats", type=_positive_int("--speed-repeats"), default=200,
        help="timed calls per model and batch size",
    )
    train.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                       help="as in model.fit")
    _add_export_parser(commands)
    return parser


def _add_export_parser(commands):
    export = commands.add_parser(
        "export",
        help="export a .keras model to ONNX or LiteRT, keeping the skipping",
        description=EXPORT_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    export.add_argument("model", help="the .keras file (e.g. model.keras of `train`)")
    export.add_argument("--format", choices=("onnx", "litert"), required=True,
                        help="onnx (onnxruntime) or litert (TFLite, builtin ops only)")
    export.add_argument("--out", required=True, help="the file to write (.onnx or .tflite)")
    export.add_argument(
        "--batch-size", type=_positive_int("--batch-size"), default=None,
        help="static batch size; when not given, dynamic for onnx and 1 for litert",
    )
    export.add_argument("--opset", type=_positive_int("--opset"), default=None,
                        help="ONNX opset; when not given, tf2onnx's")
    export.add_argument("--quantize", choices=("int8", "float16"), default=None,
                        help="LiteRT weights stored as int8 or float16; when not given, float32")
    export.add_argument(
        "--budget", type=_positive_int("--budget"), default=None,
        help="blocks computed per example by every gated layer (at most its blocks); when "
             "not given, the most active blocks of a training example, else 2 x target density "
             "x blocks, and every block where that is above the layer's export skip limit "
             "(skipping would be slower than the dense export; guide 'Deploying')",
    )
    export.add_argument(
        "--dataset", default=None,
        help="dataset for budgets and the accuracy check; when not "
             "given, the one in results.json beside the model, if any",
    )
    export.add_argument("--data-dir", default=None, help="directory of the dataset's files")


def _trained(build, args, x_train, y_train, x_val, y_val):
    """The compiled model `build()` returns, trained. A signal stops the job
    once the model is built or at a batch end (`_interrupts`), not inside
    TensorFlow's tracing or loading of ops."""
    with _interrupts.stops_at_batch_ends() as stop_on_signal:
        model = build()
        _interrupts.raise_if_pending()
        model.fit(
            x_train,
            y_train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_data=(x_val, y_val),
            verbose=args.verbose,
            callbacks=[stop_on_signal],
        )
    return model


def _learning_rate(rate, args, train_size):
    """`rate`, or its decay over the whole run as `--lr-schedule` says."""
    import math

    import keras

    if args.lr_schedule == "constant":
        return rate
    steps = args.epochs * math.ceil(train_size / args.batch_size)
    return keras.optimizers.schedules.CosineDecay(rate, decay_steps=steps)


def _adam(rate, args, train_size):
    import keras

    return keras.optimizers.Adam(_learning_rate(rate, args, train_size))


def _evaluated(model, x, y):
    """`model.evaluate`'s metrics as a dict; a signal stops it at a batch end."""
    with _interrupts.stops_at_batch_ends() as stop_on_signal:
        return model.evaluate(x, y, verbose=0, return_dict=True, callbacks=[stop_on_signal])


def _accuracy(model, x, y, batch_size=256):
    import numpy as np

    # Whole batches only (zero rows appended, their logits dropped): a last
    # partial batch traces each model's predict function a second time, and
    # over the job's models TensorFlow then warns of excessive retracing.
    padding = np.zeros((-len(x) % batch_size, *x.shape[1:]), x.dtype)
    with _interrupts.stops_at_batch_ends() as stop_on_signal:
        logits = model.predict(
            np.concatenate([x, padding]), batch_size=batch_size, verbose=0,
            callbacks=[stop_on_signal],
        )
    return float((logits[: len(x)].argmax(axis=1) == y).mean())


def train(args):
    import keras
    import numpy as np

    from keras_condcomp import data
    from keras_condcomp.models import build_dense_mlp, build_gated_mlp, equal_macs_width
    from keras_condcomp.profiling import profile_macs

    for key, model in MODEL_ONLY_OPTIONS.items():
        if model != args.model and getattr(args, key) is not None:
            raise CommandError(
                f"--{key.replace('_', '-')} ({getattr(args, key)}) applies to --model {model} only"
            )
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _check_out_folder(args.out)
    if args.model == "cnn":
        return train_cnn(args)
    if args.units % args.blocks:
        raise CommandError(
            f"--units ({args.units}) must be divisible by --blocks ({args.blocks})"
        )
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(dataset.x_train))
    n_val = max(1, len(order) // 10)
    val, fit = order[:n_val], order[n_val:]
    x_train, y_train = dataset.x_train[fit], dataset.y_train[fit]
    x_val, y_val = dataset.x_train[val], dataset.y_train[val]
    input_dim = dataset.x_train.shape[1]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    print(f"Training a gated MLP on {dataset.name}: {len(fit)} train, {n_val} validation, "
          f"{len(dataset.x_test)} test examples")
    started = time.perf_counter()

    def build_gated():
        model = build_gated_mlp(
            input_dim, dataset.num_classes, units=args.units, blocks=args.blocks,
            layers=args.layers, target_density=args.target_density,
            sparsity_weight=args.sparsity_weight, variance_weight=args.variance_weight,
            example_sparsity_weight=args.example_sparsity_weight,
            sparsity_deviation=args.sparsity_deviation, seed=args.seed,
        )
        model.compile(
            _adam(args.learning_rate, args, len(fit)), loss, metrics=["accuracy"],
            policy_optimizer=_adam(args.policy_learning_rate, args, len(fit)),
        )
        return model

    gated = _trained(build_gated, args, x_train, y_train, x_val, y_val)
    gated_seconds = time.perf_counter() - started
    evaluation = _evaluated(gated, dataset.x_test, dataset.y_test)
    layer_names = [layer.name for layer in gated.layers if hasattr(layer, "policy")]
    layer_densities = {name: float(evaluation[f"{name}_density"]) for name in layer_names}
    macs = profile_macs(gated, layer_densities)

    def train_dense(units):
        def build():
            model = build_dense_mlp(input_dim, dataset.num_classes, units, args.layers)
            model.compile(_adam(args.learning_rate, args, len(fit)), loss, metrics=["accuracy"])
            return model

        return _trained(build, args, x_train, y_train, x_val, y_val)

    print(f"Training the same-width dense MLP ({args.layers} x {args.units})")
    started = time.perf_counter()
    dense = train_dense(args.units)
    dense_seconds = time.perf_counter() - started
    small_units = equal_macs_width(
        input_dim, dataset.num_classes, args.layers, macs.conditional_macs
    )
    print(f"Training the equal-MACs dense MLP ({args.layers} x {small_units})")
    small = train_dense(small_units)

    results = {
        "model": "mlp",
        "dataset": dataset.name,
        "test_accuracy": _accuracy(gated, dataset.x_test, dataset.y_test),
        "dense_test_accuracy": _accuracy(dense, dataset.x_test, dataset.y_test),
        "equal_macs_dense_test_accuracy": _accuracy(small, dataset.x_test, dataset.y_test),
        "equal_macs_dense_units": small_units,
        "density": float(evaluation["density"]),
        "layer_densities": layer_densities,
        "dense_macs": macs.dense_macs,
        "conditional_macs": macs.conditional_macs,
        "ideal_speedup": macs.ideal_speedup,
        "train_seconds": {"gated": gated_seconds, "dense": dense_seconds},
        "config": {key: value for key, value in vars(args).items() if key != "command"},
    }

    out = _measure_and_write(gated, dense, dataset.x_test, results, args,
                             against="same-width keras.layers.Dense MLP")
    _print_table(results, args)
    print(f"Wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'model.keras')}")
    return results


def _existing_ancestor(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


# The files the train job writes into --out, the last one last.
OUT_FILES = ("model.keras", "results.json")


def _check_out_folder(out):
    """Refuses an `--out` that cannot become a folder we can write, before
    any training (the job writes it only at the end): a staging folder is
    made and removed where the job will stage its files."""
    if not out:
        raise CommandError("--out must name a folder, got ''")
    out = os.path.abspath(out)
    ancestor = _existing_ancestor(out)
    if ancestor == out and not os.path.isdir(out):
        raise CommandError(f"--out ({out}) exists and is not a folder")
    if not os.path.isdir(ancestor):
        raise CommandError(f"--out ({out}): {ancestor} is not a folder")
    for name in OUT_FILES:
        if os.path.isdir(os.path.join(out, name)):
            raise CommandError(f"--out ({out}) holds a folder named {name}, which the job writes")
    try:
        os.rmdir(_staging_folder(out))
    except OSError as error:
        raise CommandError(f"--out ({out}): cannot write in {ancestor} ({error.strerror})") from None


def _staging_folder(out):
    """A new folder on the file system `out`'s files will be on: inside `out`
    when it exists (a mount point, or a folder in a read-only parent), else
    in its nearest existing folder (where `out` will be made)."""
    return tempfile.mkdtemp(prefix=".keras-condcomp-", dir=_existing_ancestor(out))


def _measure_and_write(gated, dense, x_test, results, args, against):
    """Times `gated` against `dense` in a fresh process (one thread), adds the
    speedups to `results`, and writes `model.keras` and `results.json` to
    `args.out` (from a staging folder on the same file system: nothing
    half-written, no folder made unless it all succeeds). Returns the output
    folder."""
    from keras_condcomp.speed import measure_models_speed

    out = os.path.abspath(args.out)
    staging = _staging_folder(out)
    try:
        gated_path = os.path.join(staging, "model.keras")
        dense_path = os.path.join(staging, "dense.keras")
        gated.save(gated_path)
        dense.save(dense_path)
        print("Measuring inference speed side by side (1 thread) ...")
        speed = measure_models_speed(
            gated_path, dense_path, x_test, SPEED_BATCH_SIZES,
            threads=1, repeats=args.speed_repeats,
        )
        os.remove(dense_path)
        for batch_size in SPEED_BATCH_SIZES:
            results[f"speedup_batch{batch_size}"] = speed[str(batch_size)]["speedup"]
            results[f"tuned_speedup_batch{batch_size}"] = speed[str(batch_size)]["tuned_speedup"]
            if "compact_speedup" in speed[str(batch_size)]:
                results[f"compact_speedup_batch{batch_size}"] = speed[str(batch_size)][
                    "compact_speedup"
                ]
        results["speed"] = {
            "threads": 1, "repeats": args.speed_repeats,
            "against": f"{against}, median latency", **speed,
        }
        with open(os.path.join(staging, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        os.makedirs(out, exist_ok=True)
        for name in OUT_FILES:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
        stale = [name for name in ("model.onnx", "model.tflite") if os.path.exists(
            os.path.join(out, name))]
        if stale:
            print(f"Note: {', '.join(stale)} in {out} were exported from an earlier model.")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# The image shapes of the datasets known before loading them.
KNOWN_IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1)}


def _check_cnn_fits(args, filters, shape):
    """Refuses `--filters` / `--policy-grid` that do not fit `shape` images."""
    # Each gated convolution but the last is followed by 2x2 max pooling.
    smallest = min(shape[:2]) // 2 ** (len(filters) - 1)
    if smallest < 1:
        raise CommandError(
            f"--filters ({args.filters}): {len(filters)} convolutions pool the "
            f"{shape[0]}x{shape[1]} images {len(filters) - 1} times; at most "
            f"{min(shape[:2]).bit_length()} convolutions fit"
        )
    if args.policy_grid is not None and args.policy_grid > smallest:
        raise CommandError(
            f"--policy-grid ({args.policy_grid}) must be at most {smallest}, the "
            f"rows of the last gated convolution's input ({shape[0]}x{shape[1]} images)"
        )


def _image_shape(dataset):
    """`(rows, cols, channels)` of a dataset of flattened images."""
    if dataset.image_shape is None:
        raise CommandError(
            f"--model cnn needs images; {dataset.name} has examples of shape "
            f"{dataset.x_train.shape[1:]} and no image shape"
        )
    return tuple(dataset.image_shape)


def _parse_filters(text, blocks):
    try:
        filters = tuple(int(part) for part in text.split(","))
    except ValueError:
        filters = ()
    if not filters or any(f <= 0 or f % blocks for f in filters):
        raise CommandError(
            f"--filters must be comma-separated positive integers divisible by "
            f"--blocks ({blocks}), got {text!r}"
        )
    return filters


def train_cnn(args):
    """`train --model cnn`: a gated CNN against the same-width Conv2D CNN."""
    import keras
    import numpy as np

    from keras_condcomp import data
    from keras_condcomp.models.cnn import build_dense_cnn, build_gated_cnn
    from keras_condcomp.profiling import profile_macs

    filters = _parse_filters(args.filters, args.blocks)
    if args.dataset in KNOWN_IMAGE_SHAPES:
        # Checked before loading (a download, for mnist without --data-dir).
        _check_cnn_fits(args, filters, KNOWN_IMAGE_SHAPES[args.dataset])
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    shape = _image_shape(dataset)
    _check_cnn_fits(args, filters, shape)
    images = lambda x: x.reshape((len(x), *shape))  # noqa: E731

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(dataset.x_train))
    n_val = max(1, len(order) // 10)
    val, fit = order[:n_val], order[n_val:]
    x_train, y_train = images(dataset.x_train[fit]), dataset.y_train[fit]
    x_val, y_val = images(dataset.x_train[val]), dataset.y_train[val]
    x_test, y_test = images(dataset.x_test), dataset.y_test
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    print(f"Training a gated CNN on {dataset.name}: {len(fit)} train, {n_val} validation, "
          f"{len(x_test)} test examples")
    started = time.perf_counter()

    def build_gated():
        model = build_gated_cnn(
            shape, dataset.num_classes, filters=filters, blocks=args.blocks,
            target_density=args.target_density, sparsity_weight=args.sparsity_weight,
            variance_weight=args.variance_weight,
            example_sparsity_weight=args.example_sparsity_weight,
            sparsity_deviation=args.sparsity_deviation, seed=args.seed,
            policy_grid=args.policy_grid,
        )
        model.compile(
            _adam(args.learning_rate, args, len(fit)), loss, metrics=["accuracy"],
            policy_optimizer=_adam(args.policy_learning_rate, args, len(fit)),
        )
        return model

    gated = _trained(build_gated, args, x_train, y_train, x_val, y_val)
    gated_seconds = time.perf_counter() - started
    evaluation = _evaluated(gated, x_test, y_test)
    gated_convs = [layer for layer in gated.layers if hasattr(layer, "policy")]
    layer_densities = {
        layer.name: float(evaluation[f"{layer.name}_density"]) for layer in gated_convs
    }
    macs = profile_macs(gated, x=x_test)

    print(f"Training the same-width Conv2D CNN (filters {','.join(map(str, filters))})")
    started = time.perf_counter()

    def build_dense():
        model = build_dense_cnn(shape, dataset.num_classes, filters=filters)
        model.compile(_adam(args.learning_rate, args, len(fit)), loss, metrics=["accuracy"])
        return model

    dense = _trained(build_dense, args, x_train, y_train, x_val, y_val)
    dense_seconds = time.perf_counter() - started

    results = {
        "model": "cnn",
        "dataset": dataset.name,
        "test_accuracy": _accuracy(gated, x_test, y_test),
        "dense_test_accuracy": _accuracy(dense, x_test, y_test),
        "density": float(evaluation["density"]),
        "layer_densities": layer_densities,
        "policy_grids": {layer.name: layer.policy_grid for layer in gated_convs},
        "dense_macs": macs.dense_macs,
        "conditional_macs": macs.conditional_macs,
        "ideal_speedup": macs.ideal_speedup,
        "train_seconds": {"gated": gated_seconds, "dense": dense_seconds},
        "config": {key: value for key, value in vars(args).items() if key != "command"},
    }
    out = _measure_and_write(gated, dense, x_test, results, args,
                             against="same-width keras.layers.Conv2D CNN")
    print()
    print(f"{'model':<44} {'test acc':>9} {'MACs/example':>13}")
    print(f"{f'gated CNN ({args.blocks} groups per layer)':<44} "
          f"{results['test_accuracy']:>9.4f} {results['conditional_macs']:>13,.0f}")
    print(f"{'Conv2D CNN, same width':<44} {results['dense_test_accuracy']:>9.4f} "
          f"{results['dense_macs']:>13,.0f}")
    print(_density_and_speed_line(results))
    print(f"Wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'model.keras')}")
    return results


EXPORT_DESCRIPTION = """Export a gated model to ONNX or LiteRT (keras_condcomp.export).

Gated layers keep skipping in the exported graph: each computes a fixed
budget of blocks per example. With a dataset (given, or named in the
results.json that `train` wrote beside the model) the budgets are the most
active blocks of a training example, and the test accuracy of the exported
model in its runtime (quantised or not) is compared with Keras's.
"""


def export(args):
    import keras
    import numpy as np

    import keras_condcomp  # noqa: F401  (registers the layers)
    from keras_condcomp import data
    from keras_condcomp.export import (
        active_block_counts,
        export_litert,
        export_onnx,
        litert_predict,
        onnx_predict,
    )

    if args.format != "litert" and args.quantize:
        raise CommandError("--quantize applies to --format litert only")
    if args.format != "onnx" and args.opset:
        raise CommandError("--opset applies to --format onnx only")
    try:
        model = keras.saving.load_model(args.model)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load {args.model}: {error}") from None
    dataset_name, data_dir = args.dataset, args.data_dir
    results_path = os.path.join(os.path.dirname(os.path.abspath(args.model)), "results.json")
    if dataset_name is None and os.path.exists(results_path):
        try:
            with open(results_path) as handle:
                config = json.load(handle)["config"]
            dataset_name = config["dataset"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CommandError(
                f"cannot read the dataset from {results_path} ({type(error).__name__}: "
                f"{error}): pass --dataset"
            ) from None
        if data_dir is None and config.get("data_dir") is not None:
            data_dir = config["data_dir"]
            if not os.path.isdir(data_dir):
                raise CommandError(
                    f"the data directory recorded in {results_path} ({data_dir}) is not "
                    "found from here: pass --data-dir (or --dataset)"
                )
    dataset = None
    if dataset_name is not None:
        try:
            dataset = data.load_dataset(dataset_name, data_dir)
        except (OSError, ValueError) as error:
            raise CommandError(str(error)) from None
        expected = tuple(model.inputs[0].shape[1:])
        if dataset.x_train.shape[1:] != expected:
            if None in expected or math.prod(expected) != dataset.x_train.shape[1]:
                raise CommandError(
                    f"dataset {dataset.name} has inputs of shape {dataset.x_train.shape[1:]}, "
                    f"the model expects {expected}"
                )
            # Flattened images, as `train --model cnn` reshapes them.
            for split in ("x_train", "x_test"):
                array = getattr(dataset, split)
                setattr(dataset, split, array.reshape((len(array), *expected)))
    representative = None
    if dataset is not None:
        order = np.random.default_rng(0).permutation(len(dataset.x_train))[:1000]
        representative = dataset.x_train[order]
    try:
        if args.format == "onnx":
            budgets = export_onnx(
                model, args.out, opset=args.opset, batch_size=args.batch_size,
                budget=args.budget, representative_data=representative,
            )
            predict = onnx_predict
        else:
            budgets = export_litert(
                model, args.out, batch_size=args.batch_size or 1, quantize=args.quantize,
                representative_data=representative, budget=args.budget,
            )
            predict = litert_predict
    except (ValueError, ImportError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(f"cannot write --out ({args.out}): {error.strerror or error}") from None
    report = {
        "format": args.format, "path": os.path.abspath(args.out),
        "bytes": os.path.getsize(args.out), "budgets": budgets, "quantize": args.quantize,
    }
    blocks = {layer.name: layer.blocks for layer in _gated(model)}
    print(f"Wrote {args.out} ({report['bytes']:,} bytes); blocks computed per example: "
          + (", ".join(f"{name} {value} of {blocks[name]}" for name, value in budgets.items())
             or "no gated layers")
          + ("" if all(v < blocks[k] for k, v in budgets.items()) else
             " (a layer computing every block runs its masked dense product)"))
    if dataset is not None:
        keras_logits = model.predict(dataset.x_test, batch_size=256, verbose=0)
        # A budget below every group of a GatedConv2D counts the groups of a
        # whole batch: a dynamic batch is checked one example a call, as such
        # a model is served; a static one takes its batch.
        batch_wide = any(
            getattr(type(layer), "static_budget_scope", "example") == "batch"
            and budgets[layer.name] < layer.blocks for layer in _gated(model)
        )
        if batch_wide and args.format == "onnx" and args.batch_size is None:
            exported = predict(args.out, dataset.x_test, batch_size=1)
            print("Checked one example a call: a GatedConv2D budget counts the groups "
                  "of a whole batch (export with --batch-size 1 for budgets per example).")
        else:
            exported = predict(args.out, dataset.x_test)
            if batch_wide and (args.batch_size or 1) > 1:
                print(f"Checked {args.batch_size} examples a call (the file's batch): a "
                      "GatedConv2D budget counts the groups of the whole batch, so an "
                      "example's output depends on the others of its call (export with "
                      "--batch-size 1 for budgets per example).")
        counts = active_block_counts(model, dataset.x_test)
        over = {
            name: float(np.mean(counts[name] > budgets[name])) for name in budgets
        }
        report.update({
            "dataset": dataset.name,
            "keras_test_accuracy": float((keras_logits.argmax(1) == dataset.y_test).mean()),
            "exported_test_accuracy": float((exported.argmax(1) == dataset.y_test).mean()),
            "max_abs_logit_difference": float(np.abs(exported - keras_logits).max()),
            "test_examples_over_budget": over,
        })
        change = report["exported_test_accuracy"] - report["keras_test_accuracy"]
        print(
            f"test accuracy on {dataset.name}: keras {report['keras_test_accuracy']:.4f}, "
            f"exported ({args.format}{', ' + args.quantize if args.quantize else ''}) "
            f"{report['exported_test_accuracy']:.4f} (change {change:+.4f}); "
            f"max |logit difference| {report['max_abs_logit_difference']:.2e}; "
            "test examples with more active blocks than the budget: "
            + (", ".join(f"{name} {value:.1%}" for name, value in over.items()) or "-")
        )
    else:
        print("No dataset: accuracy not checked (pass --dataset).")
    return report


def _gated(model):
    from keras_condcomp.models.policy_gradient_model import gated_layers

    return gated_layers(model)


def _density_and_speed_line(results):
    densities = ", ".join(f"{k} {v:.3f}" for k, v in results["layer_densities"].items())
    return (
        f"\ninference density {results['density']:.3f} ({densities}); "
        f"ideal speedup {results['ideal_speedup']:.2f}x; measured (1 thread) "
        f"batch 1: {results['speedup_batch1']:.2f}x, batch 256: {results['speedup_batch256']:.2f}x; "
        f"with paths tuned per batch size: {results['tuned_speedup_batch1']:.2f}x, "
        f"{results['tuned_speedup_batch256']:.2f}x"
        + (
            f"; as one chain (compact_inference): {results['compact_speedup_batch1']:.2f}x, "
            f"{results['compact_speedup_batch256']:.2f}x"
            if "compact_speedup_batch256" in results else ""
        )
        + "".join(
            f"\nwarning: {name} runs no block at inference: its policy closes every "
            "block on the test set (raise --target-density or train longer)"
            for name, density in results["layer_densities"].items() if density == 0
        )
    )


def _print_table(results, args):
    rows = [
        (f"gated MLP ({args.layers} x {args.blocks} blocks of {args.units // args.blocks})",
         results["test_accuracy"], results["conditional_macs"]),
        (f"dense MLP, same width ({args.units})", results["dense_test_accuracy"],
         results["dense_macs"]),
        (f"dense MLP, equal MACs ({results['equal_macs_dense_units']})",
         results["equal_macs_dense_test_accuracy"], None),
    ]
    print()
    print(f"{'model':<44} {'test acc':>9} {'MACs/example':>13}")
    for name, accuracy, macs in rows:
        macs_text = f"{macs:>13,.0f}" if macs is not None else f"{'~ gated':>13}"
        print(f"{name:<44} {accuracy:>9.4f} {macs_text}")
    print(_density_and_speed_line(results))


def main(argv=None):
    """Runs `keras-condcomp` with `argv` (default `sys.argv[1:]`) in this
    process; returns the exit status (0, or 1 after a one-line error on
    stderr). An interrupt propagates, its staging files removed."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.data_dir:
        # Recorded in results.json, which export may read from elsewhere.
        args.data_dir = os.path.abspath(args.data_dir)
    try:
        if args.command == "train":
            train(args)
        elif args.command == "export":
            export(args)
    except CommandError as error:
        if _interrupts.pending():  # an error a signal caused inside native code
            raise KeyboardInterrupt(_interrupts.pending()) from None
        print(f"keras-condcomp: error: {error}", file=sys.stderr)
        return 1
    return 0


def console_main():
    """The `keras-condcomp` command: `main()`, with Ctrl-C and a SIGTERM (kill,
    timeout, a scheduler) unwinding alike (staging files removed, the speed
    measurement's process stopped; training stops at a batch end), and an
    interrupt reported in one line with the shell's status (130, 143)."""
    _interrupts.install()
    try:
        return main()
    except BaseException as error:
        # An interrupt raised inside native code can surface as another error.
        if not isinstance(error, KeyboardInterrupt) and _interrupts.pending() is None:
            raise
        signum = signal.Signals[_interrupts.pending() or "SIGINT"]
        print(f"keras-condcomp: interrupted ({signum.name})", file=sys.stderr)
        return 128 + signum
