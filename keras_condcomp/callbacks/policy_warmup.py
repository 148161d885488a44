"""PolicyWarmup: every block open for the first epochs, then the policy."""

import keras

from keras_condcomp._arguments import check_non_negative_int
from keras_condcomp.callbacks._common import require_gated_layers

__all__ = ["PolicyWarmup"]


class PolicyWarmup(keras.callbacks.Callback):
    """Trains with every block open for `epochs` epochs, then switches the policy on.

    During the warm-up each gated layer runs all its blocks in training and in
    `PolicyGradientModel.evaluate` (so `val_*` logs describe the dense
    network), and its policy gets no REINFORCE gradient and no gating
    regulariser (a `policy_regularizer` still applies). When it switches the
    policies on, it sets the step count of a separate `policy_optimizer`
    (`PolicyGradientModel.compile`) back to what it was when this callback
    saw the warm-up begin (0 for a new model; a `fit` resumed at the switch
    with the same callback included), so that optimizer's learning-rate
    schedule and Adam's bias correction do not count the warm-up's steps on
    zero gradients (Adam's moments keep what a `policy_regularizer` put in
    them; one optimizer for both keeps counting the network's steps). From
    epoch `epochs` on (the
    epoch index Keras gives, which starts at `fit`'s `initial_epoch`: a `fit`
    resumed at `initial_epoch >= epochs` has no warm-up) the policy decides
    as usual. It works by `GatedDense.set_policy_enabled`,
    read at call time, so no retracing is needed. The policy is switched on
    again when training ends, whenever that happens (a
    `PolicyGradientModel.fit` stopped by an exception or Ctrl-C gives every
    layer back the state it had before `fit`).

    Writes `policy_enabled` (0 or 1) into the epoch's `logs`.

    Args:
        epochs: non-negative int, number of warm-up epochs (0: no warm-up).
        verbose: 0 quiet, 1 prints when the policy switches on.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.models import build_gated_mlp
        >>> model = build_gated_mlp(8, 3, units=16, blocks=4, layers=1, target_density=0.5)
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 8).astype("float32"), np.arange(32) % 3
        >>> history = model.fit(x, y, epochs=3, callbacks=[PolicyWarmup(2)], verbose=0)
        >>> print(*history.history["policy_enabled"])
        0.0 0.0 1.0
        >>> densities = history.history["density"]
        >>> densities[0], densities[1]
        (1.0, 1.0)
    """

    def __init__(self, epochs, verbose=0):
        super().__init__()
        check_non_negative_int("epochs", epochs)
        if verbose not in (0, 1):
            raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
        self.epochs = int(epochs)
        self.verbose = verbose
        self._steps_before = None

    def _set(self, enabled):
        for layer in require_gated_layers(self, self.model):
            layer.set_policy_enabled(enabled)

    def on_train_begin(self, logs=None):
        require_gated_layers(self, self.model)

    def on_epoch_begin(self, epoch, logs=None):
        policy_optimizer = getattr(self.model, "policy_optimizer", None)
        if epoch < self.epochs and self._steps_before is None and policy_optimizer is not None:
            self._steps_before = int(policy_optimizer.iterations)
        if epoch == self.epochs and self.epochs > 0:
            if self.verbose:
                print(f"\nPolicyWarmup: epoch {epoch + 1}: policies switched on.")
            # Counting the warm-up's steps on zero gradients would leave Adam's
            # bias correction as for a trained policy: larger first steps.
            if self._steps_before is not None:
                policy_optimizer.iterations.assign(self._steps_before)
                self._steps_before = None
        self._set(epoch >= self.epochs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["policy_enabled"] = float(epoch >= self.epochs)

    def on_train_end(self, logs=None):
        self._set(True)
