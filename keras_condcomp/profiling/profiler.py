"""profile_macs: the compute profile of a built Keras model."""

import keras
import numpy as np

from keras_condcomp._arguments import check_positive_int, is_number
from keras_condcomp._inputs import as_model_inputs, example_count
from keras_condcomp.layers._gated_layer import check_unique_names
from keras_condcomp.layers._keeps_zeros import keeps_zeros
from keras_condcomp.layers.decision_recorder import DecisionRecorder
from keras_condcomp.profiling.layer_profile import LayerProfile
from keras_condcomp.profiling.macs_rules import (
    call_shapes,
    first_call_tensor,
    is_gated,
    layer_cost,
    static_shape,
)
from keras_condcomp.profiling.model_profile import ModelProfile

__all__ = ["gated_inputs", "profile_macs"]

def _profiled_layers(model):
    """The model's layers, nested models flattened, input layers left out."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from _profiled_layers(layer)
        else:
            yield layer


def layer_call_inputs(model):
    """`{id(layer): [input shape of each call]}`: the calls a forward pass of
    `model` makes of its layers and of the layers of the models nested in it
    (a nested model's layers are called once per call of the nested model),
    read from the functional graphs' configs. A shape is None where it is
    not known (a call on several tensors; a layer of a subclassed model,
    which counts one call).

    Examples:
        >>> import keras
        >>> inputs = keras.Input((4,))
        >>> shared = keras.layers.Dense(4, name="shared")
        >>> model = keras.Model(inputs, shared(shared(inputs)))
        >>> layer_call_inputs(model)[id(shared)]
        [(None, 4), (None, 4)]
    """
    found = {}

    def visit(container, times):
        entries = _graph_entries(container)
        chain = _sequential_input_shapes(container)
        for layer in getattr(container, "layers", None) or ():
            nodes = entries.get(layer.name, {}).get("inbound_nodes")
            if nodes:
                shapes = [static_shape((_first_argument(node) or {}).get("shape"))
                          for node in nodes]
            else:
                shapes = [chain.get(id(layer))]
            found.setdefault(id(layer), []).extend(shapes * times)
            if getattr(layer, "layers", None):
                visit(layer, times * len(shapes))

    visit(model, 1)
    return found


def _sequential_input_shapes(container):
    """`{id(layer): its input shape}` along a built Sequential model (each
    layer's output shape is the next one's input), else `{}`."""
    if not isinstance(container, keras.Sequential):
        return {}
    try:
        shape = tuple(container.inputs[0].shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        return {}
    shapes = {}
    for layer in container.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shapes[id(layer)] = shape
        shape = call_shapes(layer, shape)[1] if shape is not None else None
    return shapes


def _graph_entries(container):
    """`{layer name: its config entry}` of a functional model's graph (each
    with its `inbound_nodes`, the calls made in this model, indexed within
    it); empty for other containers."""
    try:
        config = container.get_config()
    except (NotImplementedError, TypeError, ValueError, AttributeError):
        # A layer that cannot give its config (custom, without get_config).
        return {}
    if not isinstance(config, dict):
        return {}
    return {
        entry.get("name"): entry for entry in config.get("layers") or ()
        if isinstance(entry, dict)
    }


def _first_argument(node):
    """The config of a serialised call's one tensor argument, else None."""
    arguments = node.get("args") if isinstance(node, dict) else None
    if not arguments or len(arguments) > 1 or not isinstance(arguments[0], dict):
        return None
    if arguments[0].get("class_name") != "__keras_tensor__":
        return None
    return arguments[0].get("config") or None


def layer_calls(model):
    """`{id(layer): times a forward pass of model calls it}` (see
    `layer_call_inputs`).

    Examples:
        >>> import keras
        >>> inputs = keras.Input((4,))
        >>> shared = keras.layers.Dense(4, name="shared")
        >>> model = keras.Model(inputs, shared(shared(inputs)))
        >>> layer_calls(model)[id(shared)]
        2
    """
    return {key: len(shapes) for key, shapes in layer_call_inputs(model).items()}


def gated_inputs(model):
    """`{gated layer name: name of the gated layer feeding it, or None}`.

    A gated layer reads a block-sparse input when its input is the output of
    another gated layer, directly or through layers that keep zeros zero:
    the identity at inference (`Dropout` and the other dropouts and noises,
    `Identity`), pooling within channels (`MaxPooling2D`,
    `AveragePooling2D` and their global forms), and `ReLU`, `LeakyReLU`,
    `ELU` or element-wise `Activation` layers that map 0 to 0 (not
    `ReLU(threshold=0.5, negative_slope=0.1)`, nor a sigmoid). The graph is
    this model's (its functional graph, or a Sequential model's order), not
    across the boundary of a nested model: elsewhere the input counts as
    dense, and so do the inputs of a gated layer the model calls more than
    once.

    Args:
        model: a built Keras model; nested models' layers are included.

    Returns:
        `{name: upstream name or None}` for every gated layer.

    Raises:
        ValueError: two gated layers share a name.

    Examples:
        >>> import keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((16,))
        >>> first = GatedDense(32, blocks=4, activation="relu", name="first")(inputs)
        >>> second = GatedDense(32, blocks=4, name="second")(keras.layers.Dropout(0.5)(first))
        >>> gated_inputs(keras.Model(inputs, second))
        {'first': None, 'second': 'first'}
    """
    layers = list(_profiled_layers(model))
    check_unique_names(model, [layer for layer in layers if is_gated(layer)])
    calls = layer_calls(model)
    found = {}

    def visit(container):
        members = [layer for layer in getattr(container, "layers", None) or ()
                   if not isinstance(layer, keras.layers.InputLayer)]
        producer_of = _producers(container, members)
        for layer in members:
            if getattr(layer, "layers", None):
                visit(layer)
                continue
            if not is_gated(layer):
                continue
            upstream = None
            # The calls of a shared layer count as dense inputs.
            producer, node = producer_of(layer, 0) if calls.get(id(layer), 1) == 1 else (None, 0)
            while producer is not None:
                if is_gated(producer):
                    upstream = producer.name
                    break
                if not keeps_zeros(producer):
                    break
                producer, node = producer_of(producer, node)
            found[layer.name] = upstream

    visit(model)
    return found


def _producers(container, members):
    """`(layer, call index) -> (layer of `container` whose output that call
    reads, its call index)`, or `(None, 0)`: from a functional graph's
    config (this model's calls, not a layer's first call anywhere), the
    previous layer in a Sequential model; nothing in a subclassed one."""
    if isinstance(container, keras.Sequential):
        previous = {id(layer): before for before, layer in zip(members, members[1:])}
        return lambda layer, node: (previous.get(id(layer)), 0)
    entries = _graph_entries(container)
    if not entries:
        # No config (a layer without `get_config`): each layer's first call.
        return _first_call_producers(members)
    by_name = {layer.name: layer for layer in members}

    def producer_of(layer, node):
        nodes = entries.get(layer.name, {}).get("inbound_nodes") or ()
        argument = _first_argument(nodes[node]) if node < len(nodes) else None
        history = (argument or {}).get("keras_history")
        if not isinstance(history, (list, tuple)) or len(history) < 2:
            return None, 0
        return by_name.get(history[0]), history[1]

    return producer_of


def _first_call_producers(members):
    """`_producers` read from each layer's first call (`layer.input`,
    `layer.output`), wherever it was made."""
    producers = {id(first_call_tensor(layer, "output")): layer for layer in members}

    def producer_of(layer, node):
        value = first_call_tensor(layer, "input")
        return (None if value is None else producers.get(id(value))), 0

    return producer_of


def _batches(x, batch_size):
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        for element in x:
            yield keras.utils.unpack_x_y_sample_weight(element)[0]
        return
    dataset = tf.data.Dataset.from_tensor_slices(as_model_inputs(x)).batch(batch_size)
    yield from dataset


def _measured_densities(model, x, batch_size):
    """`{gated layer name: (examples,) fraction of its blocks that ran}`."""
    per_batch = {}
    for batch in _batches(x, batch_size):
        with DecisionRecorder() as recorder:
            model(batch, training=False)
        calls = {}
        for decision in recorder.decisions:
            mask = keras.ops.convert_to_numpy(decision.mask).astype("float64")
            calls.setdefault(decision.layer.name, []).append(mask.mean(axis=-1))
        for name, values in calls.items():
            # A layer called several times: the mean over its calls.
            per_batch.setdefault(name, []).append(np.mean(values, axis=0))
    return {name: np.concatenate(values) for name, values in per_batch.items()}


def _check_densities(densities, gated_names):
    if not isinstance(densities, dict):
        raise ValueError(
            "`densities` must be a dict {gated layer name: density}. "
            f"Received: densities={densities!r}"
        )
    for name, value in densities.items():
        if name not in gated_names:
            raise ValueError(
                f"`densities` names {name!r}, which is not a gated layer of the "
                f"model (gated layers: {sorted(gated_names)}). "
                f"Received: densities={densities!r}"
            )
        if not is_number(value) or not 0 <= value <= 1:
            raise ValueError(
                f"Densities must be numbers in [0, 1]. Received: densities[{name!r}]={value!r}"
            )


def profile_macs(model, densities=None, x=None, batch_size=256):
    """The parameters and MACs per example of every layer of `model`.

    Each gated layer's density (fraction of its blocks that run) is measured
    on `x` when given, else read from `densities`, else its `target_density`
    (1 without one). The conditional MACs of a gated layer are
    `policy_macs + dense_macs * mean_i(input_density_i * density_i)`
    (Bengio et al.'s `((H * M_in) W) * M_out`: skipped input blocks remove
    rows of `W`, skipped output blocks columns), with the input density taken
    from a gated layer feeding it (see `gated_inputs`). Measured densities
    pair both per example; given or target densities multiply the means.
    Ungated layers count densely; rules per layer kind are in
    `keras_condcomp.profiling.macs_rules`. A layer the model calls k times
    (shared weights) counts k calls, each at its input shape in this model
    (also for a layer first called in another model); a shared gated
    layer's input counts as dense.

    Args:
        model: a built Keras model (functional, Sequential or subclassed).
        densities: `{gated layer name: density in [0, 1]}`.
        x: inputs to measure the densities on (an array; a dict, list or
            tuple of arrays for several inputs; or a `tf.data.Dataset` of
            inputs or `(inputs, targets)` batches), run with
            `training=False`.
        batch_size: batch size for arrays in `x`.

    Returns:
        a `ModelProfile`.

    Examples:
        >>> import keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((100,))
        >>> hidden = GatedDense(64, blocks=4, target_density=0.25, name="gated")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(hidden))
        >>> profile = profile_macs(model)
        >>> profile.dense_macs, profile.conditional_macs, profile.layer("gated").policy_macs
        (7040, 2640.0, 400)
    """
    if not model.built:
        raise ValueError(
            f"`model` must be built to be profiled. Received: model={model.name!r} "
            "(unbuilt); call it on data or build it first."
        )
    if densities is not None and x is not None:
        raise ValueError(
            "Pass `densities` or `x`, not both. "
            f"Received: densities={densities!r} and x of type {type(x).__name__}"
        )
    batch_size = check_positive_int("batch_size", batch_size)
    layers = list(_profiled_layers(model))
    upstream = gated_inputs(model)
    gated_names = set(upstream)
    measured, examples, source = {}, None, "targets"
    if x is not None:
        measured = _measured_densities(model, x, batch_size)
        missing = gated_names - set(measured)
        if missing:
            raise ValueError(
                f"The gated layers {sorted(missing)} took no decision on `x`: "
                "were they called in the model's forward pass?"
            )
        if measured:
            examples = len(next(iter(measured.values())))
        else:  # no gated layer: nothing to measure
            examples = sum(example_count(batch) for batch in _batches(x, batch_size))
        source = "measured"
    elif densities is not None:
        _check_densities(densities, gated_names)
        source = "given"
    densities = densities or {}

    def mean_density(layer):
        if layer.name in measured:
            return float(measured[layer.name].mean())
        if layer.name in densities:
            return float(densities[layer.name])
        return float(layer.target_density or 1.0)

    call_inputs = layer_call_inputs(model)
    rows = []
    for layer in layers:
        # A layer the model calls k times (shared weights) costs k calls,
        # each at its own input shape.
        costs = [layer_cost(layer, shape) for shape in call_inputs.get(id(layer), [None])]
        cost = costs[0]
        row = dict(
            name=layer.name,
            kind=type(layer).__name__,
            parameters=int(layer.count_params()) if layer.built else 0,
            dense_macs=sum(call.dense_macs for call in costs),
            counted=all(call.counted for call in costs),
        )
        if cost.blocks is not None:
            source_name = upstream.get(layer.name)
            density = mean_density(layer)
            input_density = 1.0
            fraction = density
            if source_name is not None:
                source_layer = next(other for other in layers if other.name == source_name)
                input_density = mean_density(source_layer)
                fraction = density * input_density
            if layer.name in measured:
                per_example = measured[layer.name]
                if source_name is not None:
                    per_example = per_example * measured[source_name]
                fraction = float(per_example.mean())
            row.update(
                blocks=cost.blocks,
                policy_macs=sum(call.policy_macs for call in costs),
                input_density=input_density,
                density=density,
                computed_fraction=fraction,
            )
        rows.append(LayerProfile(**row))
    return ModelProfile(model.name, tuple(rows), source, examples)
