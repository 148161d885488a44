"""Gated layers and their policies."""

from keras_condcomp.layers.bernoulli_policy import BernoulliPolicy
from keras_condcomp.layers.decision_recorder import DecisionRecorder
from keras_condcomp.layers.gate_decision import GateDecision
from keras_condcomp.layers.gated_conv2d import GatedConv2D
from keras_condcomp.layers.gated_dense import GatedDense

__all__ = [
    "BernoulliPolicy",
    "DecisionRecorder",
    "GateDecision",
    "GatedConv2D",
    "GatedDense",
]
