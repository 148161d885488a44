"""Checks of the arguments users pass to the public API (private).

Numbers: Python and numpy numbers are accepted alike (a search space or a config
often hands over `np.float32` or `np.int64`), bools are not, and a real
number must be finite: a NaN passes every comparison-based range check.
Callers store the value converted to `int` or `float`, so configs stay
JSON-serialisable.
"""

import math
import numbers

__all__ = []


def is_integer(value):
    """Whether `value` is an integer (Python or numpy), not a bool.

    >>> import numpy as np
    >>> is_integer(3), is_integer(np.int64(3)), is_integer(True), is_integer(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """Whether `value` is a finite real number (Python or numpy), not a bool.

    >>> import numpy as np
    >>> is_number(0.5), is_number(np.float32(0.5)), is_number(float("nan")), is_number(True)
    (True, True, False, False)
    """
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def check_activation(activation):
    """A ValueError unless `activation` is a callable or None (the ops take
    the function itself, as `keras.activations.get` returns it)."""
    if activation is not None and not callable(activation):
        raise ValueError(
            "`activation` must be a callable or None, e.g. keras.activations.get('relu'). "
            f"Received: activation={activation!r}"
        )


def check_bias(bias, units):
    """A ValueError unless `bias` is None or of shape `(units,)`."""
    if bias is not None and tuple(bias.shape) != (units,):
        raise ValueError(
            f"`bias` must have shape ({units},) or be None. Received: bias.shape={tuple(bias.shape)}"
        )
