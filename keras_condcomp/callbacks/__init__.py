"""Callbacks for gated models: density curricula, policy warm-up, compute monitoring.

Use them with `keras_condcomp.PolicyGradientModel.fit` like any Keras
callback; each holds no model until `fit` sets it, so KerasTuner can copy them.
"""

from keras_condcomp.callbacks.compute_monitor import ComputeMonitor
from keras_condcomp.callbacks.density_scheduler import DensityScheduler
from keras_condcomp.callbacks.policy_warmup import PolicyWarmup

__all__ = ["ComputeMonitor", "DensityScheduler", "PolicyWarmup"]
