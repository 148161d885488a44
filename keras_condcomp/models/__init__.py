"""Models that train gated layers, and builders of the paper's networks."""

from keras_condcomp.models.cnn import build_dense_cnn, build_gated_cnn, default_policy_grid
from keras_condcomp.models.compact_chain import compact_inference
from keras_condcomp.models.execution_tuning import tune_execution
from keras_condcomp.models.mlp import build_dense_mlp, build_gated_mlp, equal_macs_width
from keras_condcomp.models.policy_gradient_model import (
    PolicyGradientModel,
    gated_layer_inputs,
    gated_layers,
)

__all__ = [
    "PolicyGradientModel",
    "build_dense_cnn",
    "compact_inference",
    "build_dense_mlp",
    "build_gated_cnn",
    "build_gated_mlp",
    "default_policy_grid",
    "equal_macs_width",
    "gated_layer_inputs",
    "gated_layers",
    "tune_execution",
]
