"""ModelProfile: the per-layer and total compute of a model."""

import dataclasses

__all__ = ["ModelProfile"]

DENSITY_SOURCES = ("targets", "given", "measured")


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """Per-layer and total multiply-adds (MACs) per example of a model.

    Made by `keras_condcomp.profiling.profile_macs`, printed by
    `keras_condcomp.summary`.

    Args:
        name: model name.
        layers: tuple of `LayerProfile`, in the model's layer order.
        density_source: where the gated layers' densities come from:
            `"measured"` (on examples), `"given"` (by the caller) or
            `"targets"` (each layer's `target_density`, 1 without one).
        examples: number of examples measured on, None unless measured.

    Raises:
        ValueError: an unknown `density_source`.

    Examples:
        >>> from keras_condcomp.profiling import LayerProfile
        >>> profile = ModelProfile("mlp", (
        ...     LayerProfile("gated", "GatedDense", 6660, 6400, blocks=4, policy_macs=400,
        ...                  density=0.25, computed_fraction=0.25),
        ...     LayerProfile("logits", "Dense", 650, 640),
        ... ))
        >>> profile.dense_macs, profile.conditional_macs, profile.ideal_speedup
        (7040, 2640.0, 2.6666666666666665)
    """

    name: str
    layers: tuple
    density_source: str = "targets"
    examples: int | None = None

    def __post_init__(self):
        if self.density_source not in DENSITY_SOURCES:
            raise ValueError(
                f"`density_source` must be one of {DENSITY_SOURCES}. "
                f"Received: density_source={self.density_source!r}"
            )

    def layer(self, name):
        """The `LayerProfile` of the layer called `name`.

        Args:
            name: a layer name.

        Returns:
            The first `LayerProfile` of that name.

        Raises:
            ValueError: no layer of that name in the profile.

        Examples:
            >>> from keras_condcomp.profiling import LayerProfile
            >>> profile = ModelProfile("mlp", (LayerProfile("logits", "Dense", 650, 640),))
            >>> profile.layer("logits").dense_macs
            640
        """
        for row in self.layers:
            if row.name == name:
                return row
        raise ValueError(
            f"No layer called {name!r} in the profile of {self.name!r}. "
            f"Layers: {[row.name for row in self.layers]}"
        )

    @property
    def parameters(self):
        """Total weight count of the profiled layers."""
        return sum(row.parameters for row in self.layers)

    @property
    def dense_macs(self):
        """MACs per example with every block open and no policy."""
        return sum(row.dense_macs for row in self.layers)

    @property
    def policy_macs(self):
        """MACs per example of all the policies."""
        return sum(row.policy_macs for row in self.layers)

    @property
    def conditional_macs(self):
        """MACs per example really computed, policies included."""
        return sum(row.conditional_macs for row in self.layers)

    @property
    def ideal_speedup(self):
        """`dense_macs / conditional_macs`: the speedup if time followed MACs."""
        return self.dense_macs / self.conditional_macs if self.conditional_macs else 1.0

    @property
    def uncounted(self):
        """Names of the layers whose MACs no rule counts."""
        return tuple(row.name for row in self.layers if not row.counted)
