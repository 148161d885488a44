"""Per-layer choice of the inference path by timing, instead of the per-call cost model."""

import keras
import numpy as np

from keras_condcomp._arguments import check_positive_int
from keras_condcomp.models.policy_gradient_model import gated_layers

__all__ = ["tune_execution"]

# "auto" decides per call; "static_capacity" compiles with XLA per shape
# (forced only): neither is a candidate.
_NOT_CANDIDATES = ("auto", "static_capacity")


def tune_execution(model, x, batch_size=1, repeats=30):
    """Times every inference path of each gated layer and keeps the fastest.

    `execution="auto"` decides per call, inside the graph, which costs some
    ops on every call, and its cost model is an estimate fitted on one
    machine (guide "How skipping runs fast"). Where
    the batch size and the data are known in advance, this measures instead:
    layer by layer, in order, it sets each path the layer accepts (other than
    `"auto"`, `"static_capacity"`, and `"native"` where the native kernels
    are not built), times the whole model on `x` in
    batches of `batch_size` for each, side by side and alternating, and
    keeps the fastest (median of `repeats` calls, after
    `keras_condcomp.speed.WARMUP_CALLS` untimed calls of each path: a new
    graph runs slower for its first 90 calls or so) before moving to the
    next layer. The choice is part of each layer's config, so it is saved with
    the model.

    Run it under the thread settings you will deploy with. Graphs traced
    before the call keep their paths: the model's own predict function is
    rebuilt, `tf.function`s of your own must be re-created.

    Args:
        model: a built functional or Sequential model with gated layers
            (one input; any outputs).
        x: representative inputs, at least `batch_size` examples.
        batch_size: the batch size to tune for (positive int).
        repeats: timed calls per path (positive int).

    Returns:
        dict: gated layer name -> `{"execution": path, "seconds": {path:
        median seconds of a model call}}`.

    Raises:
        ValueError: not a Keras model, no gated layer, bad
            `batch_size`/`repeats`, `x` of another feature shape than the
            model's input or with fewer than `batch_size` examples. If timing
            fails, every layer gets back the path it had.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((16,))
        >>> model = keras.Model(inputs, GatedDense(32, blocks=4, name="g")(inputs))
        >>> chosen = tune_execution(model, np.random.rand(8, 16), repeats=3).get("g")
        >>> chosen.get("execution") == model.get_layer("g").execution
        True
    """
    import tensorflow as tf

    from keras_condcomp.ops.native_kernels import load_native_kernels
    from keras_condcomp.speed import median_latencies

    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model. Received: model={model!r}")
    batch_size = check_positive_int("batch_size", batch_size)
    repeats = check_positive_int("repeats", repeats)
    layers = gated_layers(model)
    if not layers:
        raise ValueError(f"Model {model.name!r} has no gated layers to tune.")
    if getattr(model, "inputs", None) is None:
        if isinstance(model, keras.Sequential):
            raise ValueError(
                f"tune_execution needs a built model: give Sequential model {model.name!r} "
                "an `Input` or call it once."
            )
        raise ValueError(
            f"tune_execution needs a functional or Sequential model; {model.name!r} is "
            "subclassed, with no symbolic inputs: wrap it, "
            "`keras.Model(inputs, subclassed(inputs))` with `inputs = keras.Input(...)`."
        )
    if len(model.inputs) != 1:
        raise ValueError(
            f"tune_execution needs a built model with one input. Received: model "
            f"{model.name!r} with {len(model.inputs)} inputs"
        )
    x = np.asarray(x, dtype="float32")
    expected = tuple(model.inputs[0].shape[1:])
    if x.ndim != len(expected) + 1 or any(
        size is not None and size != given for size, given in zip(expected, x.shape[1:])
    ):
        raise ValueError(
            f"`x` must have shape (examples, {', '.join(map(str, expected))}) to match the "
            f"input of model {model.name!r}. Received: x.shape={x.shape}"
        )
    if len(x) < batch_size:
        raise ValueError(
            f"`x` must hold at least batch_size={batch_size} examples. Received: {len(x)}"
        )
    count = min(16, len(x) // batch_size)
    batches = [x[i * batch_size:(i + 1) * batch_size] for i in range(count)]
    spec = tf.TensorSpec([None, *x.shape[1:]], "float32")
    before = [layer.execution for layer in layers]
    native = load_native_kernels() is not None  # else "native" is no candidate
    report = {}
    try:
        for layer in layers:
            calls = {}
            for path in layer.execution_paths:
                if path in _NOT_CANDIDATES or (path == "native" and not native):
                    continue
                # A layer reads `execution` when a graph is traced.
                layer.execution = path
                function = tf.function(lambda t: model(t, training=False), input_signature=[spec])
                function.get_concrete_function()
                calls[path] = lambda batch, function=function: keras.tree.map_structure(
                    np.asarray, function(batch)
                )
            seconds = median_latencies(calls, batches, repeats=repeats)
            layer.execution = min(seconds, key=seconds.get)
            report[layer.name] = {"execution": layer.execution, "seconds": seconds}
    except BaseException:
        for layer, path in zip(layers, before):
            layer.execution = path
        raise
    finally:
        model.make_predict_function(force=True)
    return report
