"""Search gated MLPs for the best accuracy per MAC with KerasTuner.

A `RandomSearch` over `keras_condcomp.tuning.GatedMLPHyperModel` maximising
`val_compute_aware_score = val_accuracy - w * log2(val_conditional_macs / reference)`,
then the Pareto front (accuracy vs MACs) of all trials, printed and plotted.

    python examples/tune_speed_accuracy.py --directory runs/tuning --plot front.png

Run it again with the same `--directory` to continue the search (raise
`--max-trials` to add trials); the other options must stay as they were (the
run refuses changed ones: KerasTuner keeps the first run's search space, and
scores made with another `--macs-weight` would not compare). KerasTuner's distributed mode needs no change:
start one chief and any number of workers with the same arguments,

    KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        python examples/tune_speed_accuracy.py --directory runs/chief --plot front.png
    KERASTUNER_TUNER_ID=tuner0 KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        python examples/tune_speed_accuracy.py --directory runs/tuner0

(the chief prints the front once every worker is done).
"""

import argparse
import json
import math
import os

import keras
import keras_tuner
import numpy as np

from keras_condcomp import data, tuning


def _is_worker():
    return "KERASTUNER_ORACLE_IP" in os.environ and "chief" not in os.environ.get(
        "KERASTUNER_TUNER_ID", ""
    )


# The options that define the search: a continued search must keep them.
SEARCH_OPTIONS = ("dataset", "data_dir", "epochs", "batch_size", "train_examples", "layers",
                  "units", "macs_weight", "min_accuracy", "seed")
# The values of options that searches recorded before the option existed.
OPTION_DEFAULTS = {"min_accuracy": 0.0}


def _search_options(args):
    options = {name: getattr(args, name) for name in SEARCH_OPTIONS}
    if options["units"] is not None:
        options["units"] = sorted(options["units"])  # the same choices in any order
    return options


def _options_path(args):
    return os.path.join(args.directory, "speed_accuracy", "search_options.json")


def _check_same_search(parser, args):
    """Refuses options other than those the search in `--directory` ran with."""
    path = _options_path(args)
    if not os.path.exists(path):
        return
    with open(path) as f:
        first = json.load(f)
    options = _search_options(args)
    recorded = {name: first.get(name, OPTION_DEFAULTS.get(name)) for name in SEARCH_OPTIONS}
    changed = [f"--{name.replace('_', '-')} {recorded[name]!r} -> {options[name]!r}"
               for name in SEARCH_OPTIONS if recorded[name] != options[name]]
    if changed:
        parser.error(f"{args.directory} holds a search run with other options "
                     f"({', '.join(changed)}): use another --directory")


def _record_search(args):
    """Records the search's options beside its trials (once the tuner exists)."""
    path = _options_path(args)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(_search_options(args), f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits, mnist or tfds:NAME")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--directory", required=True, help="where the tuner keeps its state")
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-examples", type=int, default=None,
                        help="use only the first N training examples")
    parser.add_argument("--layers", type=int, default=None, help="fix the number of layers")
    parser.add_argument("--units", type=int, nargs="+", default=None,
                        help="the widths to choose from")
    parser.add_argument("--macs-weight", type=float, default=0.02,
                        help="accuracy a halving of compute is worth")
    parser.add_argument("--min-accuracy", type=float, default=0.0,
                        help="accuracy below which a trial's compute earns nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="PNG of the Pareto front")
    args = parser.parse_args(argv)
    for option in ("max_trials", "epochs", "batch_size", "train_examples", "layers"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            parser.error(f"--{option.replace('_', '-')} must be a positive integer, got {value}")
    if args.units is not None and min(args.units) <= 0:
        parser.error(f"--units must be positive integers, got {args.units}")
    if not math.isfinite(args.macs_weight) or args.macs_weight < 0:
        parser.error(f"--macs-weight must be a finite non-negative number, got {args.macs_weight}")
    if not 0 <= args.min_accuracy <= 1:
        parser.error(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    _check_same_search(parser, args)

    dataset = data.load_dataset(args.dataset, args.data_dir)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(dataset.x_train))
    n_val = max(1, len(order) // 5)
    train = order[n_val:][: args.train_examples]
    val = order[:n_val]

    hyperparameters = keras_tuner.HyperParameters()
    if args.layers is not None:
        hyperparameters.Fixed("layers", args.layers)
    if args.units is not None:
        hyperparameters.Choice("units", args.units)
    tuner = keras_tuner.RandomSearch(
        tuning.GatedMLPHyperModel(
            dataset.x_train.shape[1:], dataset.num_classes,
            macs_weight=args.macs_weight, seed=args.seed, min_accuracy=args.min_accuracy,
        ),
        objective=tuning.compute_aware_objective(),
        max_trials=args.max_trials,
        hyperparameters=hyperparameters,
        directory=args.directory,
        project_name="speed_accuracy",
        seed=args.seed,
        overwrite=False,  # run again to continue
    )
    _record_search(args)
    tuner.search(
        dataset.x_train[train], dataset.y_train[train],
        validation_data=(dataset.x_train[val], dataset.y_train[val]),
        epochs=args.epochs, batch_size=args.batch_size, verbose=0,
    )
    if _is_worker():
        print(f"worker {os.environ['KERASTUNER_TUNER_ID']} done")
        return
    tuning.print_pareto_front(tuner, plot_path=args.plot)


if __name__ == "__main__":
    main()
