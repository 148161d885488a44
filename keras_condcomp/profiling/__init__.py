"""Compute accounting: parameters, dense and conditional multiply-adds per example.

`profile_macs(model, x=None)` returns a `ModelProfile` of `LayerProfile`s,
`summary(model, x=None)` prints it as a table. Rules per layer kind are in
`keras_condcomp.profiling.macs_rules`.

Examples:
    >>> import keras
    >>> from keras_condcomp.layers import GatedDense
    >>> inputs = keras.Input((100,))
    >>> hidden = GatedDense(64, blocks=4)(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    >>> profile = profile_macs(model, {model.layers[1].name: 0.25})
    >>> profile.dense_macs, profile.conditional_macs
    (7040, 2640.0)
"""

from keras_condcomp.profiling.compute_summary import summary
from keras_condcomp.profiling.layer_profile import LayerProfile
from keras_condcomp.profiling.model_profile import ModelProfile
from keras_condcomp.profiling.profiler import gated_inputs, profile_macs

__all__ = ["LayerProfile", "ModelProfile", "gated_inputs", "profile_macs", "summary"]
