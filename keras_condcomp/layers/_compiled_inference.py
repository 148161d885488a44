"""An eager inference call of a gated layer run as one compiled graph (private).

Called eagerly (`layer(x)`, `model(x)` outside any `tf.function`), a Keras
layer runs each op of its `call`, and its policy sub-layer's `__call__`, from
Python, one by one. For a gated layer that costs more than the skipping saves
at small batches: Bengio CIFAR-10 MLP (3072 -> 2 x GatedDense(1536, blocks=24) ->
10), batch 1, density 1/16, one thread, eager `model(x)` against the
same-width Dense model called eagerly, in one process: 0.72x-0.75x as fast
op by op, 1.24x-1.28x run as one compiled graph per layer (the policy, the
decision and the skipping engine).

The graph reads the layer's weights through `keras.StatelessScope` from
arguments rather than capturing them, so it also serves calls made inside a
stateless scope (`layer.stateless_call`), where the values Keras hands a
layer are not its variables.
"""

import keras
import tensorflow as tf

from keras_condcomp.layers.decision_recorder import current_recorder
from keras_condcomp.ops import forced_execution_path
from keras_condcomp.ops.block_sparse_conv2d import trace_settings as conv2d_trace_settings
from keras_condcomp.ops.block_sparse_dense import trace_settings as dense_trace_settings
from keras_condcomp.ops.static_budget_dense import static_budget_settings


def plain_inference(layer, training):
    """Whether a call of `layer` is plain deterministic inference: on
    TensorFlow, with no decision recorder listening (`PolicyGradientModel`'s
    steps), no export plan, and weights kept in the compute dtype (under
    mixed precision Keras hands a layer its weights cast, and the float32
    policy would read them rounded). Such a call may run the policy and the
    skipping as one unit; everything else goes through `call` as written.
    """
    return (
        not training
        and layer.inference == "threshold"
        and layer.compute_dtype == layer.variable_dtype
        and keras.backend.backend() == "tensorflow"
        and current_recorder() is None
        and static_budget_settings(layer) is None
    )


def compiled_inference_applies(layer, training):
    """Whether an eager call of `layer` runs as one compiled graph: plain
    inference (`plain_inference`) outside any graph."""
    return plain_inference(layer, training) and not tf.inside_function()


def compiled_inference(layer, inputs):
    """`layer.call(inputs, training=False)` as one compiled graph.

    One concrete graph per execution path in effect (the layer's
    `execution` or a `forced_execution`), input dtype and feature shape,
    kind of weight values, and settings the engines' `"auto"` rules read
    (`set_cost_constants`, the thread count); any batch size.
    """
    inputs = tf.convert_to_tensor(inputs)
    weights = layer.weights
    values = [w.value for w in weights]
    key = (
        forced_execution_path(), layer.execution, inputs.dtype, tuple(inputs.shape[1:]),
        tuple((isinstance(v, tf.Variable), v.dtype) for v in values),
        dense_trace_settings(), conv2d_trace_settings(),
    )
    # Kept out of Keras's attribute tracking (which would wrap the dict): the
    # graphs are a cache, not state to save.
    graphs = layer.__dict__.setdefault("_compiled_inference_graphs", {})
    if key not in graphs:

        def run(inputs, values):
            with keras.StatelessScope(state_mapping=list(zip(weights, values))):
                return layer.call(inputs, training=False)

        # No AutoGraph (as in Keras's own `predict` step): the layers' code has
        # no Python control flow on tensors, and converting it from its source
        # text made a first call 17x-63x slower (engine guide).
        graphs[key] = tf.function(run, autograph=False).get_concrete_function(
            tf.TensorSpec([None, *inputs.shape[1:]], inputs.dtype),
            # Variables are passed as themselves (their handle, no read op).
            [v if isinstance(v, tf.Variable) else tf.TensorSpec(v.shape, v.dtype)
             for v in values],
        )
    return graphs[key](inputs, values)
