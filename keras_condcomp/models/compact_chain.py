"""Inference of a chain of layers that passes gated layers' outputs on compactly.

Each gated layer called on its own must hand the next layer a full tensor:
it computes its active blocks, then places them among zeros (a pass over the
whole output), and the next gated layer finds the non-zero input channels
again (another pass) before reading them. In a chain of layers the next
layer could read the computed blocks as they are. `compact_inference` runs a
model that way at batch 1: from a gated layer on, a value travels as its
active blocks only, with their indices, through the layers that act on each
channel alone (pooling, ReLU, dropout) and Flatten, into the next gated
layer or Dense or Conv2D, which gathers only the matching rows of its
kernel. Zeros are placed only where a layer needs the full tensor. A batch
of a chain of large convolutions runs that way example by example.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_condcomp.layers._keeps_zeros import (
    ACTIVATION_LAYERS,
    CHANNELWISE_POOLING,
    INFERENCE_IDENTITY,
    maps_zero_to_zero,
)
from keras_condcomp.layers.gated_conv2d import GatedConv2D
from keras_condcomp.layers.gated_dense import GatedDense
from keras_condcomp.ops._threads import intra_op_threads
from keras_condcomp.ops.block_kernel import block_dense
from keras_condcomp.ops.block_sparse_conv2d import _first_if_none
from keras_condcomp.ops.block_sparse_dense import _in_place_or, skipping_can_pay_at_batch_1
from keras_condcomp.ops.native_kernels import (
    _runs_in_chain,
    chain_from_variables,
    load_native_kernels,
    native_activation,
)

__all__ = [
    "LOOP_LARGE_MACS",
    "LOOP_LARGE_MAX_FRACTION",
    "LOOP_MAX_FRACTION",
    "LOOP_MIN_MACS",
    "compact_inference",
]

# A GatedDense reading at least this fraction of its kernel computes densely:
# the skipping products copy the weights they read, the dense one reads them
# in place.
_DENSE_MIN_FRACTION = 0.5

# Above batch 1 the chain runs example by example (a loop over the batch)
# when its gated convolutions have at least `LOOP_MIN_MACS` multiply-adds an
# example (`LOOP_LARGE_MACS` when TensorFlow's ops run on several threads),
# more than its GatedDense layers, and at most `LOOP_MAX_FRACTION` of the
# first gated layer's (example, block) pairs are active
# (`LOOP_LARGE_MAX_FRACTION` from `LOOP_LARGE_MACS`); else the model's own
# graph runs. See the guide "How skipping runs fast".
LOOP_MIN_MACS = 1e7
LOOP_LARGE_MACS = 5e7
LOOP_MAX_FRACTION = 0.5
LOOP_LARGE_MAX_FRACTION = 0.9


class _Blocks:
    """A value held as some of its blocks along the last axis.

    `values` holds the blocks `groups` (int32, in increasing order) of
    `group_size` channels each; every other of the `blocks` blocks is 0.
    Every active block of the layer that made it is held; an inactive one
    may be, as zeros: block 0 when no block is active (a convolution or
    product needs one channel), every block after the dense product of a
    GatedDense whose active blocks would read half of its kernel.
    """

    def __init__(self, values, groups, blocks, group_size):
        self.values = values
        self.groups = groups
        self.blocks = blocks
        self.group_size = group_size

    def with_values(self, values):
        return _Blocks(values, self.groups, self.blocks, self.group_size)

    def flattened(self):
        """`Flatten` of channels-last values: block `g` at position `p` (in
        row-major order) is block `p * blocks + g` of the flattened vector."""
        positions = 1
        for size in self.values.shape[1:-1]:
            positions *= size
        groups = tf.range(positions)[:, None] * self.blocks + self.groups[None, :]
        values = tf.reshape(self.values, [1, -1])
        return _Blocks(values, tf.reshape(groups, [-1]), positions * self.blocks, self.group_size)

    def rows(self, matrix):
        """`matrix` `(..., blocks * group_size, ...)` (axis -2) restricted to
        the held blocks' rows."""
        lead, columns = matrix.shape[:-2], matrix.shape[-1]
        split = tf.reshape(matrix, [*lead, self.blocks, self.group_size, columns])
        held = tf.gather(split, self.groups, axis=len(lead))
        return tf.reshape(held, [*lead, -1, columns])

    def placed(self, values=None):
        """`values` (default: the held values) with every block in place:
        block `g` is its held values or an appended zero block."""
        values = self.values if values is None else values
        lead = _leading_shape(values)
        split = tf.reshape(values, [*lead, -1, self.group_size])
        zero = tf.zeros([*lead, 1, self.group_size], values.dtype)
        held = tf.size(self.groups)
        positions = tf.tensor_scatter_nd_update(
            tf.fill([self.blocks], held), self.groups[:, None], tf.range(held)
        )
        split = tf.gather(tf.concat([split, zero], axis=-2), positions, axis=len(lead))
        return tf.reshape(split, [*lead, self.blocks * self.group_size])


def _leading_shape(tensor):
    """The shape of `tensor` but its last axis: ints where static, else
    scalar tensors."""
    static = tensor.shape[:-1]
    if None not in static:
        return list(static)
    dynamic = tf.shape(tensor)
    return [size if size is not None else dynamic[axis] for axis, size in enumerate(static)]


def _full(value):
    return value.placed() if isinstance(value, _Blocks) else value


def _held_groups(active):
    """Indices of the active blocks, or `[0]` when none is."""
    return tf.cast(tf.reshape(tf.where(_first_if_none(active)), [-1]), tf.int32)


def _decision(layer, value):
    """The `(blocks,)` active mask `layer` decides for a batch-1 `value`."""
    state = layer._policy_state(_values(value))
    kernel = layer.policy.kernel
    if isinstance(value, _Blocks):
        # Only the rows of the held channels (in each cell of the state).
        cells = tf.reshape(kernel, [_policy_cells(layer), -1, kernel.shape[-1]])
        kernel = tf.reshape(value.rows(cells), [-1, kernel.shape[-1]])
    logits = tf.matmul(state, kernel) + layer.policy.bias
    return layer._mask_of(logits, training=False)[0] > 0


def _values(value):
    return value.values if isinstance(value, _Blocks) else value


def _policy_cells(layer):
    """Cells the policy state of `layer` has one value per channel of."""
    grid = getattr(layer, "policy_grid", None)
    return 1 if grid is None else grid * grid


def _finish(layer, outputs, active, groups, group_size):
    """Bias and activation of the held blocks, zeroed when none is active."""
    if layer.bias is not None:
        bias = tf.reshape(layer.bias, [-1, group_size])
        outputs = tf.nn.bias_add(outputs, tf.reshape(tf.gather(bias, groups), [-1]))
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return tf.where(tf.reduce_any(active), outputs, tf.constant(0, outputs.dtype))


def _gated_conv2d(layer, value):
    """The active groups' convolution, reading only the held input channels."""
    active = _decision(layer, value)
    groups = _held_groups(active)
    kernel = layer.kernel
    inputs = value
    if isinstance(value, _Blocks):
        kernel = value.rows(kernel)
        inputs = value.values
    kernel_h, kernel_w, _, filters = kernel.shape
    size = filters // layer.blocks
    kernel = tf.reshape(kernel, [kernel_h, kernel_w, -1, layer.blocks, size])
    kernel = tf.gather(kernel, groups, axis=3)
    kernel = tf.reshape(kernel, [kernel_h, kernel_w, tf.shape(kernel)[2], -1])
    outputs = tf.nn.conv2d(
        inputs, kernel, strides=layer.strides, padding=layer.padding.upper(),
        dilations=layer.dilation_rate,
    )
    return _Blocks(_finish(layer, outputs, active, groups, size), groups, layer.blocks, size)


def _gated_dense(layer, value):
    """The active blocks' products, or the dense product when they would
    read at least `_DENSE_MIN_FRACTION` of the kernel or the layer is too
    small for skipping to pay at batch 1."""
    active = _decision(layer, value)
    block_kernel = layer.block_kernel  # (blocks, input_dim, block_size)
    blocks, input_dim, block_size = block_kernel.shape
    if not skipping_can_pay_at_batch_1(input_dim, layer.units):
        # Too small for skipping to pay (the engine's rule at batch 1): the
        # dense product of the held input rows with no decision, its active
        # blocks handed on.
        groups = _held_groups(active)
        inputs, kernel = value, block_kernel
        if isinstance(value, _Blocks):
            inputs, kernel = value.values, value.rows(block_kernel)
        outputs = tf.reshape(block_dense(inputs, kernel), [blocks, block_size])
        outputs = tf.reshape(tf.gather(outputs, groups), [1, -1])
        outputs = _finish(layer, outputs, active, groups, block_size)
        return _Blocks(outputs, groups, blocks, block_size)
    read = tf.reduce_mean(tf.cast(active, tf.float32))
    if isinstance(value, _Blocks):
        read *= tf.cast(tf.size(value.groups) * value.group_size, tf.float32) / input_dim

    def skipping():
        groups = _held_groups(active)
        if isinstance(value, _Blocks):
            # The tiles of (active block, held input block): a small copy.
            tiles = tf.reshape(block_kernel, [-1, value.group_size, block_size])
            held = groups[:, None] * (input_dim // value.group_size) + value.groups[None, :]
            weights = tf.reshape(tf.gather(tiles, held), [tf.size(groups), -1, block_size])
            outputs = tf.matmul(value.values[None], weights)  # (n, 1, block_size)
        else:
            # Whole blocks, read in place when few.
            outputs = _in_place_or(
                block_kernel, groups, lambda k, weights: tf.matmul(value, weights),
                lambda: tf.matmul(value[None], tf.gather(block_kernel, groups)),
            )
        outputs = tf.reshape(outputs, [1, -1])
        return _finish(layer, outputs, active, groups, block_size), groups

    def dense():
        # Every block held; the inactive ones zeroed.
        outputs = block_dense(_full(value), block_kernel, layer.bias, None, layer.activation)
        mask = tf.repeat(active, block_size)[None]
        return tf.where(mask, outputs, tf.constant(0, outputs.dtype)), tf.range(blocks)

    values, groups = tf.cond(read < _DENSE_MIN_FRACTION, skipping, dense)
    return _Blocks(values, groups, blocks, block_size)


def _dense(layer, value):
    """A Dense layer reading only the held rows of its kernel."""
    inputs, kernel = value.values, value.rows(layer.kernel)
    if inputs.shape.rank == 2:
        outputs = tf.matmul(inputs, kernel)
    else:
        outputs = tf.tensordot(inputs, kernel, axes=1)
    if layer.bias is not None:
        outputs = outputs + layer.bias
    return layer.activation(outputs) if layer.activation is not None else outputs


def _conv2d(layer, value):
    """A Conv2D layer reading only the held input channels."""
    kernel = value.rows(layer.kernel)
    outputs = tf.nn.conv2d(
        value.values, kernel, strides=layer.strides, padding=layer.padding.upper(),
        dilations=layer.dilation_rate,
    )
    if layer.bias is not None:
        outputs = tf.nn.bias_add(outputs, layer.bias)
    return layer.activation(outputs) if layer.activation is not None else outputs


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _quantized(layer):
    return getattr(layer, "quantization_mode", None) is not None


def _step(layer):
    """`value -> value` running `layer` at batch 1 (see the module docs)."""
    def whole(value):
        return layer(_full(value), training=False)

    def reading_rows(compute):
        def run(value):
            return compute(layer, value) if isinstance(value, _Blocks) else whole(value)
        return run

    def channelwise(value):
        if isinstance(value, _Blocks):
            return value.with_values(layer(value.values))
        return layer(value)

    def flatten(value):
        if isinstance(value, _Blocks):
            return value.flattened()
        return layer(value)

    kind = type(layer)
    if isinstance(layer, GatedConv2D) and _channels_last(layer):
        return lambda value: _gated_conv2d(layer, value)
    if isinstance(layer, GatedDense):
        return lambda value: _gated_dense(layer, value)
    if kind in INFERENCE_IDENTITY:
        return lambda value: value
    if kind in CHANNELWISE_POOLING and _channels_last(layer):
        return channelwise
    if kind is keras.layers.Flatten and _channels_last(layer) and None not in layer.input.shape[1:]:
        return flatten
    if kind in ACTIVATION_LAYERS and maps_zero_to_zero(layer):
        return channelwise
    if kind is keras.layers.Dense and not _quantized(layer):
        return reading_rows(_dense)
    if (kind is keras.layers.Conv2D and _channels_last(layer) and layer.groups == 1
            and not _quantized(layer)):
        return reading_rows(_conv2d)
    return whole


_OWN_CALL = "own call"  # a layer run eagerly on its own (an activation)


def _native_step(layer):
    """How `layer` runs in the native chain: `"op"` (a layer of the chain
    op, `chain_from_variables`), None (an identity at inference),
    `_OWN_CALL`, or False where it has no native step."""
    kind = type(layer)
    if _runs_in_chain(layer):
        return "op"
    if kind in INFERENCE_IDENTITY:
        return None
    if kind in ACTIVATION_LAYERS:
        return _OWN_CALL
    return False


def _native_chain(chain, source):
    """A function running `chain` at any batch size as eager calls of the native
    ops, or None: the native kernels are not in use, or a layer of the
    chain has no native step (a convolution, say), or the input is not a
    float32 vector. Consecutive GatedDense and Dense layers run as one op
    call (about 50 us each right after another model's call; calling a
    graph costs about 0.2 ms); an activation layer, or a Dense layer's
    activation other than ReLU and linear, ends the op's layers."""
    if source.dtype != "float32" or len(source.shape) != 2:
        return None
    if not any(isinstance(layer, GatedDense) for layer in chain):
        return None
    if load_native_kernels() is None:
        return None
    kinds = [_native_step(layer) for layer in chain]
    if False in kinds:
        return None
    steps, run = [], []
    for layer, kind in zip(chain, kinds):
        if kind is None:
            continue
        if kind == "op":
            run.append(layer)
            if native_activation(layer.activation) is not None:
                continue
        if run:
            steps.append(chain_from_variables(run))
            run = []
        if kind == _OWN_CALL:
            steps.append(layer.call)  # each value alone: the Keras call's bookkeeping skipped
    if run:
        steps.append(chain_from_variables(run))

    def forward(x):
        # Arrays reach the op as float32 numpy arrays, which its call
        # converts in C++: tf.convert_to_tensor took about 50 us of a 0.2 ms
        # batch-1 call (one thread, the Bengio MLP), and tf.cast about as
        # much.
        if isinstance(x, tf.Tensor):
            x = tf.cast(x, tf.float32)
        else:
            x = np.asarray(x, dtype=np.float32)  # no copy of a float32 array
        for step in steps:
            x = step(x)
        return x

    return forward


def _loop_limit(chain):
    """The largest fraction of active pairs in the first gated layer at
    which a batch loops over its examples, or None when it never does: the
    chain's gated convolutions too small, or holding fewer multiply-adds
    than its GatedDense layers (static; None for an unknown image size)."""
    conv_macs = dense_macs = 0
    for layer in chain:
        if isinstance(layer, GatedConv2D):
            rows, cols = layer.output.shape[1:3] if _channels_last(layer) else (None, None)
            if rows is None or cols is None:
                return None
            conv_macs += rows * cols * math.prod(layer.kernel.shape)
        elif isinstance(layer, GatedDense):
            dense_macs += math.prod(layer.kernel.shape)
    least = LOOP_LARGE_MACS if intra_op_threads() > 1 else LOOP_MIN_MACS
    if conv_macs < least or conv_macs <= dense_macs:
        return None
    return LOOP_LARGE_MAX_FRACTION if conv_macs >= LOOP_LARGE_MACS else LOOP_MAX_FRACTION


def _chain(model):
    """The layers of `model` in order, checked to form a single chain."""
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            "`model` must be a built Keras model (Sequential or functional). "
            f"Received: model={model!r}"
        )
    if not getattr(model, "inputs", None):
        raise ValueError(
            "`compact_inference` follows the layer graph of a Sequential or functional "
            f"model; a subclassed model has none. Received: {model.name!r} "
            f"({type(model).__name__})"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "`compact_inference` supports models with one input and one output. "
            f"Received: {model.name!r} with {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs"
        )
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    expected = model.inputs[0]
    for layer in chain:
        try:
            source = layer.input
        except (AttributeError, ValueError):
            source = None  # a layer called more than once
        if isinstance(layer, keras.Model):
            raise ValueError(
                "`compact_inference` runs the layers of one model: flatten the nested "
                f"model {layer.name!r} of {model.name!r} into it (a Sequential model of its "
                "layers, say)."
            )
        if source is not expected:
            raise ValueError(
                "`compact_inference` supports models whose layers form a single "
                "chain, each reading the output of the one before (no branches "
                f"or shared layers). Received: layer {layer.name!r} "
                f"of {model.name!r} reads {source!r}, not the output of the layer "
                "before it"
            )
        expected = layer.output
    if expected is not model.outputs[0]:
        raise ValueError(
            "`compact_inference` supports models whose layers form a single chain. "
            f"Received: the output of {model.name!r} is not its last layer's"
        )
    for layer in chain:
        if isinstance(layer, (GatedConv2D, GatedDense)) and layer.compute_dtype != "float32":
            raise ValueError(
                "`compact_inference` runs float32 gated layers. Received: layer "
                f"{layer.name!r} with compute dtype {layer.compute_dtype!r}"
            )
    return chain


def compact_inference(model):
    """A callable equal to `model(x, training=False)`, faster on few examples.

    At batch 1 every gated layer computes only its active blocks and hands
    them on as they are, with their indices, instead of placing them among
    zeros: layers acting on each channel alone (pooling, global pooling,
    dropout, ReLU and other activations that keep 0 at 0) run on the
    computed blocks only, `Flatten` keeps track of them, and the next gated
    layer, `Dense` or `Conv2D` reads only the rows of its kernel that
    multiply them. Zeros are placed only before any other layer
    (`BatchNormalization`, ...) and at the output. A `GatedDense` computes
    its dense product instead where skipping cannot pay: when its active
    blocks would read half of its kernel, or when it is too small
    (`"auto"`'s batch-1 rule, `keras_condcomp.ops.set_cost_constants`).
    The masks are the layers' own decisions (their policies read the same
    states), so the outputs equal the model's up to float rounding.

    A chain of only `GatedDense` (threshold inference, ReLU or linear, path
    `"auto"` or `"native"`), `Dense`, dropout-like and activation layers on
    a vector input runs at every batch size on the native kernels instead
    (`keras_condcomp.ops.native_kernels`), where they are built: one eager op
    call for its consecutive dense layers (each gated layer's policy,
    decision and active blocks, reading only the kernel rows of non-zero
    inputs), no graph call. Bengio CIFAR-10 MLP, one thread: at density
    1/16 several times as fast as the Dense stack (batch 1, 50 and 256), and
    faster than the model's own graph up to density 3/4 (the guide "How
    skipping runs fast" has the measured tables).

    Any other model runs its own inference graph above batch 1, each gated
    layer on its execution path (`keras_condcomp.ops`), except for a chain
    of large gated convolutions, whose examples then run one after another
    through the compact chain while few of the first gated layer's groups
    are active (`LOOP_MIN_MACS`, `LOOP_LARGE_MACS`, `LOOP_MAX_FRACTION`,
    `LOOP_LARGE_MAX_FRACTION` in this module).

    Args:
        model: a built Keras model (Sequential or functional) with one input
            and one output, whose layers form a single chain (no branches or
            shared layers), on the TensorFlow backend. Gated layers must
            compute in float32; a channels-first `GatedConv2D` runs as a
            layer (its output placed).

    Returns:
        A function of one argument, the model's input batch `x` (an array
        or tensor), returning a tensor; it raises a `ValueError` naming `x`
        when `x`'s shape does not match the model's input. On the native
        chain an array goes to the op as a float32 numpy array (no copy
        when it is one; the op's call converts it in C++) and a tensor
        cast to float32. It calls the
        native chain's ops, or else one of two graphs, each traced once and
        called as a concrete function (cheaper to call than a
        `tf.function`): the chain for a batch of 1, the other for any other
        batch size. (One graph holding both behind a `tf.cond` on the batch
        size computed the other batch sizes wrongly: TensorFlow 2.21's
        constant folding carried the batch-1 branch's static shapes into it.)

    Raises:
        ValueError: `model` is not such a chain, or has a gated layer in
            another dtype.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.layers import GatedConv2D
        >>> model = keras.Sequential([
        ...     keras.Input((8, 8, 3)),
        ...     GatedConv2D(16, 3, blocks=4, padding="same", activation="relu", seed=1),
        ...     keras.layers.MaxPooling2D(),
        ...     GatedConv2D(16, 3, blocks=4, padding="same", activation="relu", seed=2),
        ...     keras.layers.GlobalAveragePooling2D(),
        ...     keras.layers.Dense(10),
        ... ])
        >>> predict = compact_inference(model)
        >>> x = np.random.rand(1, 8, 8, 3).astype("float32")
        >>> bool(np.allclose(predict(x), model(x, training=False), atol=1e-5))
        True
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "`compact_inference` needs the TensorFlow backend. "
            f"Received: backend {keras.backend.backend()!r}"
        )
    chain = _chain(model)
    steps = [_step(layer) for layer in chain]
    source, output = model.inputs[0], model.outputs[0]
    native = _native_chain(chain, source)

    def run_chain(value, steps):
        for step in steps:
            value = step(value)
        return _full(value)

    # No autograph: the graphs have no Python control flow on tensors, and
    # autograph would convert them from their source text.
    single = tf.function(
        lambda x: run_chain(x, steps),
        input_signature=[tf.TensorSpec([1, *source.shape[1:]], source.dtype)],
        autograph=False,
    )
    batch_spec = tf.TensorSpec([None, *source.shape[1:]], source.dtype)
    first = next(
        (i for i, layer in enumerate(chain) if isinstance(layer, (GatedConv2D, GatedDense))), None
    )
    limit = None if first is None or None in output.shape[1:] else _loop_limit(chain)
    if limit is None:
        batched = tf.function(
            lambda x: keras.tree.flatten(model(x, training=False))[0],
            input_signature=[batch_spec], autograph=False,
        )
    else:
        example_spec = tf.TensorSpec(output.shape[1:], output.dtype)

        @tf.function(input_signature=[batch_spec], autograph=False)
        def batched(x):
            for layer in chain[:first]:
                x = layer(x, training=False)
            mask = chain[first]._decide(x, training=False)[1]

            def loop():
                return tf.map_fn(
                    lambda example: run_chain(example[None], steps[first:])[0],
                    x, fn_output_signature=example_spec,
                )

            def layers():
                h = x
                for layer in chain[first:]:
                    h = layer(h, training=False)
                return h

            # An empty batch's mean is NaN: the layers.
            fraction = tf.reduce_mean(tf.cast(mask, tf.float32))
            return tf.cond(fraction <= limit, loop, layers)

    # Their concrete functions: a call skips the `tf.function`'s dispatch
    # (about 0.1 ms a call). Every batch runs the native chain where there is one.
    single = native or single.get_concrete_function()
    batched = native or batched.get_concrete_function()

    expected = tuple(source.shape)
    # The chain's one output tensor, returned in the structure the model
    # returns it in (a dict; Keras gives a one-item list as the tensor).
    try:
        structure = model.output
    except AttributeError:  # a Sequential model built without an Input: a tensor
        structure = None
    if isinstance(structure, (list, tuple)) and len(structure) == 1:
        structure = structure[0]

    nested = keras.tree.is_nested(structure)
    features = expected[1:]
    known = [(axis, size) for axis, size in enumerate(features, 1) if size is not None]

    def predict(x):
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        if len(shape) != len(expected) or any(shape[axis] != size for axis, size in known):
            raise ValueError(
                f"`x` must have shape (batch, {', '.join(map(str, features))}) to match "
                f"the model's input. Received: x.shape={shape}"
            )
        result = single(x) if shape[0] == 1 else batched(x)
        return keras.tree.pack_sequence_as(structure, [result]) if nested else result

    return predict
