"""Helpers shared by the callbacks (private)."""

from keras_condcomp._arguments import is_number
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


def check_density(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if not is_number(value) or not 0 < value <= 1:
        raise ValueError(
            f"`{name}` must be a number in (0, 1]"
            f"{' or None' if allow_none else ''}. Received: {name}={value!r}"
        )
