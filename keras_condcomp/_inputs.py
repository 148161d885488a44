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


def example_count(x):
    """The number of examples in a batch of model inputs."""
    return len(keras.tree.flatten(x)[0])
