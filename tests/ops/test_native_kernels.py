import importlib
import os
import re
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keras_condcomp.layers import GatedDense
from keras_condcomp.models import compact_inference
from keras_condcomp.ops import (
    block_sparse_dense,
    forced_execution,
    load_native_kernels,
    masked_block_dense,
    native_kernels_error,
    to_block_kernel,
)
from keras_condcomp.ops import native_kernels
from keras_condcomp.ops.native_kernels import (
    build_native_kernels,
    native_dense,
    native_gated_dense,
)
from tests.ops.conftest import graph_op_types, random_block_problem, unit_scale_kernel

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler to build the native kernels", allow_module_level=True)


def _relu_or_linear(name):
    return keras.activations.get(name)


def test_the_kernels_build_and_load():
    # A machine with a compiler must get them: a failed build fails here.
    assert load_native_kernels() is not None, native_kernels_error()
    assert native_kernels_error() is None


@settings(max_examples=40, deadline=None)
@given(
    batch=st.sampled_from([1, 2, 7, 64]),
    blocks=st.sampled_from([1, 3, 8, 24]),
    block_size=st.sampled_from([1, 5, 8, 16, 64, 80]),  # 80: in pieces of 64 and 16
    input_dim=st.sampled_from([1, 12, 40, 100, 300]),  # 100, 300: several words of bits
    input_sparsity=st.sampled_from([0.0, 0.7, 1.0]),
    policy_bias=st.sampled_from([-100.0, -1.0, 0.0, 1.0, 100.0]),
    activation=st.sampled_from(["relu", "linear"]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gated_dense_op_matches_the_masked_reference(
    batch, blocks, block_size, input_dim, input_sparsity, policy_bias, activation, use_bias, seed
):
    # The op's own threshold decision, then the masked product; a bias of
    # -100 or 100 turns every block off or on.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    x[rng.random(x.shape) < input_sparsity] = 0.0
    policy_kernel = rng.normal(size=(input_dim, blocks)).astype("float32")
    bias_of_policy = (policy_bias + rng.normal(size=blocks)).astype("float32")
    logits = x.astype("float64") @ policy_kernel + bias_of_policy
    assume(np.all(np.abs(logits) > 1e-3))  # no decision within rounding of 0
    mask = (logits > 0).astype("float32")
    kernel = unit_scale_kernel(rng, input_dim, blocks * block_size)
    bias = rng.normal(size=blocks * block_size).astype("float32") if use_bias else None
    function = _relu_or_linear(activation)
    expected = masked_block_dense(x, kernel, bias, mask, function).numpy()
    got = native_gated_dense(
        x, policy_kernel, bias_of_policy, to_block_kernel(kernel, blocks), bias, function
    ).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size, input_dim", [(64, 1100), (8, 4200)])
def test_blocks_of_many_dense_tiles_are_multiplied_in_chunks_of_rows(
    block_size, input_dim, rng
):
    # More than one tile of dense inputs in a block: 128 KB of the block's
    # rows (512 rows of 64 units, 4096 of 8) for every tile, then the next
    # rows; the last chunk shorter. The first 16 examples' inputs are 10%
    # non-zero: a block's first tiles hold only them and keep their own
    # pass over the rows they use.
    batch, blocks = 48, 3
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    x[:16] *= rng.random((16, input_dim)) < 0.1
    kernel = unit_scale_kernel(rng, input_dim, blocks * block_size)
    bias = rng.normal(size=blocks * block_size).astype("float32")
    mask = (rng.random((batch, blocks)) < 0.8).astype("float32")
    relu = keras.activations.relu
    got = native_kernels.native_block_sparse_dense(
        x, to_block_kernel(kernel, blocks), bias, mask, relu
    )
    expected = masked_block_dense(x, kernel, bias, mask, relu).numpy()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def check_a_large_batch_against_the_reference(batch, rng):
    """The fused op on 1100 inputs x 16 blocks of 8: above batch 238 the
    policy's products reach 4M multiply-adds, and its chunks of about 12
    examples are shared among the intra-op threads where there are several,
    as are the blocks' products. Examples 0-99 are 3% non-zero (their own
    rows), the rest dense. Returns the inputs and the Dense kernel and bias."""
    input_dim, blocks, block_size = 1100, 16, 8
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    x[:100] *= rng.random((100, input_dim)) < 0.03
    policy_kernel = unit_scale_kernel(rng, input_dim, blocks)
    policy_bias = rng.normal(size=blocks).astype("float32")
    kernel = unit_scale_kernel(rng, input_dim, blocks * block_size)
    bias = rng.normal(size=blocks * block_size).astype("float32")
    relu = keras.activations.relu
    outputs, mask, computed = native_kernels.native_gated_dense_or_fallback(
        x, policy_kernel, policy_bias, to_block_kernel(kernel, blocks), bias, relu
    )
    logits = x.astype("float64") @ policy_kernel + policy_bias
    clear = np.abs(logits) > 1e-4  # else within float32 rounding of 0
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(mask.numpy()[clear], (logits > 0)[clear])
    assert 0.2 < mask.numpy().mean() < 0.8 and bool(computed.numpy())
    expected = masked_block_dense(x, kernel, bias, mask.numpy(), relu).numpy()
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-5, atol=1e-5)
    return x, kernel, bias


@pytest.mark.parametrize("batch", [300, 301])
def test_the_policy_of_a_large_batch_decides_each_chunk_of_examples_as_the_reference(batch, rng):
    # 301 makes chunks of 11 and 12.
    check_a_large_batch_against_the_reference(batch, rng)


# Run in a fresh process: TensorFlow's thread counts are set before it starts.
_MANY_THREADS_SCRIPT = """
import sys
import keras, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(8)
tf.config.threading.set_inter_op_parallelism_threads(2)
sys.path.insert(0, sys.argv[1])
from keras_condcomp.ops import masked_block_dense, to_block_kernel
from keras_condcomp.ops import native_kernels
from tests.ops.test_native_kernels import check_a_large_batch_against_the_reference
rng = np.random.default_rng(0)
x, kernel, bias = check_a_large_batch_against_the_reference(300, rng)
random_mask = (rng.random((300, 16)) < 0.6).astype("float32")
relu = keras.activations.relu
got = native_kernels.native_block_sparse_dense(
    x, to_block_kernel(kernel, 16), bias, random_mask, relu)
expected = masked_block_dense(x, kernel, bias, random_mask, relu).numpy()
np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
print("exact on", tf.config.threading.get_intra_op_parallelism_threads(), "threads")
"""


def test_the_ops_are_exact_with_their_work_shared_among_eight_threads():
    # CI machines have two intra-op threads, so eight (oversubscribed) take
    # the sharing's paths of more: wakes as a tree, runs of threads that
    # help in the others'.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-c", _MANY_THREADS_SCRIPT, root], capture_output=True, text=True,
        timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exact on 8 threads" in done.stdout


def test_the_ops_refuse_an_activation_they_cannot_apply(rng):
    # The op's attribute would otherwise be left linear: a silent wrong result.
    x = rng.normal(size=(4, 8)).astype("float32")
    kernel = rng.normal(size=(8, 6)).astype("float32")
    mask = np.ones((4, 2), "float32")
    calls = [
        lambda: native_dense(x, kernel, None, tf.nn.relu),
        lambda: native_kernels.native_block_sparse_dense(
            x, to_block_kernel(kernel, 2), None, mask, tf.nn.relu
        ),
        lambda: native_gated_dense(
            x, kernel[:, :2], np.zeros(2, "float32"), to_block_kernel(kernel, 2), None,
            keras.activations.sigmoid,
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="Received: activation=<function"):
            call()
    np.testing.assert_allclose(
        native_dense(x, kernel, None, keras.activations.relu).numpy(),
        np.maximum(x @ kernel, 0), rtol=1e-5, atol=1e-5,
    )


def test_the_ops_take_activation_names_as_keras_layers_do(rng):
    x = rng.normal(size=(4, 8)).astype("float32")
    kernel = rng.normal(size=(8, 6)).astype("float32")
    mask = np.ones((4, 2), "float32")
    for name, expected in (("relu", np.maximum(x @ kernel, 0)), ("linear", x @ kernel)):
        np.testing.assert_allclose(
            native_dense(x, kernel, None, name).numpy(), expected, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            native_kernels.native_block_sparse_dense(
                x, to_block_kernel(kernel, 2), None, mask, name
            ).numpy(),
            expected, rtol=1e-5, atol=1e-5,
        )
    for name in ("tanh", "no_such_activation"):
        with pytest.raises(ValueError, match=f"Received: activation='{name}'"):
            native_dense(x, kernel, None, name)


def test_tiles_of_inputs_a_fifth_non_zero_read_every_row_or_the_union_of_theirs(rng):
    # Examples 0-17: a quarter of their inputs non-zero anywhere (tiled as
    # dense inputs; a tile's union is most rows, so it reads every row).
    # Examples 18-35: a quarter non-zero within the first 40% of the rows
    # (tiled as dense inputs, but a tile's union is under two thirds: its
    # rows are listed). Examples 36-47: 3% non-zero (sparse tiles of four),
    # beside four of 18-35 in block 1.
    batch, input_dim, block_size = 48, 600, 16
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    x[:18] *= rng.random((18, input_dim)) < 0.25
    x[18:36] *= np.arange(input_dim) < 240
    x[18:36] *= rng.random((18, input_dim)) < 0.625
    x[36:] *= rng.random((12, input_dim)) < 0.03
    mask = np.zeros((batch, 2), "float32")
    mask[:36, 0] = 1.0
    mask[18:22, 1] = mask[36:, 1] = 1.0
    kernel = unit_scale_kernel(rng, input_dim, 2 * block_size)
    bias = rng.normal(size=2 * block_size).astype("float32")
    relu = keras.activations.relu
    got = native_kernels.native_block_sparse_dense(
        x, to_block_kernel(kernel, 2), bias, mask, relu
    )
    expected = masked_block_dense(x, kernel, bias, mask, relu).numpy()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("units", [7, 10, 40, 64, 96, 100, 128, 200])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_dense_op_matches_a_dense_product(units, batch, rng):
    # 96 and 128 units: one block; 100: a block of 64 columns and a rest of
    # 36; 200: three blocks of 64 and a rest of 8.
    x = rng.normal(size=(batch, 50)).astype("float32")
    x[:, 10:40] = 0.0  # the rows of zero inputs are skipped
    x[0] = 0.0
    kernel = rng.normal(size=(50, units)).astype("float32")
    bias = rng.normal(size=units).astype("float32")
    relu = keras.activations.relu
    np.testing.assert_allclose(
        native_dense(x, kernel, bias, relu).numpy(), np.maximum(x @ kernel + bias, 0),
        rtol=1e-5, atol=1e-5,
    )
    np.testing.assert_allclose(native_dense(x, kernel, None).numpy(), x @ kernel,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("units", [5, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256])
@pytest.mark.parametrize("batch", [7, 12, 13, 24])
def test_dense_op_on_dense_inputs_shares_a_pass_among_up_to_twelve_examples(units, batch, rng):
    # Dense inputs: tiles of up to 12 examples up to 16 units and at 32
    # (batches 7, 12, 13 and 24: tiles of 7, 12, 6 and 7, 12), up to 8 at
    # 24, 40 and 48 (7, 6, 6 and 7, 8), 6 from 64 up (3 and 4; 6; 4, 4
    # and 5; 6); masked vectors at 5 and 40; 96, 128 and 256 in pieces of
    # 64 (96: 64 and 32). Without AVX-512 fewer sums fit the registers:
    # tiles of up to 6 in pieces of 16 units from 24 up (40: 16, 16 and 8).
    x = rng.normal(size=(batch, 40)).astype("float32")
    kernel = unit_scale_kernel(rng, 40, units)
    np.testing.assert_allclose(native_dense(x, kernel, None).numpy(), x @ kernel,
                               rtol=1e-5, atol=1e-5)


def test_block_sparse_op_is_the_engines_native_path(rng):
    kernel = rng.normal(size=(16, 12)).astype("float32")
    x = rng.normal(size=(3, 16)).astype("float32")
    mask = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], "float32")
    expected = masked_block_dense(x, kernel, None, mask, tf.nn.relu).numpy()
    got = block_sparse_dense(x, to_block_kernel(kernel, 4), None, mask, tf.nn.relu, path="native")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert np.all(got.numpy()[0] == 0.0)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(policy_kernel=np.zeros((8, 3), "float32")), "policy_kernel must be \\(8, 4\\)"),
        (dict(policy_bias=np.zeros(5, "float32")), "policy_bias must be \\(4,\\)"),
        (dict(bias=np.zeros(7, "float32")), "bias must be \\(8,\\) or empty"),
        (dict(inputs=np.zeros((2, 9), "float32")), "inputs must be \\(batch, 8\\)"),
    ],
)
def test_gated_dense_op_names_a_wrong_shape(arguments, message):
    values = dict(
        inputs=np.zeros((2, 8), "float32"), policy_kernel=np.zeros((8, 4), "float32"),
        policy_bias=np.zeros(4, "float32"), block_kernel=np.zeros((4, 8, 2), "float32"),
        bias=np.zeros(8, "float32"),
    )
    values.update(arguments)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        native_gated_dense(**values)


def test_block_sparse_op_names_a_wrong_mask():
    ops = load_native_kernels()
    with pytest.raises(tf.errors.InvalidArgumentError, match="block_mask must be \\(2, 4\\)"):
        ops.keras_condcomp_block_sparse_dense(
            np.zeros((2, 8), "float32"), np.zeros((4, 8, 2), "float32"),
            np.zeros(0, "float32"), np.zeros((2, 3), "float32"),
        )


def _model(activation="relu", head_activation=None, blocks=8):
    inputs = keras.Input((32,))
    h = GatedDense(64, blocks=blocks, activation="relu", seed=1,
                   policy_bias_initializer=keras.initializers.Constant(0.2))(inputs)
    h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.ReLU()(h)
    h = GatedDense(64, blocks=blocks, activation=activation, seed=2)(h)
    return keras.Model(inputs, keras.layers.Dense(10, activation=head_activation)(h))


def _masked_outputs(model, x):
    with forced_execution("masked"):
        return tf.function(lambda x: model(x, training=False))(x).numpy()


def test_an_eager_call_at_batch_1_runs_the_fused_op(rng, monkeypatch):
    model = _model()
    x = rng.normal(size=(1, 32)).astype("float32")
    expected = _masked_outputs(model, x)
    from keras_condcomp.layers import gated_dense

    def refuse(layer, inputs):
        raise AssertionError("ran the compiled graph")

    monkeypatch.setattr(gated_dense, "compiled_inference", refuse)
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, atol=1e-5)


def test_compact_inference_runs_an_mlp_on_the_native_ops(rng, monkeypatch):
    from keras_condcomp.models import compact_chain

    chains, calls = [], []
    made = compact_chain.chain_from_variables

    def counted(layers):
        chains.append([type(layer).__name__ for layer in layers])
        call = made(layers)
        return lambda x: calls.append(1) or call(x)

    monkeypatch.setattr(compact_chain, "chain_from_variables", counted)
    for head_activation in (None, "sigmoid"):  # sigmoid: applied to the op's output
        model = _model(head_activation=head_activation)
        predict = compact_inference(model)
        for row in rng.normal(size=(5, 32)).astype("float32"):
            x = row[None]
            np.testing.assert_allclose(predict(x).numpy(), _masked_outputs(model, x), atol=1e-5)
        batch = rng.normal(size=(4, 32)).astype("float32")
        np.testing.assert_allclose(predict(batch).numpy(), _masked_outputs(model, batch),
                                   atol=1e-5)
    # Dropout left out, the ReLU layer on its own: two op calls a batch,
    # the batch of four as the single examples.
    assert chains == [["GatedDense"], ["GatedDense", "Dense"]] * 2
    assert len(calls) == 2 * (5 + 1) * 2
    # The ops read the variables: new weights reach the next call.
    layer = model.layers[1]
    layer.block_kernel.assign(2 * layer.block_kernel)
    x = rng.normal(size=(1, 32)).astype("float32")
    np.testing.assert_allclose(predict(x).numpy(), _masked_outputs(model, x), atol=1e-5)


def test_compact_inference_on_the_native_ops_takes_any_array_like(rng):
    # Arrays go to the op as float32 numpy arrays, tensors cast to float32.
    model = _model()
    predict = compact_inference(model)
    wide = rng.normal(size=(3, 64))
    x = wide[:, ::2].astype("float32")  # contiguous
    expected = _masked_outputs(model, x)
    for given in (x, wide[:, ::2], np.asfortranarray(x), x.astype("float64"), x.tolist(),
                  tf.constant(x), tf.constant(x, tf.float64), tf.Variable(x)):
        np.testing.assert_allclose(predict(given).numpy(), expected, atol=1e-5)
    strided = wide.astype("float32")[:, ::2]  # float32, not contiguous
    np.testing.assert_allclose(predict(strided).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(predict(strided[:1]).numpy(), expected[:1], atol=1e-5)


def test_chain_op_runs_a_whole_mlp_in_one_call(rng):
    inputs = keras.Input((32,))
    h = GatedDense(64, blocks=8, activation="relu", seed=1,
                   policy_bias_initializer=keras.initializers.Constant(0.2))(inputs)
    h = keras.layers.Dense(48, activation="relu")(h)
    h = GatedDense(64, blocks=4, seed=2)(h)  # linear
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    run = native_kernels.chain_from_variables(model.layers[1:])
    for batch in (1, 2, 7):
        x = rng.normal(size=(batch, 32)).astype("float32")
        np.testing.assert_allclose(run(x).numpy(), _masked_outputs(model, x), atol=1e-5)


def test_chain_op_names_a_layer_it_cannot_run():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="sigmoid", name="squash")
    conv = keras.layers.Conv1D(4, 1, name="conv")
    keras.Model(inputs, keras.layers.Dense(2)(hidden(inputs)))
    with pytest.raises(ValueError, match="last Dense.*'squash'.*sigmoid"):
        native_kernels.chain_from_variables([hidden, keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="float32 Dense.*'conv' of type Conv1D"):
        native_kernels.chain_from_variables([conv])
    # A layer without an activation, as a Functional model's `layers` start.
    with pytest.raises(ValueError, match="float32 Dense.*'entry' of type InputLayer"):
        native_kernels.chain_from_variables([keras.layers.InputLayer((8,), name="entry")])
    half = keras.layers.Dense(2, dtype="mixed_float16", name="half")
    half.build((None, 8))
    with pytest.raises(ValueError, match="float32 Dense.*'half' of type Dense"):
        native_kernels.chain_from_variables([half])
    with pytest.raises(ValueError, match="at least one layer"):
        native_kernels.chain_from_variables([])
    gated = GatedDense(16, blocks=4, activation="sigmoid", name="gated")
    gated.build((None, 8))
    with pytest.raises(ValueError, match="threshold policy.*'gated'.*'sigmoid'"):
        native_kernels.chain_from_variables([gated])


def test_chain_op_names_weights_that_do_not_fit():
    ops = load_native_kernels()
    x = tf.ones((1, 8))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"inputs must be \(batch, 6\)"):
        ops.keras_condcomp_chain(x, [tf.ones((6, 4)), tf.ones((4,))], layers=["dense"],
                                 activations=["relu"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="take 2 weights, got 1"):
        ops.keras_condcomp_chain(x, [tf.ones((8, 4))], layers=["dense"], activations=["relu"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be 'gated_dense' or 'dense'"):
        ops.keras_condcomp_chain(x, [tf.ones((8, 4)), tf.ones((4,))], layers=["conv"],
                                 activations=["relu"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="'relu' or 'linear', got 'tanh'"):
        ops.keras_condcomp_chain(x, [tf.ones((8, 4)), tf.ones((4,))], layers=["dense"],
                                 activations=["tanh"])
    wide = tf.Variable(tf.ones((8, 4), tf.float64))  # a handle the op reads itself
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="variable of input 1 must be float32, got double"):
        ops.keras_condcomp_chain(x, [wide.handle, tf.ones((4,))], layers=["dense"],
                                 activations=["relu"])


def test_compact_inference_keeps_the_graph_chain_for_other_activations(rng, monkeypatch):
    from keras_condcomp.models import compact_chain

    monkeypatch.setattr(compact_chain, "chain_from_variables", None)  # must not be called
    model = _model(activation="sigmoid")
    x = rng.normal(size=(1, 32)).astype("float32")
    np.testing.assert_allclose(compact_inference(model)(x).numpy(), _masked_outputs(model, x),
                               atol=1e-5)


def test_without_the_kernels_auto_runs_tensorflow_ops_and_native_is_refused(
        rng, monkeypatch, tmp_path):
    monkeypatch.setattr(native_kernels, "_state",
                        {"module": None, "error": None, "tried": False})
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setenv("KERAS_CONDCOMP_CACHE_DIR", str(tmp_path))  # no file built before
    with pytest.warns(UserWarning, match="could not be built.*no C\\+\\+ compiler"):
        assert load_native_kernels() is None
    assert "no-such-compiler-here" in native_kernels_error()
    model = _model()
    x = rng.normal(size=(3, 32)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        got = tf.function(lambda x: model(x, training=False))(x).numpy()
    np.testing.assert_allclose(got, _masked_outputs(model, x), atol=1e-5)
    with pytest.raises(RuntimeError, match="native kernels.*not available.*no C\\+\\+ compiler"):
        block_sparse_dense(x, np.zeros((4, 32, 2), "float32"), None,
                           np.ones((3, 4), "float32"), path="native")


def test_keras_condcomp_native_0_turns_them_off(monkeypatch):
    monkeypatch.setattr(native_kernels, "_state",
                        {"module": None, "error": None, "tried": False})
    monkeypatch.setenv("KERAS_CONDCOMP_NATIVE", "0")
    assert load_native_kernels() is None
    assert "KERAS_CONDCOMP_NATIVE=0" in native_kernels_error()


def test_a_failed_build_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_CONDCOMP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    with pytest.raises(RuntimeError, match="compiling gated_dense.cc failed"):
        build_native_kernels()
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("tmp*"))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler: 'no-such-compiler-here'"):
        build_native_kernels()


def test_a_file_that_does_not_load_is_built_again(monkeypatch, tmp_path):
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a shared library")
    built = build_native_kernels()  # the real one, already built
    forced = []

    def build(force=False):
        forced.append(force)
        return built if force else broken

    monkeypatch.setattr(native_kernels, "build_native_kernels", build)
    assert hasattr(native_kernels._load(), "keras_condcomp_gated_dense")
    assert forced == [False, True]


_PREBUILT_SCRIPT = """
import warnings
import numpy as np
from keras_condcomp.ops.native_kernels import (
    load_native_kernels, native_dense, native_vector_lanes)
warnings.simplefilter("error")  # no warning that the kernels are missing
assert load_native_kernels() is not None
rng = np.random.default_rng(0)
x, kernel, bias = (rng.normal(size=shape).astype("float32") for shape in ((3, 5), (5, 4), (4,)))
np.testing.assert_allclose(native_dense(x, kernel, bias, "relu").numpy(),
                           np.maximum(x @ kernel + bias, 0), rtol=1e-5, atol=1e-5)
print(f"loaded without a compiler, {native_vector_lanes()} lanes")
"""


def _load_without_a_compiler(cache):
    """What `_PREBUILT_SCRIPT` prints in a fresh process (this one has the
    kernels loaded) without a compiler, with the kernels' cache `cache`."""
    done = subprocess.run(
        [sys.executable, "-c", _PREBUILT_SCRIPT], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CXX": "no-such-compiler-here",
             "KERAS_CONDCOMP_CACHE_DIR": str(cache)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(cache.glob("*.so"))) == 1  # nothing built there
    return done.stdout


def test_without_a_compiler_kernels_built_elsewhere_and_copied_load(tmp_path):
    # A slim container: the kernels built where a compiler is, the file
    # copied into its cache.
    shutil.copy(build_native_kernels(), tmp_path)
    assert "loaded without a compiler" in _load_without_a_compiler(tmp_path)


@pytest.mark.skipif("x86-64-v3" not in native_kernels._supported_architectures(),
                    reason="an x86-64 CPU with AVX2 runs a portable x86-64-v3 build")
def test_a_portable_build_loads_without_a_compiler(monkeypatch, tmp_path):
    # Built for AVX2 (8 lanes) whatever this CPU has; no file for this CPU.
    monkeypatch.setenv("KERAS_CONDCOMP_CACHE_DIR", str(tmp_path))
    build_native_kernels(architecture="x86-64-v3")
    assert "loaded without a compiler, 8 lanes" in _load_without_a_compiler(tmp_path)


def test_without_a_compiler_the_file_for_this_cpu_is_loaded_else_the_widest_it_runs(
        monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_CONDCOMP_CACHE_DIR", str(tmp_path))
    avx2 = ("fpu cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma abm "
            "movbe xsave")
    monkeypatch.setattr(native_kernels, "_cpu_flags", lambda: avx2)
    assert native_kernels._supported_architectures() == ["x86-64-v3", "x86-64-v2"]
    monkeypatch.setattr(native_kernels, "_cpu_flags", lambda: avx2.replace(" fma", ""))
    assert native_kernels._supported_architectures() == ["x86-64-v2"]
    monkeypatch.setattr(native_kernels, "_cpu_flags", lambda: avx2)

    def built(architecture):
        path = tmp_path / f"gated_dense-{native_kernels._platform_key(architecture)}-0.so"
        path.write_bytes(b"")
        return path

    built("x86-64-v4")  # this CPU cannot run it
    assert native_kernels._prebuilt_library() is None
    for architecture in ("x86-64-v2", "x86-64-v3", "native"):  # each preferred to the last
        path = built(architecture)
        assert native_kernels._prebuilt_library() == path


def test_without_a_compiler_or_a_built_file_the_error_says_what_to_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_CONDCOMP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    (tmp_path / "gated_dense-0123456789abcdef0123-0123456789ab.so").write_bytes(b"")  # another CPU's
    with pytest.raises(RuntimeError, match=(
            "no C\\+\\+ compiler: 'no-such-compiler-here'.*; nor does "
            + re.escape(str(tmp_path)) + " hold native kernels built for this TensorFlow "
            "version, CPU and keras_condcomp version \\(it holds 1 built for others\\)\\. "
            "Build them with build_native_kernels\\(\\)")):
        native_kernels._load()


def test_a_built_file_is_for_a_cpu_and_tensorflow_not_for_an_install_folder(monkeypatch):
    key = native_kernels._platform_key()
    flags = tf.sysconfig.get_compile_flags()
    moved = ["-I/elsewhere/include" if flag.startswith("-I") else flag for flag in flags]
    assert moved != flags
    monkeypatch.setattr(tf.sysconfig, "get_compile_flags", lambda: moved)
    assert native_kernels._platform_key() == key
    monkeypatch.setattr(tf.sysconfig, "get_compile_flags", lambda: [*moved, "-DOTHER_ABI=1"])
    assert native_kernels._platform_key() != key
    monkeypatch.setattr(tf.sysconfig, "get_compile_flags", lambda: flags)
    monkeypatch.setattr(native_kernels, "_cpu_flags", lambda: "fpu sse2")
    assert native_kernels._platform_key() != key


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_CONDCOMP_CACHE_DIR", str(tmp_path / "kernels"))
    assert native_kernels._cache_dir() == tmp_path / "kernels"
    monkeypatch.delenv("KERAS_CONDCOMP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_kernels._cache_dir() == tmp_path / "keras_condcomp"


@settings(max_examples=30, deadline=None)
@given(
    batch=st.sampled_from([1, 2, 7, 64]),
    blocks=st.sampled_from([1, 2, 4, 8]),
    block_size=st.sampled_from([1, 3, 8, 64]),
    density=st.sampled_from([0.0, 1 / 32, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0]),
    input_dim=st.sampled_from([12, 100, 300]),
    input_sparsity=st.sampled_from([0.0, 0.7, 1.0]),
    activation=st.sampled_from(["relu", "linear", "sigmoid"]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_native_path_matches_the_masked_reference(
    batch, blocks, block_size, density, input_dim, input_sparsity, activation, use_bias, seed
):
    # The engine's "native" path inlined in a graph, as `predict` runs it;
    # sigmoid (not 0 at 0) is applied outside the op, to the active blocks.
    x, kernel, bias, mask = random_block_problem(
        seed, batch, input_dim, blocks, block_size, density, input_sparsity, use_bias
    )
    function = keras.activations.get(activation)
    expected = masked_block_dense(x, kernel, bias, mask, function).numpy()
    run = tf.function(lambda x, mask: block_sparse_dense(
        x, to_block_kernel(kernel, blocks), bias, mask, function, path="native"))
    np.testing.assert_allclose(run(x, mask).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "activation, op",
    [("relu", "keras_condcomp_gated_dense"),  # the policy in the op too
     ("sigmoid", "keras_condcomp_block_sparse_dense")],  # applied outside the op
)
def test_forced_native_overrides_the_layer(activation, op, rng):
    layer = GatedDense(8, blocks=4, activation=activation, execution="per_example")
    x = rng.normal(size=(3, 5)).astype("float32")
    expected = layer(x).numpy()
    calls = []
    ops = load_native_kernels()
    real = getattr(ops, op)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, op, lambda *a, **k: calls.append(1) or real(*a, **k))
        with forced_execution("native"):
            got = tf.function(lambda x: layer(x, training=False))(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert calls  # traced through the native op


@pytest.mark.parametrize("batch", [1, 8])
def test_auto_in_a_graph_runs_the_layer_as_one_op_with_its_policy(batch, rng, monkeypatch):
    # No policy product of TensorFlow's: the op decides the blocks itself.
    # Kernels taken as built for AVX2, two threads: no dense fallback in the
    # graph (its branch has a product; the test below has it).
    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")
    monkeypatch.setattr(engine, "native_vector_lanes", lambda: 8)
    monkeypatch.setattr(engine, "intra_op_threads", lambda: 2)
    inputs = keras.Input((16,))
    model = keras.Model(inputs, GatedDense(32, blocks=4, activation="relu", seed=1)(inputs))
    x = rng.normal(size=(batch, 16)).astype("float32")
    run = tf.function(lambda x: model(x, training=False))
    types = graph_op_types(run, x)
    assert "KerasCondcompGatedDense" in types
    assert "MatMul" not in types and "KerasCondcompBlockSparseDense" not in types
    np.testing.assert_allclose(run(x).numpy(), _masked_outputs(model, x), atol=1e-5)


@pytest.mark.parametrize("open_blocks, computed", [(3, True), (4, False)])
def test_the_fused_op_leaves_nearly_dense_batches_to_the_dense_fallback(
    open_blocks, computed, rng
):
    # Every example has `open_blocks` of 4 blocks active: 3/4 of the pairs
    # are computed by the op, all of them by "auto"'s dense fallback.
    x = np.abs(rng.normal(size=(8, 16))).astype("float32") + 0.1
    policy_kernel = np.zeros((16, 4), "float32")
    policy_bias = np.where(np.arange(4) < open_blocks, 1.0, -1.0).astype("float32")
    kernel = unit_scale_kernel(rng, 16, 8)
    block_kernel = to_block_kernel(kernel, 4)
    outputs, mask, done = native_kernels.native_gated_dense_or_fallback(
        x, policy_kernel, policy_bias, block_kernel, None, keras.activations.relu, 7 / 8
    )
    expected_mask = np.tile((policy_bias > 0).astype("float32"), (8, 1))
    np.testing.assert_array_equal(mask.numpy(), expected_mask)
    assert bool(done.numpy()) is computed
    expected = masked_block_dense(x, kernel, None, expected_mask, tf.nn.relu).numpy()
    np.testing.assert_allclose(outputs.numpy(), expected if computed else 0.0, atol=1e-5)
    # At batch 1 the op computes whatever the density.
    assert bool(native_kernels.native_gated_dense_or_fallback(
        x[:1], policy_kernel, policy_bias, block_kernel, None, None, 7 / 8)[2].numpy())
    # "auto" in a graph: the same outputs either way.
    layer = GatedDense(8, blocks=4, activation="relu")
    layer.build((None, 16))
    layer.block_kernel.assign(block_kernel)
    layer.bias.assign(np.zeros(8, "float32"))
    layer.policy.kernel.assign(policy_kernel)
    layer.policy.bias.assign(policy_bias)
    got = tf.function(lambda x: layer(x, training=False))(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_vector_lanes_are_those_the_cpu_was_built_for(monkeypatch):
    # The kernels are compiled with -march=native.
    expected = 16 if "avx512f" in native_kernels._cpu_flags().split() else 8
    # Read first while autograph traces a graph, as "auto" does: a Python int.
    monkeypatch.setitem(native_kernels._state, "lanes", None)
    seen = []

    @tf.function
    def traced():
        seen.append(native_kernels.native_vector_lanes())
        return tf.constant(0)

    traced()
    assert seen == [expected] and type(seen[0]) is int
    assert native_kernels.native_vector_lanes() == expected
    with native_kernels.native_kernels_disabled("a test"):
        assert native_kernels.native_vector_lanes() is None


@pytest.mark.parametrize("lanes, threads, units, falls_back", [
    (16, 1, 256, False), (16, 2, 32, False), (8, 2, 32, False), (8, 1, 32, False),
    (8, 1, 256, True), (8, 2, 256, False),
])
def test_a_layer_in_a_graph_keeps_the_dense_fallback_only_on_avx2_one_thread_and_wide_blocks(
    lanes, threads, units, falls_back, rng, monkeypatch
):
    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")
    monkeypatch.setattr(engine, "native_vector_lanes", lambda: lanes)
    monkeypatch.setattr(engine, "intra_op_threads", lambda: threads)
    inputs = keras.Input((16,))
    # Blocks of 8 or 64 units.
    model = keras.Model(inputs, GatedDense(units, blocks=4, activation="relu", seed=1)(inputs))
    x = rng.normal(size=(8, 16)).astype("float32")
    run = tf.function(lambda x: model(x, training=False))
    # The dense fallback's product, in the cond's branch.
    assert ("BatchMatMulV2" in graph_op_types(run, x)) is falls_back
    np.testing.assert_allclose(run(x).numpy(), _masked_outputs(model, x), atol=1e-5)


def test_the_fused_op_names_a_wrong_fallback_fraction():
    for fraction in (1.5, -0.1, "half"):
        with pytest.raises(ValueError, match=f"fallback_fraction={fraction!r}"):
            native_kernels.native_gated_dense_or_fallback(
                np.zeros((2, 8), "float32"), np.zeros((8, 4), "float32"),
                np.zeros(4, "float32"), np.zeros((4, 8, 2), "float32"), None, None, fraction,
            )


@pytest.mark.parametrize("lanes, threads, block_size, active_blocks, path", [
    # AVX-512: never, whatever the threads and blocks.
    (16, 2, 2, 16, "native"), (16, 1, 64, 16, "native"), (16, 1, 128, 16, "native"),
    # AVX2: from 15/16, on one thread, for blocks of 64 units and more.
    (8, 1, 64, 14, "native"), (8, 1, 64, 15, "masked"), (8, 1, 128, 16, "masked"),
    (8, 2, 64, 16, "native"), (8, 1, 32, 16, "native"),
])
def test_auto_above_batch_1_falls_back_only_where_nearly_every_block_runs(
    lanes, threads, block_size, active_blocks, path, rng, monkeypatch
):
    # Each path marked by a constant output, so the branch taken shows.
    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")

    monkeypatch.setattr(engine, "_compiled", {})
    monkeypatch.setattr(engine, "native_vector_lanes", lambda: lanes)
    monkeypatch.setattr(engine, "intra_op_threads", lambda: threads)
    marks = {"native": 1.0, "masked": 2.0}
    for name, mark in marks.items():
        monkeypatch.setattr(engine, f"_{name}",
                            lambda problem, mark=mark: tf.fill(tf.shape(problem.inputs[:, :1]), mark))
    x = rng.normal(size=(8, 16)).astype("float32")
    mask = np.zeros((8, 16), "float32")
    mask[:, :active_blocks] = 1.0
    kernel = np.ones((16, 16, block_size), "float32")
    got = block_sparse_dense(x, kernel, None, mask, path="auto")
    np.testing.assert_array_equal(got.numpy(), np.full((8, 1), marks[path], "float32"))


def test_layers_without_bias_on_every_native_call(rng):
    # The ops' empty bias: the fused op eagerly, the chain of variables'
    # ops, and the "native" path in a graph. Seeded weights: with others,
    # 10 draws of 150 turned every block off for x (the outputs all 0).
    keras.utils.set_random_seed(1)  # two of the four blocks active
    inputs = keras.Input((24,))
    h = GatedDense(32, blocks=4, activation="relu", use_bias=False, seed=1,
                   policy_bias_initializer=keras.initializers.Constant(0.3))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(5, use_bias=False)(h))
    x = rng.normal(size=(1, 24)).astype("float32")
    expected = _masked_outputs(model, x)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(compact_inference(model)(x).numpy(), expected, atol=1e-5)
    with forced_execution("native"):
        graph = tf.function(lambda x: model(x, training=False))
        np.testing.assert_allclose(graph(x).numpy(), expected, atol=1e-5)


def test_a_dense_layer_with_lora_keeps_the_graph_chain(rng):
    # Its kernel is computed (kernel + lora_a @ lora_b), not a variable.
    inputs = keras.Input((24,))
    h = GatedDense(32, blocks=4, activation="relu", seed=1)(inputs)
    head = keras.layers.Dense(5)
    model = keras.Model(inputs, head(h))
    head.enable_lora(2)
    head.lora_kernel_b.assign(rng.normal(size=head.lora_kernel_b.shape).astype("float32"))
    x = rng.normal(size=(1, 24)).astype("float32")
    np.testing.assert_allclose(compact_inference(model)(x).numpy(), _masked_outputs(model, x),
                               atol=1e-5)
