"""Export to LiteRT (TFLite), builtin ops only, keeping the skipping."""

import importlib.util
import os
import re

from keras_condcomp._arguments import check_positive_int
from keras_condcomp.export import _plan

__all__ = ["export_litert", "litert_op_names", "litert_predict"]

QUANTIZE_MODES = ("int8", "float16")


def litert_op_names(model):
    """The operator codes of a LiteRT flatbuffer, as names.

    Builtin operators give their name (`"FULLY_CONNECTED"`); custom ones,
    which include TensorFlow Select (Flex) ops, give `"CUSTOM:<name>"`
    (`"CUSTOM:FlexErf"`).

    Args:
        model: the `.tflite` file's path (str or `os.PathLike`), or its
            bytes (`bytes` or `bytearray`).

    Returns:
        list of str, one per operator code of the model (sorted, no repeats).

    Examples:
        >>> import os, tempfile, keras
        >>> inputs = keras.Input((4,))
        >>> dense = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "dense.tflite")
        ...     _ = export_litert(dense, path)
        ...     litert_op_names(path)
        ['FULLY_CONNECTED']
    """
    from ai_edge_litert import schema_py_generated as schema

    if not isinstance(model, (bytes, bytearray)):
        with open(model, "rb") as handle:
            model = handle.read()
    names = {
        value: name for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_")
    }
    root = schema.Model.GetRootAs(model, 0)
    found = set()
    for index in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            found.add(f"CUSTOM:{custom.decode() if custom else ''}")
        else:
            found.add(names.get(builtin, str(builtin)))
    return sorted(found)


def _unsupported_ops(message):
    """TensorFlow op names a converter error lists as not builtin."""
    found = re.findall(r"'tf\.([A-Za-z0-9_]+)' op is neither a custom op nor a flex op", message)
    for listed in re.findall(r"(?:Custom|Flex|Select TF) ops: ([^\n]*)", message):
        found += [name.strip() for name in listed.split(",") if name.strip()]
    return sorted(set(found))


def export_litert(
    model, path, *, batch_size=1, quantize=None, representative_data=None, budget=None
):
    """Writes `model` to a LiteRT flatbuffer of builtin ops whose gated layers skip.

    The graph uses builtin operators only (`TFLITE_BUILTINS`; no Select/Flex
    or custom ops, which phones without the Flex delegate cannot run) and
    static shapes: each gated layer gates with its threshold policy and
    computes a fixed budget of blocks per example
    (`keras_condcomp.export.block_budgets`): `TOPK_V2` of its mask, `GATHER`
    of only those blocks' weight tiles, one `FULLY_CONNECTED` (batch 1) or
    `BATCH_MATMUL`, and a `BATCH_MATMUL` with a 0/1 placement matrix
    (`ONE_HOT`) that puts them back. Inactive blocks' weights are never
    read; every weight is stored once. The XNNPACK delegate takes the
    ordinary layers and the policies (constant weights); the gathered
    products run on the builtin kernels (see "Deploying to edge devices").

    Args:
        model: a built functional or Sequential Keras model (TensorFlow
            backend); its gated layers must use `inference="threshold"`.
        path: the `.tflite` file to write. It is written whole or not at all.
        batch_size: the static batch size (default 1: edge inference).
        quantize: None, `"float16"` (weights stored as float16) or `"int8"`
            (weights stored as int8, a quarter of the float32 file; computed
            in float32: dynamic-range quantisation). Full-integer
            quantisation is not offered: calibrated int8 activations break
            the mask, top-k and gather chain of the gated layers.
        representative_data: None or `(n, ...)` inputs from which the
            default budgets are measured (the largest number of active
            blocks of an example: nothing is dropped on that data; every
            block, the masked dense product, where that is above the
            layer's `export_skip_limit`).
        budget: None (defaults of `block_budgets`), an int for every gated
            layer or a dict `{layer name: int}`.

    Returns:
        dict: the budget used per gated layer.

    Raises:
        ValueError: bad arguments, a sampling (`inference="sample"`) or
            unsupported gated layer, or a graph that needs a non-builtin op
            (the message names it).
        ImportError: ai-edge-litert missing.
        RuntimeError: a backend or Keras version without the LiteRT exporter.

    Examples:
        >>> import os, tempfile, numpy as np, keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((8,))
        >>> hidden = GatedDense(16, blocks=4, activation="relu", name="g")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
        >>> x = np.random.rand(5, 8).astype("float32")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "model.tflite")
        ...     print(export_litert(model, path, budget=4))
        ...     y = litert_predict(path, x)  # the ai_edge_litert interpreter, batch 1
        {'g': 4}
        >>> bool(np.allclose(y, model.predict(x, verbose=0), atol=1e-5))
        True
    """
    path = _plan.check_path(path, ".tflite")
    batch_size = _plan.check_batch_size(batch_size, allow_none=False)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be None or one of {QUANTIZE_MODES}. Received: quantize={quantize!r}"
        )
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise ImportError("export_litert needs the `ai-edge-litert` package: pip install ai-edge-litert")
    layers = _plan.check_model(model)
    budgets = _plan.block_budgets(model, budget, representative_data, batch_size, "litert")
    signature = _plan.input_signature(model, batch_size)
    import tensorflow as tf

    options = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if quantize == "float16":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
        options["target_spec"]["supported_types"] = [tf.float16]
    elif quantize == "int8":
        # Weights only (dynamic range): full-integer quantisation calibrated
        # on representative data breaks the mask -> top-k -> gather chain
        # (measured: a digits MLP fell from 0.85 to chance accuracy).
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]

    with _plan.staged_file(path, ".tflite") as staging:
        with _plan.traced_with_budgets(model, layers, budgets):
            try:
                model.export(
                    staging, format="litert", input_signature=signature, verbose=False,
                    **options,
                )
            except ValueError as error:
                if "format" in str(error) and "litert" in str(error):
                    raise RuntimeError(
                        "This Keras version has no LiteRT exporter "
                        "(model.export(format='litert')): upgrade keras."
                    ) from error
                raise
            except Exception as error:  # the converter's ConverterError
                ops = _unsupported_ops(str(error))
                if ops:
                    raise ValueError(
                        f"Model {model.name!r} needs TensorFlow op(s) that are not "
                        f"LiteRT builtins: {', '.join(ops)}. Builtin-only graphs "
                        "run everywhere; replace the layer that uses them."
                    ) from error
                raise
        custom = [name for name in litert_op_names(staging) if name.startswith("CUSTOM")]
        if custom:
            raise ValueError(
                f"The LiteRT graph of {model.name!r} contains non-builtin op(s): "
                f"{', '.join(custom)}."
            )
        if os.path.getsize(staging) == 0:
            raise RuntimeError("The LiteRT converter wrote an empty file.")
    return budgets


def litert_predict(path, inputs, num_threads=1):
    """Outputs of a single-input, single-output LiteRT model over `(n, ...)` inputs.

    Runs the `ai_edge_litert` interpreter (with its default XNNPACK
    delegate) one static batch at a time, the last one padded with copies
    of its last example (then cut).

    Args:
        path: the `.tflite` file (str or `os.PathLike`).
        inputs: `(n, ...)` array, `n` >= 0 (converted to the model's input type).
        num_threads: interpreter threads, a positive int (default 1), or
            None for the interpreter's default.

    Returns:
        `(n, ...)` numpy array.

    Raises:
        ValueError: `inputs` of another shape than the model's input, or a
            model with several inputs or outputs.

    Examples:
        >>> import os, tempfile, numpy as np, keras
        >>> inputs = keras.Input((4,))
        >>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        >>> x = np.random.rand(3, 4).astype("float32")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "dense.tflite")
        ...     _ = export_litert(model, path, batch_size=2)
        ...     y = litert_predict(path, x)  # two batches of 2, the last padded
        >>> y.shape, bool(np.allclose(y, model.predict(x, verbose=0), atol=1e-5))
        ((3, 2), True)
    """
    from ai_edge_litert.interpreter import Interpreter

    num_threads = check_positive_int("num_threads", num_threads, allow_none=True)
    interpreter = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    _plan.check_single_io(
        interpreter.get_input_details(), interpreter.get_output_details(), path
    )
    detail = interpreter.get_input_details()[0]
    output = interpreter.get_output_details()[0]["index"]
    inputs = _plan.predict_inputs(
        inputs, [int(size) for size in detail["shape"]], path, detail["dtype"]
    )

    def run(batch):
        interpreter.set_tensor(detail["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(output).copy()

    return _plan.run_in_batches(run, inputs, int(detail["shape"][0]))
