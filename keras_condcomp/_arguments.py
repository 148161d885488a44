"""Checks of the arguments users pass to the public API (private).

Numbers: Python and numpy numbers are accepted alike (a search space or a config
often hands over `np.float32` or `np.int64`), bools are not, and a real
number must be finite: a NaN passes every comparison-based range check.
Callers store the value converted to `int` or `float`, so configs stay
JSON-serialisable.
"""

import math
import numbers

import numpy as np

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


def check_positive_int(name, value, allow_none=False):
    """`value` as an int; a ValueError naming `name` unless it is a positive
    integer (or None, with `allow_none`).

    >>> import numpy as np
    >>> check_positive_int("batch_size", np.int64(8))
    8
    """
    if value is None and allow_none:
        return None
    if not is_integer(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer{' or None' if allow_none else ''}. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def check_non_negative_int(name, value):
    """`value` as an int; a ValueError naming `name` unless it is an integer >= 0."""
    if not is_integer(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer. Received: {name}={value!r}")
    return int(value)


def check_bool(name, value):
    """A ValueError naming `name` unless `value` is a bool (numpy's too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def check_density(name, value, allow_none=False):
    """A ValueError naming `name` unless `value` is a number in (0, 1] (or
    None, with `allow_none`)."""
    if value is None and allow_none:
        return
    if not is_number(value) or not 0 < value <= 1:
        raise ValueError(
            f"`{name}` must be a number in (0, 1]"
            f"{' or None' if allow_none else ''}. Received: {name}={value!r}"
        )


def check_non_negative_number(name, value):
    """A ValueError naming `name` unless `value` is a finite number >= 0."""
    if not is_number(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a finite non-negative number. Received: {name}={value!r}"
        )
