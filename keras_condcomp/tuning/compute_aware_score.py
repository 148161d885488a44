"""A scale-free score trading accuracy against conditional MACs, for any tuner."""

import math
import warnings

import keras

from keras_condcomp._arguments import is_number

__all__ = ["ComputeAwareScore", "compute_aware_objective", "compute_aware_score"]

DEFAULT_MACS_WEIGHT = 0.02
DEFAULT_NAME = "compute_aware_score"


def _check_positive(name, value):
    if not is_number(value) or not value > 0:
        raise ValueError(f"`{name}` must be a finite positive number. Received: {name}={value!r}")


def _check_weight(macs_weight):
    if not is_number(macs_weight) or macs_weight < 0:
        raise ValueError(
            "`macs_weight` must be a finite non-negative number. "
            f"Received: macs_weight={macs_weight!r}"
        )


def _check_min_accuracy(min_accuracy):
    if not is_number(min_accuracy) or not 0 <= min_accuracy <= 1:
        raise ValueError(
            "`min_accuracy` must be a number in [0, 1]. "
            f"Received: min_accuracy={min_accuracy!r}"
        )


def _check_text(argument, value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{argument}` must be a non-empty string. Received: {argument}={value!r}")


def compute_aware_score(
    accuracy, conditional_macs, reference_macs, macs_weight=DEFAULT_MACS_WEIGHT, min_accuracy=0.0
):
    """`accuracy - macs_weight * log2(conditional_macs / reference_macs)`.

    Scale-free: MACs enter only as a ratio, and each halving of the compute
    is worth `macs_weight` of accuracy wherever it happens (a model at the
    reference scores its accuracy; at half the reference, accuracy plus
    `macs_weight`). Below `min_accuracy` a model gets no credit for its
    compute: it scores its accuracy alone, so it ranks below every model
    that reaches the floor at no more than the reference's MACs (a policy
    that closed every block, at chance accuracy, cannot win on its MACs).

    Args:
        accuracy: the model's accuracy, in [0, 1].
        conditional_macs: positive MACs per example the model computes.
        reference_macs: positive MACs per example of the reference.
        macs_weight: non-negative accuracy a halving of compute is worth
            (default 0.02).
        min_accuracy: the accuracy below which compute earns nothing, in
            [0, 1] (default 0: no floor).

    Returns:
        The score, a float.

    Raises:
        ValueError: an argument out of its range.

    Examples:
        >>> round(compute_aware_score(0.90, 25_000, 100_000, macs_weight=0.02), 4)
        0.94
        >>> compute_aware_score(0.10, 1_000, 100_000, min_accuracy=0.5)  # a collapsed policy
        0.1
    """
    _check_positive("conditional_macs", conditional_macs)
    _check_positive("reference_macs", reference_macs)
    _check_weight(macs_weight)
    _check_min_accuracy(min_accuracy)
    if float(accuracy) < min_accuracy:
        return float(accuracy)
    return float(accuracy) - macs_weight * math.log2(conditional_macs / reference_macs)


def compute_aware_objective(name=DEFAULT_NAME):
    """The KerasTuner objective maximising the validation score `val_<name>`.

    Args:
        name: the score's name in the logs, a non-empty string (default
            `"compute_aware_score"`, as `ComputeAwareScore` logs it).

    Returns:
        `keras_tuner.Objective(f"val_{name}", direction="max")`.

    Examples:
        >>> compute_aware_objective().name
        'val_compute_aware_score'
    """
    import keras_tuner

    _check_text("name", name)
    return keras_tuner.Objective(f"val_{name}", direction="max")


class ComputeAwareScore(keras.callbacks.Callback):
    """Writes `compute_aware_score` (and `val_compute_aware_score`) into the logs.

    At each epoch's end, from the logged accuracy and `conditional_macs` of a
    `keras_condcomp.PolicyGradientModel`:

    `score = accuracy - macs_weight * log2(conditional_macs / reference_macs)`

    so any tuner can maximise `keras_tuner.Objective("val_compute_aware_score",
    "max")` (see `compute_aware_objective`). KerasTuner's own list objective
    sums raw values, which means nothing across units; this score uses MACs
    only as a ratio. Pass the callback to `tuner.search(callbacks=[...])`
    (`GatedMLPHyperModel` adds one itself). Use one `reference_macs` for the
    whole search, such as the dense MACs of the baseline you want to beat:
    the trial's own dense MACs would reward oversized sparse models.

    Args:
        reference_macs: positive MACs per example of the reference model.
        macs_weight: accuracy a halving of compute is worth (default 0.02).
        accuracy: name of the logged accuracy metric (default `"accuracy"`).
        name: name of the score in the logs.
        min_accuracy: the accuracy below which compute earns nothing (see
            `compute_aware_score`; default 0: no floor).

    Examples:
        >>> score = ComputeAwareScore(reference_macs=100_000)
        >>> logs = {"accuracy": 0.9, "conditional_macs": 50_000.0}
        >>> score.on_epoch_end(0, logs)
        >>> round(logs["compute_aware_score"], 4)
        0.92
    """

    def __init__(
        self, reference_macs, macs_weight=DEFAULT_MACS_WEIGHT, accuracy="accuracy",
        name=DEFAULT_NAME, min_accuracy=0.0,
    ):
        super().__init__()
        _check_positive("reference_macs", reference_macs)
        _check_weight(macs_weight)
        _check_min_accuracy(min_accuracy)
        _check_text("accuracy", accuracy)
        _check_text("name", name)
        self.reference_macs = float(reference_macs)
        self.macs_weight = float(macs_weight)
        self.min_accuracy = float(min_accuracy)
        self.accuracy = accuracy
        self.name = name
        self._validated = False

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if "conditional_macs" not in logs or self.accuracy not in logs:
            raise ValueError(
                f"ComputeAwareScore needs `{self.accuracy}` and `conditional_macs` in "
                "the logs: use a keras_condcomp.PolicyGradientModel with gated layers, "
                f"compiled with that metric. Logged: {sorted(logs)}"
            )
        for prefix in ("", "val_"):
            accuracy = logs.get(prefix + self.accuracy)
            macs = logs.get(prefix + "conditional_macs")
            if accuracy is not None and macs is not None:
                logs[prefix + self.name] = compute_aware_score(
                    accuracy, float(macs), self.reference_macs, self.macs_weight,
                    self.min_accuracy,
                )
                self._validated = self._validated or bool(prefix)

    def on_train_begin(self, logs=None):
        self._validated = False

    def on_train_end(self, logs=None):
        if not self._validated:
            # KerasTuner then fails with a bare KeyError on the objective.
            warnings.warn(
                f"ComputeAwareScore wrote no `val_{self.name}`: the fit had no validation "
                "data, which `compute_aware_objective()` reads (pass validation_data or "
                "validation_split to the search).",
                stacklevel=2,
            )
