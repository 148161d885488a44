"""What the exporters share: model checks, block budgets, the trace plan, atomic writes."""

import contextlib
import math
import os
import uuid
import warnings

import keras
import numpy as np

from keras_condcomp._arguments import check_positive_int
from keras_condcomp._inputs import as_model_inputs, check_arrays
from keras_condcomp.models.policy_gradient_model import (
    check_called_once,
    gated_layer_inputs,
    gated_layers,
)
from keras_condcomp.ops.static_budget_dense import static_budget_plan
from keras_condcomp.profiling.profiler import gated_inputs

__all__ = ["active_block_counts", "block_budgets"]


def check_model(model):
    """Checks `model` can be exported; returns its gated layers."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model={type(model).__name__}"
        )
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "keras_condcomp.export needs the TensorFlow backend (tf2onnx and the "
            "LiteRT converter read TensorFlow graphs). Received: "
            f"keras.backend.backend()={keras.backend.backend()!r}; set "
            "KERAS_BACKEND=tensorflow."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            "`model` must be a built functional or Sequential model with known "
            "inputs (a Sequential model: give it an `Input` or call it once; a subclassed "
            "model: wrap it, `keras.Model(inputs, subclassed(inputs))` with "
            f"`inputs = keras.Input(...)`). Received: {model.name!r}"
        )
    layers = gated_layers(model)
    # One trace setting a layer (budget, input sparsity) serves every call.
    check_called_once(model, layers, "Export")
    for layer in layers:
        if layer.compute_dtype != "float32":
            raise ValueError(
                f"Layer {layer.name!r} computes in {layer.compute_dtype} (dtype policy "
                f"{layer.dtype_policy.name!r}): the export paths run in float32. Re-create the "
                "model under `keras.config.set_dtype_policy('float32')` and copy the weights "
                "(`set_weights(model.get_weights())`) before exporting."
            )
        if not getattr(type(layer), "supports_static_budget", False):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) is a gated layer "
                "without an export path (it must set `supports_static_budget = True` "
                "and run `keras_condcomp.ops.static_budget_dense.static_budget_settings(self)` "
                "in call)."
            )
        if layer.inference != "threshold":
            raise ValueError(
                f"Layer {layer.name!r} samples its mask at inference "
                f"(inference={layer.inference!r}): an exported graph must be "
                "deterministic. Re-create the layer with inference='threshold' "
                "(the weights load unchanged) before exporting."
            )
    return layers


def _as_inputs(model, data, name):
    """`data` (argument `name`: an array, a list or tuple of arrays, or a
    dict by input name) as the list of input arrays of `model`."""
    check_arrays(name, data)
    # A list of examples (nested numbers) is one array, as Keras reads it.
    data = as_model_inputs(data)
    if isinstance(data, dict):
        names = [spec.name for spec in model.inputs]
        if sorted(data) != sorted(names):
            raise ValueError(
                f"`{name}` as a dict must have one array per input of model "
                f"{model.name!r}, by name: {sorted(names)}. Received keys: {sorted(data)}"
            )
        data = [data[input_name] for input_name in names]
    arrays = list(data) if isinstance(data, (list, tuple)) else [data]
    try:
        arrays = [np.asarray(array, dtype="float32") for array in arrays]
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must hold numbers. Received: {error}") from None
    if len(arrays) != len(model.inputs):
        raise ValueError(
            f"`{name}` must hold {len(model.inputs)} input array(s) for "
            f"model {model.name!r}. Received: {len(arrays)} array(s)"
        )
    for array, spec in zip(arrays, model.inputs):
        if array.ndim != len(spec.shape) or any(
            size is not None and size != got for size, got in zip(spec.shape[1:], array.shape[1:])
        ) or not len(array):
            raise ValueError(
                f"`{name}` must be examples of shape (n, "
                f"{', '.join(str(s) for s in spec.shape[1:])}) with n > 0. "
                f"Received: shape {array.shape}"
            )
    return arrays


def active_block_counts(model, data, batch_size=256):
    """Active blocks per example of each gated layer, at inference.

    The masks are those the layers use at inference: the threshold policy
    (`inference="threshold"`, the default and what exports use); a
    `"sample"` layer samples them, so its counts change from call to call.

    Args:
        model: a functional or Sequential Keras model with gated layers.
        data: `(n, ...)` input array (for several inputs, a list or tuple of
            arrays, or a dict of them by input name).
        batch_size: examples per forward pass.

    Returns:
        dict: gated layer name -> `(n,)` int array of active block counts.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((8,))
        >>> model = keras.Model(inputs, GatedDense(16, blocks=4, name="g")(inputs))
        >>> counts = active_block_counts(model, np.random.rand(5, 8))
        >>> counts["g"].shape
        (5,)
    """
    return _active_block_counts(model, data, batch_size, "data")


def _active_block_counts(model, data, batch_size, name, hint=""):
    """`active_block_counts` of `data`, given as argument `name`; `hint`
    ends the error raised when the gated layers' inputs cannot be read."""
    batch_size = check_batch_size(batch_size, allow_none=False)
    layers = gated_layers(model)
    arrays = _as_inputs(model, data, name)
    try:
        seen = gated_layer_inputs(
            model, arrays if len(arrays) > 1 else arrays[0], batch_size=batch_size
        )
    except ValueError as error:
        raise ValueError(f"{error}{hint}") from error
    counts = {}
    for layer, layer_inputs in zip(layers, seen):
        masks = [
            keras.ops.convert_to_numpy(layer.block_mask(layer_inputs[i:i + batch_size]))
            for i in range(0, len(layer_inputs), batch_size)
        ]
        counts[layer.name] = np.concatenate(masks).sum(axis=1).astype("int64")
    return counts


def _check_budget(layer, value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
        1 <= value <= layer.blocks
    ):
        raise ValueError(
            f"`{name}` must be an int in [1, blocks={layer.blocks}] for layer "
            f"{layer.name!r}. Received: {name}={value!r}"
        )
    return int(value)


EXPORT_FORMATS = ("litert", "onnx")


def skip_limit(layer, export_format):
    """The layer's `export_skip_limit` for `export_format` (1.0 if it has none).

    The class attribute is a fraction of the blocks, or a dict of fractions
    by export format (a format it leaves out: 1.0).
    """
    limit = getattr(type(layer), "export_skip_limit", 1.0)
    return limit.get(export_format, 1.0) if isinstance(limit, dict) else limit


def block_budgets(
    model, budget=None, representative_data=None, batch_size=1, export_format="litert"
):
    """The number of blocks each gated layer computes per example when exported.

    Exported graphs have static shapes: each gated layer computes a fixed
    number of blocks per example (its budget), chosen among the active ones;
    an example with more active blocks than the budget loses the extra ones
    (those of highest index: their outputs are 0). The defaults:

    - with `representative_data`: the largest number of active blocks of an
      example of that data (nothing is dropped on it);
    - else with the layer's `target_density` tau: `ceil(2 tau blocks)`, at
      most `blocks`;
    - else every block (nothing dropped, nothing skipped; a warning).

    A default budget above the layer's `export_skip_limit` (a class
    attribute: the fraction of its blocks up to which the skipping graph was
    measured faster than the masked dense one, in each export format; 0.4
    for `GatedDense`; for `GatedConv2D` 0.2 in LiteRT and 0 in ONNX, where
    skipping groups did not pay) becomes every block: the layer is then
    exported as its masked dense product with constant weights (nothing
    dropped, nothing skipped). A `budget` given explicitly is used as given.

    Layers whose budget counts the groups active in some example of the
    batch (class attribute `static_budget_scope = "batch"`: GatedConv2D)
    default to every group when `batch_size` is not 1 (None: dynamic), so
    that a batch never drops any (they are then exported as their masked
    product, skipping nothing, whatever `representative_data`); at batch 1
    the defaults above apply.

    Args:
        model: the Keras model.
        budget: None (the defaults), an int for every gated layer, or a dict
            `{layer name: int}` (layers not named get the default).
        representative_data: None or `(n, ...)` inputs: an array (or
            nested lists of numbers), or a list, tuple or dict by input name
            of arrays for several inputs; not a `tf.data.Dataset`.
        batch_size: the exported batch size (None: dynamic).
        export_format: `"litert"` or `"onnx"`, whose skip limits apply.

    Returns:
        dict: gated layer name -> budget (int in `[1, blocks]`).

    Examples:
        >>> import keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((8,))
        >>> layer = GatedDense(16, blocks=8, target_density=0.125, name="g")
        >>> model = keras.Model(inputs, layer(inputs))
        >>> block_budgets(model)  # ceil(2 * 0.125 * 8)
        {'g': 2}
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"`export_format` must be one of {EXPORT_FORMATS}. "
            f"Received: export_format={export_format!r}"
        )
    batch_size = check_batch_size(batch_size, allow_none=True)
    layers = gated_layers(model)
    names = {layer.name for layer in layers}
    if isinstance(budget, dict):
        unknown = sorted(set(budget) - names)
        if unknown:
            raise ValueError(
                f"`budget` names layers that are not gated layers of {model.name!r}: "
                f"{unknown}. Gated layers: {sorted(names)}"
            )
    elif budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, np.integer))
    ):
        raise ValueError(
            "`budget` must be None, an int or a dict {layer name: int}. "
            f"Received: budget={budget!r}"
        )
    counts = None
    result = {}
    for layer in layers:
        value = budget.get(layer.name) if isinstance(budget, dict) else budget
        batch_scope = getattr(type(layer), "static_budget_scope", "example") == "batch"
        if value is not None:
            result[layer.name] = _check_budget(layer, value, "budget")
            if batch_scope and batch_size != 1 and result[layer.name] < layer.blocks:
                warnings.warn(
                    f"{type(layer).__name__} {layer.name!r}: a budget of "
                    f"{result[layer.name]} of {layer.blocks} groups counts the groups "
                    "active in any example of a batch, so with batch_size="
                    f"{batch_size} an example's output depends on the other examples "
                    "of its batch. Export with batch_size=1 for a budget per example.",
                    stacklevel=3,
                )
            continue
        if batch_scope and batch_size != 1:
            value = layer.blocks
        elif representative_data is not None:
            if counts is None:
                counts = _active_block_counts(
                    model, representative_data, 256, "representative_data",
                    " Pass `budget` instead of `representative_data` to choose the budgets.",
                )
            value = max(1, int(counts[layer.name].max()))
        elif layer.target_density is not None:
            value = min(layer.blocks, max(1, math.ceil(2 * layer.target_density * layer.blocks)))
        else:
            warnings.warn(
                f"Gated layer {layer.name!r} has no target_density and no "
                "representative_data was given: it is exported computing all "
                f"{layer.blocks} blocks. Pass `budget` or `representative_data`.",
                stacklevel=3,
            )
            value = layer.blocks
        if value > skip_limit(layer, export_format) * layer.blocks:
            value = layer.blocks
        result[layer.name] = value
    return result


def trace_settings(model, layers, budgets):
    """The `static_budget_plan` settings: budgets and input-sparsity hints."""
    by_name = {layer.name: layer for layer in layers}
    upstream_names = gated_inputs(model)
    settings = {}
    for layer in layers:
        entry = {"budget": budgets[layer.name]}
        upstream = by_name.get(upstream_names.get(layer.name))
        # The upstream layer's output has at most its budget of non-zero
        # blocks, and so has this input (`gated_inputs` follows only layers
        # that keep zeros zero): read only those. GatedDense inputs are
        # (batch, features).
        if (
            upstream is not None
            and hasattr(upstream, "units")
            and getattr(layer, "units", None) is not None
            and len(upstream.output.shape) == 2
            and budgets[upstream.name] < upstream.blocks
        ):
            entry["input_blocks"] = upstream.blocks
            entry["input_budget"] = budgets[upstream.name]
        settings[id(layer)] = entry
    return settings


@contextlib.contextmanager
def traced_with_budgets(model, layers, budgets):
    """Gated layers traced inside the block run their static-budget path."""
    with static_budget_plan(trace_settings(model, layers, budgets)):
        yield


def input_signature(model, batch_size):
    """One `tf.TensorSpec` per model input, the batch dimension set to `batch_size`."""
    import tensorflow as tf

    specs = []
    for tensor in model.inputs:
        shape = list(tensor.shape)
        if any(size is None for size in shape[1:]):
            raise ValueError(
                f"Input {tensor.name!r} of {model.name!r} has a dynamic dimension "
                f"(shape {tuple(shape)}): exported graphs need static feature sizes."
            )
        specs.append(tf.TensorSpec([batch_size] + shape[1:], tensor.dtype, name=tensor.name))
    # One positional argument of `model.__call__`: the input, or the list of them.
    return specs if len(specs) == 1 else [specs]


def check_batch_size(batch_size, allow_none):
    return check_positive_int("batch_size", batch_size, allow_none)


def check_path(path, suffix):
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ValueError(f"`path` must be a str or os.PathLike path. Received: path={path!r}")
    path = os.fspath(path)
    if not path.endswith(suffix):
        raise ValueError(f"`path` must end with {suffix!r}. Received: path={path!r}")
    if os.path.isdir(path):
        raise ValueError(f"`path` is a folder, not a file. Received: path={path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"The folder of `path` does not exist. Received: path={path!r}")
    return path


@contextlib.contextmanager
def staged_file(path, suffix):
    """A temporary file beside `path`, moved onto `path` only if the block
    succeeds. A `path` that is a symbolic link has the file it names
    rewritten, as writing to it would, not the link replaced."""
    path = os.path.realpath(path)
    parent = os.path.dirname(path)
    # Made with the usual permissions of a new file (0666 less the umask),
    # as Keras's own `model.export` writes it: `tempfile.mkstemp` makes 0600.
    staging = os.path.join(parent, f".keras-condcomp-export-{uuid.uuid4().hex}{suffix}")
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def predict_inputs(inputs, model_shape, name, dtype="float32"):
    """`inputs` as an array of the exported model's input `dtype` (float32,
    or the integers of a model taking pixels), checked against its input
    shape `model_shape` (`(batch, ...)`, ints or names for dynamic sizes),
    for the `*_predict` helpers."""
    inputs = np.asarray(inputs, dtype=dtype)
    features = tuple(model_shape[1:])
    if inputs.ndim != len(model_shape) or any(
        isinstance(size, int) and size != given for size, given in zip(features, inputs.shape[1:])
    ):
        raise ValueError(
            f"`inputs` must have shape (n, {', '.join(map(str, features))}) for the model in "
            f"{name}. Received: inputs.shape={inputs.shape}"
        )
    return inputs


def run_in_batches(run, inputs, step):
    """`run(batch of step examples)` over `inputs`, the last batch padded
    with copies of its last example (zeros could take a place in a
    GatedConv2D budget, which counts the groups of the whole batch); with
    no examples, one batch of zeros cut to none, so the result has the
    output's shape."""
    results = []
    for start in range(0, max(len(inputs), 1), step):
        chunk = inputs[start:start + step]
        shape = (step - len(chunk),) + inputs.shape[1:]
        padding = (np.broadcast_to(chunk[-1:], shape) if len(chunk)
                   else np.zeros(shape, inputs.dtype))
        results.append(run(np.concatenate([chunk, padding]))[: len(chunk)])
    return np.concatenate(results)


def check_single_io(inputs, outputs, name):
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"The model in {name} has {len(inputs)} inputs and {len(outputs)} outputs: this "
            "helper runs single-input, single-output models (call the runtime directly)."
        )
