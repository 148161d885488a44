"""Schedules and monitoring: a density curriculum and a compute monitor on digits.

Trains a gated MLP on the embedded digits with a `DensityScheduler` (target
density annealed from 0.3 to the layers' 0.22 over the first 10 epochs) and a
`ComputeMonitor` that logs densities and conditional MACs every epoch, writes
TensorBoard scalars and block-usage histograms, and draws a PNG of block usage
per class and the density curves.

    python examples/schedules_and_monitoring.py --out runs/monitoring
    tensorboard --logdir runs/monitoring/logs
"""

import argparse
import os

import keras

from keras_condcomp.callbacks import ComputeMonitor, DensityScheduler, PolicyWarmup
from keras_condcomp.data import load_digits
from keras_condcomp.models import build_gated_mlp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--units", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--out", default="runs/monitoring")
    args = parser.parse_args(argv)
    for option in ("epochs", "units", "blocks"):
        if getattr(args, option) <= 0:
            parser.error(f"--{option} must be a positive integer, got {getattr(args, option)}")
    if not 0 <= args.warmup_epochs < args.epochs:
        parser.error(f"--warmup-epochs must be in [0, --epochs), got {args.warmup_epochs}")

    keras.utils.set_random_seed(0)
    digits = load_digits()
    model = build_gated_mlp(
        64, 10, units=args.units, blocks=args.blocks, layers=2, target_density=0.22,
        sparsity_weight=5.0, variance_weight=10.0, example_sparsity_weight=80.0, seed=0,
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        policy_optimizer=keras.optimizers.Adam(1e-2),
    )
    callbacks = [
        # Every block runs for the warm-up epochs (none by default), then the
        # target density goes from 0.3 down to each layer's 0.22 in 10 epochs.
        PolicyWarmup(args.warmup_epochs),
        DensityScheduler(start=0.3, epochs=10, start_epoch=args.warmup_epochs),
        ComputeMonitor(
            digits.x_test, digits.y_test,
            log_dir=os.path.join(args.out, "logs"),
            plot_path=os.path.join(args.out, "compute.png"),
        ),
    ]
    history = model.fit(
        digits.x_train, digits.y_train, epochs=args.epochs, batch_size=32,
        validation_split=0.1, callbacks=callbacks, verbose=2,
    )
    last = {key: values[-1] for key, values in history.history.items()}
    test = model.evaluate(digits.x_test, digits.y_test, verbose=0, return_dict=True)
    print(
        f"target density {last['target_density']:.3f}, "
        f"inference density on the test set {last['inference_density']:.3f}, "
        f"conditional MACs {last['inference_conditional_macs']:,.0f} "
        f"of {last['dense_macs']:,.0f}, "
        f"test accuracy {test['accuracy']:.4f}"
    )
    print(f"Wrote {os.path.join(args.out, 'compute.png')} and TensorBoard logs")
    return history


if __name__ == "__main__":
    main()
