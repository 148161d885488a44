"""LayerProfile: parameters and multiply-adds per example of one layer."""

import dataclasses

__all__ = ["LayerProfile"]


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """Parameters and multiply-adds (MACs) per example of one layer.

    Made by `keras_condcomp.profiling.profile_macs`; the fields are stored
    as given, unchecked.

    Args:
        name: layer name.
        kind: layer class name (`"GatedDense"`, `"Dense"`, `"Conv2D"`, ...).
        parameters: the layer's weight count (a gated layer's policy included).
        dense_macs: MACs per example of the same layer with every block open
            (0 for layers without products: pooling, activations, reshapes).
        blocks: number of gated blocks, None for an ungated layer.
        policy_macs: MACs per example of the gating policy (0 if ungated).
        input_density: mean fraction of the input's blocks that are active
            (from the gated layer feeding this one; 1 otherwise).
        density: mean fraction of the layer's blocks that run (1 if ungated).
        computed_fraction: fraction of the dense product really computed: the
            mean over examples of `input density * density` (Bengio et al.'s
            `((H * M_in) W) * M_out` skips rows and columns of `W`).
        counted: False when no rule knows this layer's MACs (it has weights
            but is of a kind the profiler does not model); its MACs read 0.

    Examples:
        >>> row = LayerProfile("gated", "GatedDense", parameters=6660, dense_macs=6400,
        ...                    blocks=4, policy_macs=400, input_density=0.5,
        ...                    density=0.25, computed_fraction=0.125)
        >>> row.conditional_macs
        1200.0
    """

    name: str
    kind: str
    parameters: int
    dense_macs: int
    blocks: int | None = None
    policy_macs: int = 0
    input_density: float = 1.0
    density: float = 1.0
    computed_fraction: float = 1.0
    counted: bool = True

    @property
    def is_gated(self):
        """Whether the layer's blocks are switched by a policy."""
        return self.blocks is not None

    @property
    def conditional_macs(self):
        """`policy_macs + dense_macs * computed_fraction`, per example."""
        return self.policy_macs + self.dense_macs * self.computed_fraction
