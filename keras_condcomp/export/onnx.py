"""Export to ONNX (tf2onnx through Keras's `model.export`), keeping the skipping."""

import importlib.util
import os

from keras_condcomp._arguments import check_non_negative_int, is_integer
from keras_condcomp.export import _plan

__all__ = ["export_onnx", "onnx_predict"]

# The first opset with OneHot, which the gated layers' placement uses.
MIN_OPSET = 9


def export_onnx(
    model, path, *, opset=None, batch_size=None, budget=None, representative_data=None
):
    """Writes `model` to an ONNX file whose gated layers skip their inactive blocks.

    Each gated layer gates with its threshold policy and computes a fixed
    budget of blocks (`keras_condcomp.export.block_budgets`): a `TopK` of its
    mask, a `Gather` of only those blocks' weight tiles, their product, and
    a product with a 0/1 placement matrix that puts them back; a
    `GatedDense` fed by another reads only that layer's non-zero input
    blocks. Inactive blocks' weights are never read; every weight is stored
    once. A budget of every block exports the masked dense product instead
    (the default for `GatedConv2D`, whose skipping graph ran slower than
    computing every group in onnxruntime; an explicit `budget` still
    skips). Ordinary Keras layers export as Keras exports them.

    Args:
        model: a built functional or Sequential Keras model (TensorFlow
            backend); its gated layers must use `inference="threshold"`.
        path: the `.onnx` file to write. It is written whole or not at all.
        opset: ONNX opset, or None for tf2onnx's default (15 with tf2onnx 1.17).
        batch_size: None (default) for a dynamic batch dimension, or a
            positive int for a static one.
        budget: None (defaults of `block_budgets`), an int for every gated
            layer or a dict `{layer name: int}`.
        representative_data: None or `(n, ...)` inputs from which the
            default budgets are measured (the largest number of active blocks
            of an example: nothing is dropped on that data; every block, the
            masked dense product, where that is above the layer's
            `export_skip_limit`).

    Returns:
        dict: the budget used per gated layer.

    Raises:
        ValueError: bad arguments, a sampling (`inference="sample"`) or
            unsupported gated layer, or a graph ONNX cannot hold (an op with
            no ONNX form, such as gelu's `Erfc`; a layer's state turned
            into an input, as a Normalization layer's is).
        ImportError: tf2onnx or onnx missing.
        RuntimeError: a backend or Keras version without the ONNX exporter.

    Examples:
        >>> import os, tempfile, numpy as np, keras, onnxruntime
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((8,))
        >>> hidden = GatedDense(16, blocks=4, activation="relu", name="g")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
        >>> x = np.random.rand(5, 8).astype("float32")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "model.onnx")
        ...     print(export_onnx(model, path, budget=4))
        ...     session = onnxruntime.InferenceSession(path)
        ...     y = session.run(None, {session.get_inputs()[0].name: x})[0]
        {'g': 4}
        >>> bool(np.allclose(y, model.predict(x, verbose=0), atol=1e-5))
        True
    """
    path = _plan.check_path(path, ".onnx")
    batch_size = _plan.check_batch_size(batch_size, allow_none=True)
    for module in ("tf2onnx", "onnx"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"export_onnx needs the `{module}` package: pip install tf2onnx onnx"
            )
    if opset is not None:
        from tf2onnx.constants import OPSET_TO_IR_VERSION

        newest = max(OPSET_TO_IR_VERSION)
        if not is_integer(opset) or not MIN_OPSET <= opset <= newest:
            raise ValueError(
                f"`opset` must be None or an int from {MIN_OPSET} to {newest} (what this "
                f"tf2onnx converts). Received: opset={opset!r}"
            )
        opset = int(opset)
    layers = _plan.check_model(model)
    budgets = _plan.block_budgets(model, budget, representative_data, batch_size, "onnx")
    signature = _plan.input_signature(model, batch_size)
    import onnx

    with _plan.staged_file(path, ".onnx") as staging:
        with _plan.traced_with_budgets(model, layers, budgets):
            try:
                model.export(
                    staging, format="onnx", input_signature=signature,
                    opset_version=opset, verbose=False,
                )
            except ValueError as error:
                if "format" in str(error) and "onnx" in str(error):
                    raise RuntimeError(
                        "This Keras version has no ONNX exporter "
                        "(model.export(format='onnx')): upgrade to keras>=3.13."
                    ) from error
                raise
        try:
            onnx.checker.check_model(staging, full_check=True)
        except onnx.checker.ValidationError as error:
            # tf2onnx wrote an op ONNX does not have (e.g. `Erfc`, of gelu).
            raise ValueError(
                f"The ONNX graph of {model.name!r} is not valid ONNX, so it was not "
                f"written (an op of one of its layers has no ONNX form): {error}"
            ) from None
        inputs = [i for i in onnx.load(staging).graph.input]
        if len(inputs) != len(model.inputs):
            # e.g. a Normalization layer's statistics, turned into inputs.
            raise ValueError(
                f"The ONNX graph of {model.name!r} takes {len(inputs)} inputs "
                f"({', '.join(i.name for i in inputs)}) where the model takes "
                f"{len(model.inputs)}, so it was not written: a layer's state became "
                "an input (a Normalization layer's mean and variance do)."
            )
    return budgets


def onnx_predict(path, inputs, num_threads=1, batch_size=None):
    """Outputs of a single-input, single-output ONNX model over `(n, ...)` inputs.

    Runs onnxruntime's CPU provider (inter-op threads 1); the inputs are
    converted to the model's input type (float32, or the integers of a model
    taking pixels) and run in batches, the last one padded with copies of
    its last example (then cut).

    Args:
        path: the `.onnx` file (str or `os.PathLike`).
        inputs: `(n, ...)` array, `n` >= 0 (converted to the model's input type).
        num_threads: onnxruntime intra-op threads, a positive int (default
            1), or None (or 0) for onnxruntime's default, as
            `litert_predict` takes None.
        batch_size: examples per run, a positive int (None: all at once, for
            a dynamic batch; a static batch size in the file wins).

    Returns:
        `(n, ...)` numpy array.

    Raises:
        ValueError: `inputs` of another shape than the model's input, a bad
            `batch_size`, or a model with several inputs or outputs.

    Examples:
        >>> import os, tempfile, numpy as np, keras
        >>> inputs = keras.Input((4,))
        >>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        >>> x = np.random.rand(5, 4).astype("float32")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "dense.onnx")
        ...     _ = export_onnx(model, path)
        ...     y = onnx_predict(path, x, batch_size=2)
        >>> y.shape, bool(np.allclose(y, model.predict(x, verbose=0), atol=1e-5))
        ((5, 2), True)
    """
    import onnxruntime

    batch_size = _plan.check_batch_size(batch_size, allow_none=True)
    num_threads = 0 if num_threads is None else check_non_negative_int("num_threads", num_threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        os.fspath(path), options, providers=["CPUExecutionProvider"]
    )
    _plan.check_single_io(session.get_inputs(), session.get_outputs(), path)
    detail = session.get_inputs()[0]
    # onnxruntime names types as ONNX does: tensor(float), tensor(uint8), ...
    element = detail.type[len("tensor("):-1]
    dtype = {"float": "float32", "double": "float64"}.get(element, element)
    inputs = _plan.predict_inputs(inputs, detail.shape, path, dtype)
    if isinstance(detail.shape[0], int):
        batch_size = detail.shape[0]
    step = batch_size or max(len(inputs), 1)
    return _plan.run_in_batches(
        lambda batch: session.run(None, {detail.name: batch})[0], inputs, step
    )
