"""What the gated hypermodels share: arguments, the gating search space, compile, fit."""

import keras
import keras_tuner

from keras_condcomp._arguments import is_integer
from keras_condcomp.models._builders import check_num_classes
from keras_condcomp.models.policy_gradient_model import PolicyGradientModel
from keras_condcomp.tuning.compute_aware_score import (
    DEFAULT_MACS_WEIGHT,
    ComputeAwareScore,
    _check_min_accuracy,
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

    Args:
        input_shape: shape of one example, a tuple (or list) of positive
            ints (a single int for 1-D examples), of length `input_rank`
            when the subclass sets one.
        num_classes: int >= 2, the number of classes.
        learning_rate: positive, the network's Adam learning rate
            (default 1e-3).
        reference_macs: positive MACs per example that the score compares
            against, or None (default) for `widest_dense_macs()`.
        macs_weight: non-negative accuracy a halving of compute is worth in
            the score (default 0.02).
        seed: None (default: random) or a non-negative int; gated layer `i`
            (0-based) samples its masks with seed `seed + i`.
        name: as `keras_tuner.HyperModel`.
        tunable: as `keras_tuner.HyperModel`.
        min_accuracy: the accuracy below which a trial's compute earns
            nothing in the score, in [0, 1] (default 0: no floor; see
            `compute_aware_score`).

    Raises:
        ValueError: an argument out of its range above.

    Examples:
        >>> from keras_condcomp.tuning import GatedMLPHyperModel
        >>> hypermodel = GatedMLPHyperModel(64, 10, seed=7)
        >>> hypermodel.input_shape, hypermodel.reference_macs, hypermodel.layer_seed(1)
        ((64,), 562176.0, 8)
    """

    model_name = "gated"
    input_rank = None  # None: any rank; else the rank an example must have

    def __init__(
        self, input_shape, num_classes, learning_rate=1e-3, reference_macs=None,
        macs_weight=DEFAULT_MACS_WEIGHT, seed=None, name=None, tunable=True, min_accuracy=0.0,
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
        num_classes = check_num_classes(num_classes)
        _check_positive("learning_rate", learning_rate)
        _check_weight(macs_weight)
        _check_min_accuracy(min_accuracy)
        if seed is not None and (not is_integer(seed) or seed < 0):
            raise ValueError(f"`seed` must be None or a non-negative int. Received: seed={seed!r}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.learning_rate = float(learning_rate)
        if reference_macs is None:
            reference_macs = self.widest_dense_macs()
        _check_positive("reference_macs", reference_macs)
        self.reference_macs = float(reference_macs)
        self.macs_weight = float(macs_weight)
        self.min_accuracy = float(min_accuracy)
        self.seed = None if seed is None else int(seed)

    def architecture(self, hp):
        """Registers the architecture's hyperparameters in `hp`; returns their values.

        Called first by `build`, so that these names come first in a search.
        Subclasses implement it.

        Args:
            hp: a `keras_tuner.HyperParameters`.

        Returns:
            The architecture, in whatever form `hidden` takes it.
        """
        raise NotImplementedError

    def hidden(self, inputs, architecture, gate_kwargs):
        """Builds the hidden layers on `inputs`; returns the tensor the logits read.

        Subclasses implement it.

        Args:
            inputs: the model's `keras.Input` of shape `input_shape`.
            architecture: what `architecture(hp)` returned.
            gate_kwargs: the gating arguments (`target_density`,
                `sparsity_weight`, `variance_weight`) for every gated layer.

        Returns:
            A symbolic tensor, the input of the `Dense` logits layer.
        """
        raise NotImplementedError

    def widest_dense_macs(self):
        """Dense MACs per example of the widest network of the space.

        The default `reference_macs`. Subclasses implement it; it is called
        in `__init__`, once `input_shape` and `num_classes` are set.

        Returns:
            int, MACs per example with every block open.
        """
        raise NotImplementedError

    def layer_seed(self, index):
        """The mask-sampling seed of gated layer `index`: `seed + index`, or None.

        Args:
            index: 0-based position of the gated layer.

        Returns:
            int, or None when the hypermodel has no `seed`.
        """
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
        """`model.fit`, with a `ComputeAwareScore` first among the callbacks.

        A `ComputeAwareScore` among `callbacks` is used (moved first);
        otherwise one with this hypermodel's `reference_macs`, `macs_weight`
        and `min_accuracy` is added. KerasTuner calls it for each trial.

        Args:
            hp: the trial's `keras_tuner.HyperParameters` (unused).
            model: the model `build(hp)` returned.
            *args: passed to `model.fit`.
            **kwargs: passed to `model.fit`, `callbacks` included.

        Returns:
            The `History` of `model.fit`.
        """
        callbacks = list(kwargs.pop("callbacks", None) or [])
        scores = [c for c in callbacks if isinstance(c, ComputeAwareScore)]
        if not scores:
            scores = [ComputeAwareScore(
                self.reference_macs, self.macs_weight, min_accuracy=self.min_accuracy
            )]
        # First, so the callbacks reading the score (the tuner's, an
        # EarlyStopping on it) see it whatever order they were given in.
        callbacks = scores + [c for c in callbacks if not isinstance(c, ComputeAwareScore)]
        return model.fit(*args, callbacks=callbacks, **kwargs)
