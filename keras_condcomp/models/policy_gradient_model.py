"""PolicyGradientModel: trains gated layers' policies with REINFORCE in `fit`."""

import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_condcomp._arguments import check_positive_int, is_number
from keras_condcomp.layers._gated_layer import check_unique_names
from keras_condcomp.layers.bernoulli_policy import BernoulliPolicy
from keras_condcomp.layers.decision_recorder import DecisionRecorder
from keras_condcomp.profiling import gated_inputs, profile_macs
from keras_condcomp.profiling.profiler import layer_calls

__all__ = ["PolicyGradientModel", "gated_layer_inputs", "gated_layers"]

BASELINES = ("moving_average", None)


def gated_layers(model):
    """The gated layers of `model` (nested models included), in order.

    Raises a ValueError when two of them share a name (possible in separate
    nested models): logs, budgets and profiles name each gated layer; and
    for a gated layer inside a wrapper (`TimeDistributed`, ...), which would
    decide per time step where the model's costs are per example.
    """
    found = []

    def visit(layer):
        if isinstance(getattr(layer, "policy", None), BernoulliPolicy):
            if not any(layer is seen for seen in found):
                found.append(layer)
        if isinstance(layer, keras.layers.Wrapper) and isinstance(
            getattr(layer.layer, "policy", None), BernoulliPolicy
        ):
            raise ValueError(
                f"{type(layer.layer).__name__} {layer.layer.name!r} is wrapped in "
                f"{type(layer).__name__} {layer.name!r}, which keras_condcomp does not "
                "support: a gated layer decides per example of a (batch, features) input."
            )
        for child in getattr(layer, "layers", None) or ():
            visit(child)

    for layer in model.layers:
        visit(layer)
    check_unique_names(model, found)
    return found


def check_called_once(model, layers, what):
    """Refuses gated `layers` that a forward pass of `model` calls more than once."""
    calls = layer_calls(model)
    shared = {layer.name: calls[id(layer)] for layer in layers if calls.get(id(layer), 1) > 1}
    if shared:
        raise ValueError(
            f"{what} does not support a gated layer called more than once in a forward "
            f"pass (shared weights). Received: {model.name!r} calling "
            + ", ".join(f"{name!r} {count} times" for name, count in shared.items())
        )


def gated_layer_inputs(model, x, batch_size=256):
    """The inputs each gated layer of `model` sees when the model runs on `x`.

    Args:
        model: a built functional or Sequential model with gated layers.
        x: model inputs (an array, or a list of arrays for several inputs).
        batch_size: examples per forward pass.

    Returns:
        list of arrays, one per layer of `keras_condcomp.models.gated_layers(model)`.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((8,))
        >>> hidden = GatedDense(16, blocks=4, activation="relu")(inputs)
        >>> model = keras.Model(inputs, GatedDense(12, blocks=3)(hidden))
        >>> tuple(a.shape for a in gated_layer_inputs(model, np.random.rand(5, 8)))
        ((5, 8), (5, 16))
    """
    batch_size = check_positive_int("batch_size", batch_size)
    layers = gated_layers(model)
    if not layers:
        return []
    # A probe reads `layer.input`, the input of a layer's first call only.
    check_called_once(model, layers, "gated_layer_inputs")
    try:
        probe = keras.Model(model.inputs, [layer.input for layer in layers])
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Cannot read the inputs of the gated layers of {model.name!r} (gated "
            "layers inside nested models?)."
        ) from error
    seen = probe.predict(x, batch_size=batch_size, verbose=0)
    return [np.asarray(a) for a in (seen if len(layers) > 1 else [seen])]


def _unreduced_loss(loss):
    """A callable `(y_true, y_pred, sample_weight) -> (batch,)` per-example loss."""
    if loss is None:
        raise ValueError(
            "PolicyGradientModel needs a `loss` in compile(): REINFORCE uses the "
            "per-example task loss as the policy's cost. Received: loss=None"
        )
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "PolicyGradientModel supports a single loss (one output). "
            f"Received: loss={loss!r}"
        )
    if isinstance(loss, str) or not isinstance(loss, keras.losses.Loss):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        # A shallow copy that does not reduce. Rebuilding it from its config
        # (as `copy.copy` of a Keras object does) would lose what a custom
        # loss keeps outside `get_config`.
        unreduced = object.__new__(type(loss))
        unreduced.__dict__.update(loss.__dict__)
        unreduced.reduction = None
        loss = unreduced

        def per_example(y_true, y_pred, sample_weight):
            return loss(y_true, y_pred, sample_weight=sample_weight)

    else:

        def per_example(y_true, y_pred, sample_weight):
            values = loss(y_true, y_pred)
            if sample_weight is not None:
                sample_weight = ops.cast(sample_weight, values.dtype)
                while len(sample_weight.shape) > len(values.shape):
                    sample_weight = ops.squeeze(sample_weight, -1)
                values = values * sample_weight
            return values

    def reduced_to_batch(y_true, y_pred, sample_weight):
        values = ops.cast(per_example(y_true, y_pred, sample_weight), "float32")
        if len(values.shape) > 1:
            values = ops.mean(values, axis=tuple(range(1, len(values.shape))))
        return values

    return reduced_to_batch


def _example_weights(sample_weight):
    """`(batch,)` float32 weights of the examples (the mean over an
    example's other axes), or None without `sample_weight`."""
    if sample_weight is None:
        return None
    weights = ops.cast(sample_weight, "float32")
    if len(weights.shape) > 1:
        weights = ops.mean(weights, axis=tuple(range(1, len(weights.shape))))
    return weights


def _log_probability(logits, mask):
    """`log pi(u | s)` summed over blocks: `sum_j u_j z_j - softplus(z_j)`."""
    return ops.sum(mask * logits - ops.softplus(logits), axis=-1)


def _is_functional_call(args, kwargs):
    # The signature keras.Model uses to tell functional from subclassed use.
    return (
        len(args) == 2
        or (len(args) == 1 and "outputs" in kwargs)
        or ("inputs" in kwargs and "outputs" in kwargs)
    )


def _rebase_on_functional(cls):
    """`cls` (or an ancestor) deriving from `FunctionalPolicyGradientModel`
    where it derived from `PolicyGradientModel`.

    keras.Model, called as a functional model, makes the class of the model
    functional by rewriting the bases of the class and of every ancestor up
    to `keras.Model`. A subclass of `PolicyGradientModel` used so would
    rewrite `PolicyGradientModel` itself, and every subclassed model of it
    created afterwards would fail. Its functional twin takes the rewrite
    instead.
    """
    if cls is PolicyGradientModel:
        return FunctionalPolicyGradientModel
    if PolicyGradientModel in cls.__mro__:
        cls.__bases__ = tuple(_rebase_on_functional(base) for base in cls.__bases__)
    return cls


class _GateMetrics:
    """The metrics a PolicyGradientModel logs besides the compiled ones.

    Held in a plain object, which Keras does not track: a model built before
    `compile` (a subclassed one called on a batch first) accepts no new
    tracked state. The model's `metrics` lists them.
    """

    def __init__(self, gated_names):
        self.policy_loss = keras.metrics.Mean(name="policy_loss")
        self.density = keras.metrics.Mean(name="density")
        self.conditional_macs = keras.metrics.Mean(name="conditional_macs")
        self.per_layer = {name: keras.metrics.Mean(name=f"{name}_density") for name in gated_names}
        self.all = [self.policy_loss, self.density, self.conditional_macs, *self.per_layer.values()]


class _PolicyGradientTraining:
    """The REINFORCE training logic shared by both kinds of PolicyGradientModel."""


    def __init__(self, *args, baseline="moving_average", baseline_momentum=0.9, **kwargs):
        if _is_functional_call(args, kwargs):
            _rebase_on_functional(type(self))
        super().__init__(*args, **kwargs)
        if baseline not in BASELINES:
            raise ValueError(
                f"`baseline` must be one of {BASELINES}. Received: baseline={baseline!r}"
            )
        if not is_number(baseline_momentum) or not 0 <= baseline_momentum < 1:
            raise ValueError(
                "`baseline_momentum` must be a number in [0, 1). "
                f"Received: baseline_momentum={baseline_momentum!r}"
            )
        self.baseline = baseline
        self.baseline_momentum = float(baseline_momentum)
        self.policy_optimizer = None
        self._per_example_loss = None
        self._gate_metrics = None
        # Created even without a baseline, so every model saves the same state.
        # "mean" aggregation: each replica assigns its own batch's value.
        self._baseline_average = self.add_weight(
            shape=(), initializer="zeros", trainable=False, autocast=False,
            aggregation="mean", name="baseline_average",
        )
        self._baseline_steps = self.add_weight(
            shape=(), initializer="zeros", trainable=False, autocast=False,
            aggregation="mean", name="baseline_steps",
        )

    def compile(self, *args, policy_optimizer=None, **kwargs):
        """As `keras.Model.compile`, plus `policy_optimizer`.

        Args:
            policy_optimizer: optimizer (instance, name or config) for the
                policies' weights, with its own learning rate as in the paper;
                None updates them with `optimizer`. A `PolicyWarmup` takes
                the warm-up's steps (on zero gradients) back out of its step
                count when it switches the policies on, so its learning-rate
                schedule and Adam's bias correction start with them.
        """
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "PolicyGradientModel trains and evaluates on the TensorFlow backend only "
                "(its steps use tf.GradientTape and tf.distribute). Received: "
                f"keras.backend.backend()={keras.backend.backend()!r}; set "
                "KERAS_BACKEND=tensorflow. (Its predict runs on other backends too, "
                "checked on JAX, the gated layers computing densely, then masking.)"
            )
        if len(getattr(self, "outputs", None) or ()) > 1:
            raise ValueError(
                "PolicyGradientModel supports models with a single output. Received: "
                f"{self.name!r} with {len(self.outputs)} outputs"
            )
        super().compile(*args, **kwargs)
        self.policy_optimizer = (
            None if policy_optimizer is None else keras.optimizers.get(policy_optimizer)
        )
        self._per_example_loss = _unreduced_loss(self.loss)
        layers = gated_layers(self)
        if not layers:
            raise ValueError(
                "PolicyGradientModel found no gated layer (GatedDense, ...) in "
                f"model {self.name!r}: there is no policy to train."
            )
        if self.built:
            self._build_optimizers()
        if self.built:
            gated = {layer.name for layer in layers}
            try:
                rows = profile_macs(self).layers
            except ValueError:  # e.g. a custom gated layer without a MACs rule
                rows = ()
            unknown = [row.name for row in rows if row.name in gated and not row.counted]
            if unknown:
                warnings.warn(
                    f"The logged conditional_macs leave out the gated layers {unknown}: "
                    "their MACs per example are not known (an input whose rows and "
                    "columns are not fixed, as keras.Input((None, None, 3)) gives).",
                    stacklevel=2,
                )
        names = [layer.name for layer in layers]
        if self._gate_metrics is None or list(self._gate_metrics.per_layer) != names:
            self._gate_metrics = _GateMetrics(names)

    @property
    def metrics(self):
        gate_metrics = [] if self._gate_metrics is None else self._gate_metrics.all
        return super().metrics + gate_metrics

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and self.policy_optimizer is not None:
            config["policy_optimizer"] = keras.optimizers.serialize(self.policy_optimizer)
        return config

    def compile_from_config(self, config):
        # `compile` builds the optimizers (Keras's would build `optimizer`
        # again on every variable, duplicating a LossScaleOptimizer's).
        self.compile(**keras.saving.deserialize_keras_object(config))

    def _build_optimizers(self):
        """Builds the optimizers that are not built yet.

        `optimizer` on every trainable variable, as Keras builds it wherever
        it does (`BackupAndRestore`, a distribution strategy's first step,
        loading): built on the network's alone, its saved state would not
        load there. `policy_optimizer` on the policies'. Built here, inside
        the strategy scope compile runs in: slot variables (Adam's moments)
        created lazily in a replica's step break tf.distribute.
        """
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        if self.policy_optimizer is not None and not self.policy_optimizer.built:
            self.policy_optimizer.build(self._split_trainable_variables()[1])

    def _split_trainable_variables(self):
        policy_ids = {
            id(v)
            for layer in gated_layers(self)
            for v in layer.policy.trainable_variables
        }
        network, policy = [], []
        for variable in self.trainable_variables:
            (policy if id(variable) in policy_ids else network).append(variable)
        return network, policy

    def _require_compiled(self):
        if self._per_example_loss is None:
            raise RuntimeError(
                "PolicyGradientModel must be compiled with compile() before training."
            )

    def _policy_objective(self, decisions, costs, weights=None, update_baseline=True):
        """The REINFORCE surrogate `mean_i w_i (c_i - b) log pi(u_i | s_i)`.

        `costs` are the per-example losses already times their weights `w_i`
        (`(batch,)`, None for 1), so an example of weight 0 has no
        advantage: it does not move the policy. The baseline is the
        moving average of the batches' weighted mean cost `sum c / sum w`; a
        batch of weight 0 leaves it as it is, and so does an evaluation step
        (`update_baseline=False`).
        """
        log_probability = ops.sum(
            ops.stack(
                [_log_probability(d.logits, ops.cast(d.mask, d.logits.dtype)) for d in decisions]
            ),
            axis=0,
        )
        advantages = costs
        if self.baseline == "moving_average":
            if weights is None:
                weights = ops.ones_like(costs)
            average, steps = self._baseline_average, self._baseline_steps
            momentum = self.baseline_momentum
            total = ops.sum(weights)
            weighted = total > 0
            batch_cost = ops.where(weighted, ops.sum(costs) / ops.maximum(total, 1e-12), 0.0)
            baseline = ops.where(steps > 0, average / (1.0 - momentum**steps), batch_cost)
            advantages = costs - weights * ops.stop_gradient(baseline)
            if update_baseline:
                average.assign(
                    ops.where(weighted, momentum * average + (1.0 - momentum) * batch_cost, average)
                )
                steps.assign(ops.where(weighted, steps + 1.0, steps))
        return ops.mean(ops.stop_gradient(advantages) * log_probability)

    def _update_gate_metrics(self, decisions, policy_loss, batch):
        # Weighed by examples (each example's density, of its layer's calls;
        # the policy loss by its batch's size, as Keras weighs `loss`), so
        # that the logged means do not depend on how the examples were batched.
        self._gate_metrics.policy_loss.update_state(policy_loss, sample_weight=batch)
        per_layer = {}
        for decision in decisions:
            per_layer.setdefault(decision.layer.name, []).append(
                ops.mean(ops.cast(decision.mask, "float32"), axis=-1)
            )
        densities = []
        for name, values in per_layer.items():
            density = ops.mean(ops.stack(values), axis=0)
            if name in self._gate_metrics.per_layer:
                self._gate_metrics.per_layer[name].update_state(density)
            densities.append(density)
        if densities:
            self._gate_metrics.density.update_state(ops.mean(ops.stack(densities), axis=0))
            self._gate_metrics.conditional_macs.update_state(
                self._conditional_macs_per_example(decisions)
            )

    def _conditional_macs_per_example(self, decisions):
        """`(batch,)` MACs each example used, as `profiling.profile_macs` counts."""
        profile = profile_macs(self)
        sources = gated_inputs(self)
        per_example = {}
        for decision in decisions:
            density = ops.mean(ops.cast(decision.mask, "float32"), axis=-1)
            per_example.setdefault(decision.layer.name, []).append(density)
        per_example = {
            name: ops.mean(ops.stack(values), axis=0) for name, values in per_example.items()
        }
        macs = float(sum(row.dense_macs for row in profile.layers if not row.is_gated))
        for row in profile.layers:
            if row.name not in per_example:
                continue
            computed = per_example[row.name]
            if sources.get(row.name) in per_example:
                computed = computed * per_example[sources[row.name]]
            macs = macs + row.policy_macs + row.dense_macs * computed
        return macs

    def _loss_metric(self):
        return next(m for m in self.metrics if m.name == "loss")

    def _forward(self, x, y, sample_weight, training):
        """Forward pass with the task loss and the policy objective."""
        weights = _example_weights(sample_weight)
        with DecisionRecorder(scheduled=True, example_weights=weights) as recorder:
            y_pred = self(x, training=training)
        if not isinstance(y_pred, tf.Tensor):
            raise ValueError(
                "PolicyGradientModel supports models with a single output. "
                f"Received outputs: {y_pred!r}"
            )
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Drop decisions recorded while Keras built the model in a scratch graph.
        graph = getattr(y_pred, "graph", None)
        decisions = [
            d for d in recorder.decisions if getattr(d.logits, "graph", None) is graph
        ]
        if decisions:
            costs = ops.stop_gradient(self._per_example_loss(y, y_pred, sample_weight))
            surrogate = self._policy_objective(
                decisions, costs, weights, update_baseline=training
            )
            regularization = ops.sum(
                ops.stack([ops.cast(d.regularization, "float32") for d in decisions])
            )
            policy_loss = surrogate + regularization
        else:
            policy_loss = ops.zeros(())
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        self._loss_metric().update_state(loss * replicas, sample_weight=batch)
        self._update_gate_metrics(decisions, policy_loss, batch)
        # Divided like compute_loss's losses, so replicas sum to the global mean.
        return y_pred, loss, policy_loss / replicas

    def fit(self, *args, **kwargs):
        """As `keras.Model.fit`.

        Keras skips `on_train_end` when `fit` stops on an exception (Ctrl-C
        included): the schedule state that callbacks change (`PolicyWarmup`,
        `DensityScheduler`) is then given back as it was before `fit`.
        """
        if self.built and self.compiled:
            # A model built after compile: optimizers built now, before
            # `BackupAndRestore` (at train begin) loads their saved state.
            with self.distribute_strategy.scope():
                self._build_optimizers()
        schedules = [layer._schedule for layer in gated_layers(self)]
        before = [(s.target_density, s.policy_enabled) for s in schedules]
        try:
            return super().fit(*args, **kwargs)
        except BaseException:
            for schedule, (target_density, policy_enabled) in zip(schedules, before):
                schedule.set(target_density=target_density, policy_enabled=policy_enabled)
            raise

    def train_step(self, data):
        self._require_compiled()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        separate = self.policy_optimizer is not None
        with tf.GradientTape(persistent=separate) as tape:
            y_pred, loss, policy_objective = self._forward(x, y, sample_weight, True)
            # The policy objective (surrogate and gating regularisers) depends
            # on the policies only (their input is a stopped gradient) and the
            # task loss on the network only.
            if separate:
                network_loss = self.optimizer.scale_loss(loss)
                policy_loss = self.policy_optimizer.scale_loss(loss + policy_objective)
            else:
                total_loss = self.optimizer.scale_loss(loss + policy_objective)
        # A model first built by the forward pass above (subclassed) gets its
        # optimizers here.
        self._build_optimizers()
        if separate:
            network, policy = self._split_trainable_variables()
            self.optimizer.apply(tape.gradient(network_loss, network), network)
            self.policy_optimizer.apply(tape.gradient(policy_loss, policy), policy)
            del tape
        else:
            variables = self.trainable_variables
            self.optimizer.apply(tape.gradient(total_loss, variables), variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        self._require_compiled()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, _, _ = self._forward(x, y, sample_weight, False)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "baseline": self.baseline,
            "baseline_momentum": self.baseline_momentum,
        }


class _PolicyGradientModelType(type):
    def __instancecheck__(cls, instance):
        if cls is PolicyGradientModel:
            return isinstance(instance, _PolicyGradientTraining)
        return super().__instancecheck__(instance)

    def __subclasscheck__(cls, subclass):
        if cls is PolicyGradientModel:
            return issubclass(subclass, _PolicyGradientTraining)
        return super().__subclasscheck__(subclass)


class PolicyGradientModel(
    _PolicyGradientTraining, keras.Model, metaclass=_PolicyGradientModelType
):
    """A `keras.Model` whose `train_step` trains gated layers with REINFORCE.

    Network weights get the gradient of the task loss (plus Keras losses and
    regularisers) through the sampled masks. Each gated layer's policy gets the
    REINFORCE gradient of Bengio et al. (arXiv 1511.06297),

    `E[w_i (c_i - b) grad log pi(u_i | s_i)]`,

    with `c_i` the per-example task loss, `w_i` its `sample_weight` (1
    without; an example of weight 0 does not move the policies through this
    term) and `b` a baseline, plus the gradients of the layers' regularisers
    `L_b, L_e, L_v`, whose means and variances over the batch's examples are
    weighted by the same `w_i` (`sum_i w_i x_i / sum_i w_i`).
    Use it like `keras.Model`: functional (`PolicyGradientModel(inputs,
    outputs)`) or subclassed.

    Besides `loss` (the task loss plus the Keras losses of every weight,
    such as L2 penalties, the policies' `policy_regularizer` included; the
    gating regularisers, `L_v` negative, are not in it) and the compiled metrics,
    `fit` and `evaluate` log `policy_loss` (the policy's surrogate objective
    plus its regularisers),
    `density` (mean fraction of active blocks over the gated layers),
    `<layer name>_density` for each gated layer and `conditional_macs`, the
    mean multiply-adds per example really computed, counted as
    `keras_condcomp.profiling.profile_macs` counts them (policies included,
    input and output block sparsity of gated layers).

    Args:
        baseline: `"moving_average"` (default: an exponential moving average of
            the batch's mean cost, bias-corrected) or None (no baseline, as in
            the paper).
        baseline_momentum: momentum of the moving average, in [0, 1).
        *args: as `keras.Model` (a functional model's inputs and outputs).
        **kwargs: as `keras.Model`.

    Only training steps move the baseline; `evaluate` and validation read
    it. `.keras` files keep `baseline` and `baseline_momentum`;
    `keras.models.clone_model` does not (Keras rebuilds a functional model
    from its inputs and outputs alone): set them on the clone
    (`clone.baseline`, `clone.baseline_momentum`) if they differ from the
    defaults.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp import PolicyGradientModel
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((8,))
        >>> hidden = GatedDense(32, blocks=4, activation="relu", target_density=0.25, name="gate")(inputs)
        >>> model = PolicyGradientModel(inputs, keras.layers.Dense(3)(hidden))
        >>> model.compile(
        ...     "adam",
        ...     keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...     policy_optimizer=keras.optimizers.Adam(1e-3),
        ... )
        >>> x, y = np.random.rand(16, 8).astype("float32"), np.arange(16) % 3
        >>> sorted(k for k in model.fit(x, y, verbose=0).history if "density" in k)
        ['density', 'gate_density']
    """

    # keras.Model supports functional use of a subclass by rewriting the
    # subclass's bases to include Functional, for good: subclassing the same
    # class afterwards would then break. Functional calls therefore build a
    # separate class, and isinstance() treats both as PolicyGradientModel.
    def __new__(cls, *args, **kwargs):
        if cls is PolicyGradientModel and _is_functional_call(args, kwargs):
            return FunctionalPolicyGradientModel(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(
    package="keras_condcomp", name="PolicyGradientModel"
)
class FunctionalPolicyGradientModel(_PolicyGradientTraining, keras.Model):
    """A functional PolicyGradientModel (made by `PolicyGradientModel(inputs, outputs)`)."""
