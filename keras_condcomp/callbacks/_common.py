"""Helpers shared by the callbacks (private)."""

from keras_condcomp.models.policy_gradient_model import gated_layers

__all__ = []


def require_gated_layers(callback, model):
    """The gated layers of `model`, or a ValueError naming the callback."""
    layers = gated_layers(model) if model is not None else []
    if not layers:
        name = getattr(model, "name", None)
        raise ValueError(
            f"{type(callback).__name__} needs a model with gated layers "
            f"(GatedDense, ...); model {name!r} has none."
        )
    return layers

