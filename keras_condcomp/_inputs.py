"""Model inputs given as arrays: one array, or several (a dict, list or tuple)."""

import keras
import numpy as np


def as_model_inputs(x):
    """`x` with every input a numpy array.

    A dict, or a list or tuple of arrays, holds several inputs, as Keras
    reads them: it becomes a dict or a tuple of arrays (a list would be read
    as one stacked tensor by `tf.data`). Anything else (an array, nested
    lists of numbers) becomes one array.
    """
    if isinstance(x, dict):
        return {key: np.asarray(value) for key, value in x.items()}
    if isinstance(x, (list, tuple)) and x and all(hasattr(value, "shape") for value in x):
        return tuple(np.asarray(value) for value in x)
    return np.asarray(x)


def check_arrays(name, x):
    """A ValueError naming `name` unless `x` is arrays of inputs (an array,
    nested lists of numbers, or a dict, list or tuple of them): not a
    `tf.data.Dataset` or a generator, which cannot be read twice."""
    if not isinstance(x, (dict, list, tuple)) and not hasattr(x, "__array__"):
        raise ValueError(
            f"`{name}` must be arrays of inputs (an array, or a dict, list or tuple of "
            f"arrays). Received: a {type(x).__name__} (collect a dataset's examples first, "
            "e.g. `np.concatenate([x for x, _ in dataset])`)"
        )


def example_count(x):
    """The number of examples in a batch of model inputs."""
    return len(keras.tree.flatten(x)[0])
