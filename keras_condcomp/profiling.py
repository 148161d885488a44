"""Compute accounting: dense and conditional multiply-adds per example.

Example:

>>> import keras
>>> from keras_condcomp.layers import GatedDense
>>> inputs = keras.Input((100,))
>>> hidden = GatedDense(64, blocks=4)(inputs)
>>> model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
>>> profile = profile_macs(model, {model.layers[1].name: 0.25})
>>> profile.dense_macs, profile.conditional_macs
(7040, 2640.0)
"""

import dataclasses

import keras

from keras_condcomp.layers.bernoulli_policy import BernoulliPolicy

__all__ = ["LayerMacs", "ModelMacs", "profile_macs"]


@dataclasses.dataclass(frozen=True)
class LayerMacs:
    """Multiply-adds per example of one layer.

    Attributes:
        name: layer name.
        dense_macs: MACs of the same-width ungated layer.
        policy_macs: MACs of the gating policy (0 for ungated layers).
        input_density: fraction of input blocks read (from the gated layer
            feeding it, 1 otherwise).
        density: fraction of output blocks computed (1 for ungated layers).
        conditional_macs: `policy_macs + dense_macs * input_density * density`.
    """

    name: str
    dense_macs: int
    policy_macs: int
    input_density: float
    density: float

    @property
    def conditional_macs(self):
        return self.policy_macs + self.dense_macs * self.input_density * self.density


@dataclasses.dataclass(frozen=True)
class ModelMacs:
    """Per-layer and total MACs per example of a model."""

    layers: tuple

    @property
    def dense_macs(self):
        return sum(layer.dense_macs for layer in self.layers)

    @property
    def conditional_macs(self):
        return sum(layer.conditional_macs for layer in self.layers)

    @property
    def ideal_speedup(self):
        """Dense MACs over conditional MACs (policies included)."""
        return self.dense_macs / self.conditional_macs


def _inbound_layer(layer):
    nodes = getattr(layer, "_inbound_nodes", None) or []
    if len(nodes) != 1 or len(nodes[0].parent_nodes) != 1:
        return None
    return nodes[0].parent_nodes[0].operation


def profile_macs(model, densities=None):
    """MACs per example of the Dense and gated layers of a functional model.

    Args:
        model: a built functional or Sequential model.
        densities: `{gated layer name: measured density}`; a gated layer
            missing from it counts at its `target_density` (or 1).

    Returns:
        a `ModelMacs`.
    """
    densities = densities or {}
    rows = []
    output_density = {}
    for layer in model.layers:
        is_gated = isinstance(getattr(layer, "policy", None), BernoulliPolicy)
        if not (is_gated or isinstance(layer, keras.layers.Dense)):
            continue
        input_dim, units = layer.kernel.shape
        upstream = _inbound_layer(layer)
        input_density = output_density.get(id(upstream), 1.0)
        if is_gated:
            density = float(densities.get(layer.name, layer.target_density or 1.0))
            policy_macs = input_dim * layer.blocks
            output_density[id(layer)] = density
        else:
            density, policy_macs = 1.0, 0
            # A plain Dense layer reads its whole input.
            input_density = 1.0
        rows.append(
            LayerMacs(layer.name, input_dim * units, policy_macs, input_density, density)
        )
    return ModelMacs(tuple(rows))
