"""What the gated hypermodels share: arguments, the gating search space, compile, fit."""

import keras
import keras_tuner

from keras_condcomp._arguments import is_integer
from keras_condcomp.models.policy_gradient_model import PolicyGradientModel
from keras_condcomp.tuning.compute_aware_score import (
    DEFAULT_MACS_WEIGHT,
    ComputeAwareScore,
    _check_positive,
    _check_weight,
)

__all__ = ["GatedHyperModel"]

# What a hyperparameter the search does not tune takes (KerasTuner's
# `tune_new_entries=False`, the first point of a GridSearch).
DEFAULTS = {"target_density": 0.25, "sparsity_weight": 1.0, "variance_weight": 1.0,
            "policy_learning_rate": 1e-2}


class GatedHyperModel(keras_tuner.HyperModel):
    """Base of the gated hypermodels; subclasses define the architecture.

    A subclass registers its architecture's hyperparameters in
    `architecture(hp)` (first, so their names come first in a search),
    builds the hidden layers in `hidden(inputs, architecture, gate_kwargs)`
    and gives the dense MACs of the widest network of its space in
    `widest_dense_macs()` (the default `reference_macs`). The gating
    hyperparameters are shared: `target_density` tau in [0.05, 0.5] (log),
    `sparsity_weight` lambda_s in [0.1, 10] (log), `variance_weight`
    lambda_v in [0, 10], `policy_learning_rate` in [1e-4, 1e-1] (log); their
    defaults (the values of those a search does not tune) are `DEFAULTS`.
    """

    model_name = "gated"
    input_rank = None  # None: any rank; else the rank an example must have

    def __init__(
        self, input_shape, num_classes, learning_rate=1e-3, reference_macs=None,
        macs_weight=DEFAULT_MACS_WEIGHT, seed=None, name=None, tunable=True,
    ):
        super().__init__(name=name, tunable=tunable)
        if is_integer(input_shape):
            input_shape = (input_shape,)
        if not (
            isinstance(input_shape, (tuple, list)) and input_shape
            and all(is_integer(d) and d > 0 for d in input_shape)
            and self.input_rank in (None, len(input_shape))
        ):
            rank = "" if self.input_rank is None else f" of length {self.input_rank}"
            raise ValueError(
                f"`input_shape` must be a tuple{rank} of positive integers. "
                f"Received: input_shape={input_shape!r}"
            )
        if not is_integer(num_classes) or num_classes < 2:
            raise ValueError(
                f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes!r}"
            )
        _check_positive("learning_rate", learning_rate)
        _check_weight(macs_weight)
        if seed is not None and (not is_integer(seed) or seed < 0):
            raise ValueError(f"`seed` must be None or a non-negative int. Received: seed={seed!r}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.learning_rate = float(learning_rate)
        if reference_macs is None:
            reference_macs = self.widest_dense_macs()
        _check_positive("reference_macs", reference_macs)
        self.reference_macs = float(reference_macs)
        self.macs_weight = float(macs_weight)
        self.seed = None if seed is None else int(seed)

    def architecture(self, hp):
        raise NotImplementedError

    def hidden(self, inputs, architecture, gate_kwargs):
        raise NotImplementedError

    def widest_dense_macs(self):
        raise NotImplementedError

    def layer_seed(self, index):
        return None if self.seed is None else self.seed + index

    def build(self, hp):
        architecture = self.architecture(hp)
        gate_kwargs = dict(
            target_density=hp.Float(
                "target_density", 0.05, 0.5, sampling="log", default=DEFAULTS["target_density"]
            ),
            sparsity_weight=hp.Float(
                "sparsity_weight", 0.1, 10.0, sampling="log", default=DEFAULTS["sparsity_weight"]
            ),
            variance_weight=hp.Float(
                "variance_weight", 0.0, 10.0, default=DEFAULTS["variance_weight"]
            ),
        )
        policy_learning_rate = hp.Float(
            "policy_learning_rate", 1e-4, 1e-1, sampling="log",
            default=DEFAULTS["policy_learning_rate"],
        )
        # A value fixed by the caller's `hp` is not checked by the range above.
        _check_positive("policy_learning_rate", policy_learning_rate)
        inputs = keras.Input(self.input_shape, name="inputs")
        hidden = self.hidden(inputs, architecture, gate_kwargs)
        outputs = keras.layers.Dense(self.num_classes, name="logits")(hidden)
        model = PolicyGradientModel(inputs, outputs, name=self.model_name)
        model.compile(
            keras.optimizers.Adam(self.learning_rate),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            policy_optimizer=keras.optimizers.Adam(policy_learning_rate),
        )
        return model

    def fit(self, hp, model, *args, **kwargs):
        """`model.fit`, with a `ComputeAwareScore` first among the callbacks."""
        callbacks = list(kwargs.pop("callbacks", None) or [])
        scores = [c for c in callbacks if isinstance(c, ComputeAwareScore)]
        if not scores:
            scores = [ComputeAwareScore(self.reference_macs, self.macs_weight)]
        # First, so the callbacks reading the score (the tuner's, an
        # EarlyStopping on it) see it whatever order they were given in.
        callbacks = scores + [c for c in callbacks if not isinstance(c, ComputeAwareScore)]
        return model.fit(*args, callbacks=callbacks, **kwargs)
