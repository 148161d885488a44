"""The gating logic shared by the gated layers (private).

`GatedLayer` holds what every gated layer does the same way: the gating
arguments and their checks, the `BernoulliPolicy` sub-layer, the schedule
state callbacks change (`_GateSchedule`), the mask decision, the regularisers
and the report of each decision to `PolicyGradientModel`. A subclass adds its
weights and its computation: it builds the policy on the size of its policy
state, may override `_policy_state` (the summary of the input the policy
reads) and, in `call`, asks `_gate(inputs, training)` for the mask to apply.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_condcomp import regularizers
from keras_condcomp._arguments import (
    check_non_negative_number,
    check_density,
    is_integer,
    is_number,
)
from keras_condcomp.layers.bernoulli_policy import BernoulliPolicy
from keras_condcomp.layers.decision_recorder import current_recorder
from keras_condcomp.layers.gate_decision import GateDecision
from keras_condcomp.ops import EXECUTION_PATHS

INFERENCE_MODES = ("threshold", "sample")


class _GateSchedule:
    """Training-time state a callback may change between epochs.

    The current target density and whether the policy is on live in
    non-trainable variables read at call time, so a change reaches the
    already-traced train step. The container is a plain object so Keras does
    not track them: they are schedule state, not weights (not in
    `layer.weights`, not saved, no change to `.keras` files), and inference
    graphs (`predict`, export) never read them.
    """

    def __init__(self, target_density, policy_enabled):
        self.target_density = target_density
        self.policy_enabled = policy_enabled
        self.variables = None

    def create_variables(self):
        if self.variables is None:
            # Initializers, not values: allowed in Keras's stateless build scope.
            tau = 0.0 if self.target_density is None else float(self.target_density)
            self.variables = tuple(
                keras.Variable(
                    initializer=keras.initializers.Constant(value), shape=(),
                    dtype="float32", trainable=False, name=name,
                )
                for name, value in (
                    ("current_target_density", tau),
                    ("policy_enabled", 1.0 if self.policy_enabled else 0.0),
                )
            )

    def set(self, target_density=None, policy_enabled=None):
        if target_density is not None:
            self.target_density = float(target_density)
            if self.variables is not None:
                self.variables[0].assign(self.target_density)
        if policy_enabled is not None:
            self.policy_enabled = bool(policy_enabled)
            if self.variables is not None:
                self.variables[1].assign(1.0 if self.policy_enabled else 0.0)


def validate_gating_arguments(
    target_density, sparsity_weight, variance_weight, inference, execution,
    example_sparsity_weight=None, execution_paths=EXECUTION_PATHS,
    sparsity_deviation="absolute",
):
    """Checks the gating arguments shared by the gated layers."""
    check_density("target_density", target_density, allow_none=True)
    check_non_negative_number("sparsity_weight", sparsity_weight)
    check_non_negative_number("variance_weight", variance_weight)
    if example_sparsity_weight is not None:
        check_non_negative_number("example_sparsity_weight", example_sparsity_weight)
    if sparsity_deviation not in regularizers.DEVIATIONS:
        raise ValueError(
            f"`sparsity_deviation` must be one of {regularizers.DEVIATIONS}. "
            f"Received: sparsity_deviation={sparsity_deviation!r}"
        )
    if inference not in INFERENCE_MODES:
        raise ValueError(
            f"`inference` must be one of {INFERENCE_MODES}. "
            f"Received: inference={inference!r}"
        )
    if execution not in execution_paths:
        raise ValueError(
            f"`execution` must be one of {execution_paths}. "
            f"Received: execution={execution!r}"
        )


def elementwise_activation(activation):
    """`keras.activations.get(activation)`, refused unless it acts element-wise.

    Inference computes the active blocks apart (one activation call per
    block, or over the block layout) while training applies it over all the
    units: only an activation of each value alone gives the same outputs.
    Probed on a few values, arranged as `(2, 6)` and as `(12, 1)`:
    `"softmax"`, `"log_softmax"`, `"sparsemax"` and `"glu"` fail it.
    """
    try:
        resolved = keras.activations.get(activation)
    except ValueError as error:
        raise ValueError(
            f"`activation` is not a Keras activation. Received: activation={activation!r}"
        ) from error
    probe = np.linspace(-3.0, 3.0, 12, dtype="float32")

    def apply(shape):
        with warnings.catch_warnings():
            # Keras warns about a softmax over an axis of size 1: the probe's point.
            warnings.simplefilter("ignore")
            return ops.convert_to_numpy(resolved(ops.convert_to_tensor(probe.reshape(shape))))

    try:
        whole = apply((2, 6))
    except Exception:
        # Not computable here (e.g. a layer made while a graph is traced):
        # left unchecked, as Keras leaves it.
        return resolved
    try:
        elementwise = whole.shape == (2, 6) and np.allclose(
            whole.reshape(12, 1), apply((12, 1)), rtol=1e-5, atol=1e-6, equal_nan=True
        )
    except Exception:  # e.g. "glu" cannot split an axis of size 1
        elementwise = False
    if not elementwise:
        raise ValueError(
            "`activation` must act on each value alone (element-wise, like "
            "'relu' or 'sigmoid'): a gated layer computes its active blocks "
            "apart at inference. Apply an activation such as softmax in a "
            f"following layer instead. Received: activation={activation!r}"
        )
    return resolved


def check_unique_names(model, gated_layers):
    """A ValueError when two of `model`'s gated layers share a name (possible
    in separate nested models): logs, budgets and profiles name each one."""
    names = [layer.name for layer in gated_layers]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"Model {model.name!r} has several gated layers named "
            f"{', '.join(map(repr, repeated))} (in different nested models?): logs, "
            "budgets and profiles name each gated layer, so give each a unique `name`."
        )


def _float_or_none(value):
    return None if value is None else float(value)


def _check_blocks(blocks):
    if not is_integer(blocks) or blocks <= 0:
        raise ValueError(
            f"`blocks` must be a positive integer. Received: blocks={blocks!r}"
        )


class GatedLayer(keras.layers.Layer):
    """Base of the gated layers: policy, schedule, decisions, regularisers.

    Not public: subclasses (GatedDense, GatedConv2D) document the arguments.
    """

    # The execution paths a subclass's engine accepts.
    execution_paths = EXECUTION_PATHS

    def __init__(
        self,
        blocks,
        target_density=None,
        sparsity_weight=1.0,
        variance_weight=0.0,
        policy_initializer="glorot_uniform",
        policy_bias_initializer="zeros",
        policy_regularizer=None,
        inference="threshold",
        execution="auto",
        seed=None,
        example_sparsity_weight=None,
        sparsity_deviation="absolute",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_blocks(blocks)
        validate_gating_arguments(
            target_density, sparsity_weight, variance_weight, inference, execution,
            example_sparsity_weight, self.execution_paths, sparsity_deviation,
        )
        self.blocks = int(blocks)
        self.target_density = _float_or_none(target_density)
        self.sparsity_weight = float(sparsity_weight)
        self.variance_weight = float(variance_weight)
        self.example_sparsity_weight = _float_or_none(example_sparsity_weight)
        self.sparsity_deviation = sparsity_deviation
        self.inference = inference
        self.execution = execution
        self.seed = int(seed) if is_integer(seed) else seed
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.policy = BernoulliPolicy(
            self.blocks,
            kernel_initializer=policy_initializer,
            bias_initializer=policy_bias_initializer,
            kernel_regularizer=policy_regularizer,
            name="policy",
        )
        # Made after the base layer took `trainable`: a frozen layer's policy too.
        self.policy.trainable = self.trainable
        self.supports_masking = False
        # Data-dependent shapes (tf.where) do not compile under XLA.
        self.supports_jit = False
        self._warned_unrecorded = False
        self._schedule = _GateSchedule(self.target_density, policy_enabled=True)

    def _build_gating(self, state_dim):
        """Builds the policy on `(batch, state_dim)` and the schedule state."""
        self.policy.build((None, state_dim))
        self._schedule.create_variables()

    def _policy_state(self, inputs):
        """The `(batch, features)` summary of `inputs` the policy reads."""
        return inputs

    @property
    def current_target_density(self):
        """The target density tau used in training now (a float).

        Equals `target_density` unless a schedule
        (`keras_condcomp.callbacks.DensityScheduler`) changed it; it is not
        part of the config, which keeps the final `target_density`.
        """
        return self._schedule.target_density

    def set_current_target_density(self, value):
        """Sets the tau of the `L_b`, `L_e` terms for the next training steps.

        Takes effect inside an already-compiled `fit` (it is read from a
        non-trainable variable at call time); `target_density` and the config
        are unchanged.
        """
        if self.target_density is None:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} has target_density=None: it "
                "has no target density to schedule."
            )
        if not is_number(value) or not 0 < value <= 1:
            raise ValueError(
                f"The target density must be a number in (0, 1]. Received: value={value!r}"
            )
        self._schedule.set(target_density=value)

    @property
    def policy_enabled(self):
        """Whether the policy chooses the blocks in training (True by default)."""
        return self._schedule.policy_enabled

    def set_policy_enabled(self, enabled):
        """Switches the policy on or off for the next training steps.

        With the policy off every block runs in training and in
        `PolicyGradientModel.evaluate`, and the policy gets no REINFORCE
        gradient (its gating regulariser is 0; a `policy_regularizer` still
        applies): a dense warm-up
        (`keras_condcomp.callbacks.PolicyWarmup`). `predict` and exported
        graphs always use the policy.
        """
        if not isinstance(enabled, bool):
            raise ValueError(
                f"`enabled` must be a bool. Received: enabled={enabled!r}"
            )
        self._schedule.set(policy_enabled=enabled)

    def _decide(self, inputs, training):
        """Policy logits and the 0/1 block mask used for `inputs`."""
        # The state is given to the policy, not learned through it.
        state = self._policy_state(ops.stop_gradient(inputs))
        logits = self.policy(state, return_logits=True)
        return logits, self._mask_of(logits, training)

    def _mask_of(self, logits, training):
        """The 0/1 block mask (in the logits' dtype) drawn or thresholded from `logits`."""
        if training or self.inference == "sample":
            uniform = keras.random.uniform(
                ops.shape(logits), seed=self.seed_generator, dtype=logits.dtype
            )
            active = uniform < ops.sigmoid(logits)
        else:
            active = logits > 0
        return ops.cast(active, logits.dtype)

    def _float_inputs(self, inputs):
        """`inputs` as a tensor, cast to the compute dtype when they are not
        floating point (integer pixels, as `keras.layers.Dense` takes them);
        a sparse tensor densified."""
        inputs = ops.convert_to_tensor(inputs, sparse=False)  # sparse: densified
        if not keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.compute_dtype)
        return inputs

    def _built_for(self, inputs):
        inputs = self._float_inputs(inputs)
        if not self.built:
            self.build(inputs.shape)
        return inputs

    def block_probabilities(self, inputs):
        """The policy's `(batch, blocks)` probabilities sigma for `inputs`."""
        return self.policy(self._policy_state(self._built_for(inputs)))

    def block_mask(self, inputs, training=False):
        """The `(batch, blocks)` 0/1 mask the layer uses for `inputs`."""
        return self._decide(self._built_for(inputs), training)[1]

    def gating_regularization(self, probabilities, target_density=None, weights=None):
        """`sparsity_weight (L_b + L_e) + variance_weight L_v` of a batch.

        `target_density` defaults to the layer's `target_density` (None: no
        `L_b`, `L_e`); `weights` (`(batch,)`, None for 1) weigh the examples
        in every term.
        """
        if target_density is None:
            target_density = self.target_density
        return regularizers.gating_regularization(
            probabilities, target_density, self.sparsity_weight, self.variance_weight,
            self.example_sparsity_weight, self.sparsity_deviation, weights,
        )

    def _scheduled(self, logits, mask):
        """Applies the schedule state: logits, mask and tau used in training."""
        current, enabled = self._schedule.variables
        enabled = ops.cast(enabled, logits.dtype)
        on = enabled > 0.5
        # Policy off: every block runs and the policy gets no gradient.
        logits = ops.where(on, logits, ops.stop_gradient(logits))
        mask = ops.where(on, mask, ops.ones_like(mask))
        return logits, mask, ops.cast(current, logits.dtype), enabled

    def _gate(self, inputs, training):
        """Decides the block mask of a call and reports it.

        Inside a `DecisionRecorder` (`PolicyGradientModel`'s steps) records
        the decision and its gating regulariser; in training outside one,
        adds the regulariser as a layer loss. Returns the `(batch, blocks)`
        mask in the compute dtype.
        """
        logits, mask = self._decide(inputs, training)
        recorder = current_recorder()
        weights = None if recorder is None else recorder.example_weights
        if training or (recorder is not None and recorder.scheduled):
            # Only the training and PolicyGradientModel steps read the
            # schedule; predict, exported graphs and the measuring tools
            # (ComputeMonitor, profile_macs) never do.
            logits, mask, current, enabled = self._scheduled(logits, mask)
            # A layer without a target density has no scheduled one either.
            if self.target_density is None:
                current = None
            regularization = enabled * self.gating_regularization(
                ops.sigmoid(logits), current, weights
            )
        elif recorder is not None:
            regularization = self.gating_regularization(ops.sigmoid(logits), weights=weights)
        if training and recorder is None:
            # PolicyGradientModel adds the recorded regulariser to the
            # policy's objective instead, so that its logged `loss` stays the
            # task loss (L_v is negative).
            self.add_loss(regularization)
            if not self._warned_unrecorded:
                self._warned_unrecorded = True
                warnings.warn(
                    f"{type(self).__name__} {self.name!r} is training outside "
                    "keras_condcomp.PolicyGradientModel: its policy gets no "
                    "REINFORCE gradient and will not learn which blocks to run.",
                    stacklevel=3,
                )
        if recorder is not None:
            recorder.record(GateDecision(self, logits, mask, regularization))
        return ops.cast(mask, self.compute_dtype)

    def _gating_config(self):
        """The config entries of the gating arguments."""
        return {
            "target_density": self.target_density,
            "sparsity_weight": self.sparsity_weight,
            "variance_weight": self.variance_weight,
            "policy_initializer": keras.initializers.serialize(
                self.policy.kernel_initializer
            ),
            "policy_bias_initializer": keras.initializers.serialize(
                self.policy.bias_initializer
            ),
            "policy_regularizer": keras.regularizers.serialize(
                self.policy.kernel_regularizer
            ),
            "inference": self.inference,
            "execution": self.execution,
            "seed": self.seed,
            "example_sparsity_weight": self.example_sparsity_weight,
            "sparsity_deviation": self.sparsity_deviation,
        }
