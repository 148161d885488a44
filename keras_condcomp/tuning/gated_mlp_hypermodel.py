"""GatedMLPHyperModel: a KerasTuner search space over gated MLPs."""

import math

import keras
import keras_tuner

from keras_condcomp.layers.gated_dense import GatedDense
from keras_condcomp.models.policy_gradient_model import PolicyGradientModel
from keras_condcomp.tuning.compute_aware_score import (
    DEFAULT_MACS_WEIGHT,
    ComputeAwareScore,
    _check_positive,
    _check_weight,
)

__all__ = ["GatedMLPHyperModel"]

LAYERS = (1, 3)
UNITS = (64, 128, 256, 512)
BLOCKS = (4, 8, 16)


class GatedMLPHyperModel(keras_tuner.HyperModel):
    """Searches gated MLPs `input -> layers x GatedDense -> Dense` logits.

    The search space (hyperparameter names, as KerasTuner's
    `hyperparameters=` and `tune_new_entries=` can fix or narrow them):

    - `layers`: 1 to 3 gated layers;
    - `units` in (64, 128, 256, 512) and `blocks` in (4, 8, 16), per layer;
    - `target_density` tau in [0.05, 0.5] (log scale);
    - `sparsity_weight` lambda_s in [0.1, 10] (log), `variance_weight`
      lambda_v in [0, 10];
    - `policy_learning_rate` in [1e-4, 1e-1] (log).

    Models are compiled with Adam (`learning_rate`) for the network, Adam
    (`policy_learning_rate`) for the policies, sparse categorical
    cross-entropy on logits and the `accuracy` metric. `fit` adds a
    `ComputeAwareScore`, so a tuner can maximise
    `keras_condcomp.tuning.compute_aware_objective()` (`val_compute_aware_score`
    = `val_accuracy - macs_weight * log2(val_conditional_macs / reference_macs)`)
    or plain `"val_accuracy"`.

    Args:
        input_shape: shape of one example (flattened if not 1-D).
        num_classes: number of classes.
        learning_rate: the network's Adam learning rate.
        reference_macs: MACs per example that the score compares against;
            default: the dense MACs of the widest network of the space
            (3 layers of 512 units).
        macs_weight: accuracy a halving of compute is worth in the score.
        seed: seed of the gated layers' mask sampling (None: random).
        name, tunable: as `keras_tuner.HyperModel`.

    Example:

    >>> import keras_tuner
    >>> hypermodel = GatedMLPHyperModel((64,), 10)
    >>> hp = keras_tuner.HyperParameters()
    >>> hp.Fixed("layers", 2)
    2
    >>> model = hypermodel.build(hp)
    >>> print(*(layer.name for layer in model.layers[1:]))
    gated_1 gated_2 logits
    """

    def __init__(
        self, input_shape, num_classes, learning_rate=1e-3, reference_macs=None,
        macs_weight=DEFAULT_MACS_WEIGHT, seed=None, name=None, tunable=True,
    ):
        super().__init__(name=name, tunable=tunable)
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        if not (
            isinstance(input_shape, (tuple, list)) and input_shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
        ):
            raise ValueError(
                "`input_shape` must be a tuple of positive integers. "
                f"Received: input_shape={input_shape!r}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes!r}"
            )
        _check_positive("learning_rate", learning_rate)
        _check_weight(macs_weight)
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.learning_rate = learning_rate
        if reference_macs is None:
            width, depth = max(UNITS), max(LAYERS)
            features = math.prod(self.input_shape)
            reference_macs = width * (features + (depth - 1) * width + num_classes)
        _check_positive("reference_macs", reference_macs)
        self.reference_macs = reference_macs
        self.macs_weight = macs_weight
        self.seed = seed

    def build(self, hp):
        layers = hp.Int("layers", *LAYERS)
        units = hp.Choice("units", list(UNITS))
        blocks = hp.Choice("blocks", list(BLOCKS))
        if units % blocks:
            raise ValueError(
                f"`blocks` must divide `units`. Received: units={units}, blocks={blocks}"
            )
        gate_kwargs = dict(
            target_density=hp.Float("target_density", 0.05, 0.5, sampling="log"),
            sparsity_weight=hp.Float("sparsity_weight", 0.1, 10.0, sampling="log"),
            variance_weight=hp.Float("variance_weight", 0.0, 10.0),
        )
        policy_learning_rate = hp.Float("policy_learning_rate", 1e-4, 1e-1, sampling="log")
        inputs = keras.Input(self.input_shape, name="inputs")
        hidden = keras.layers.Flatten()(inputs) if len(self.input_shape) > 1 else inputs
        for index in range(layers):
            hidden = GatedDense(
                units, blocks, activation="relu", name=f"gated_{index + 1}",
                seed=None if self.seed is None else self.seed + index, **gate_kwargs,
            )(hidden)
        outputs = keras.layers.Dense(self.num_classes, name="logits")(hidden)
        model = PolicyGradientModel(inputs, outputs, name="gated_mlp")
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
        if not any(isinstance(callback, ComputeAwareScore) for callback in callbacks):
            # First, so the tuner's own callbacks (which read the objective) see it.
            callbacks.insert(0, ComputeAwareScore(self.reference_macs, self.macs_weight))
        return model.fit(*args, callbacks=callbacks, **kwargs)
