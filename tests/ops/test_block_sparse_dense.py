import importlib

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_condcomp.layers import GatedDense
from keras_condcomp.ops import (
    EXECUTION_PATHS,
    block_dense,
    block_sparse_dense,
    cost_constants,
    forced_execution,
    from_block_kernel,
    masked_block_dense,
    set_cost_constants,
    to_block_kernel,
)
from keras_condcomp.ops.block_sparse_dense import (
    BATCHED_CHOICES,
    _masked_cost,
    _Problem,
    batched_choice,
    batched_skipping_can_pay,
    grouped_cost,
    mostly_active,
    single_skipping_can_pay,
    single_skipping_pays,
)
from tests.ops.conftest import graph_op_types, random_block_problem


@pytest.fixture(autouse=True)
def _tensorflow_engine(request):
    """This module tests the TensorFlow paths and `"auto"`'s rules among
    them, as they run where the native kernels are not built
    (`test_native_kernels.py` tests those); a test of the forced `"native"`
    path keeps them."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("path") == "native":
        yield
        return
    request.getfixturevalue("tensorflow_paths")
    yield


# "auto" only switches between these ("per_example" at batch 1 is auto's
# batch-1 graph; auto itself is checked on fixed shapes below);
# "static_capacity" compiles with XLA for every shape.
INLINED_PATHS = ("per_example", "grouped", "masked")


@settings(max_examples=20, deadline=None)
@given(
    batch=st.sampled_from([1, 2, 7, 64]),
    blocks=st.sampled_from([1, 2, 4, 8]),
    block_size=st.sampled_from([1, 3, 8, 24]),  # 24: above `_COPIED_PRODUCT_MAX_BLOCK`
    density=st.sampled_from([0.0, 1 / 32, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0]),
    input_sparsity=st.sampled_from([0.0, 0.7, 1.0]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_paths_match_masked_reference(
    batch, blocks, block_size, density, input_sparsity, use_bias, seed
):
    # The paths as `predict` runs them: inlined into the caller's graph, all
    # in one trace to keep the search affordable.
    x, kernel, bias, mask = random_block_problem(
        seed, batch, 12, blocks, block_size, density, input_sparsity, use_bias
    )
    expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()

    @tf.function
    def every_path(x, mask):
        return [
            block_sparse_dense(x, to_block_kernel(kernel, blocks), bias, mask, tf.nn.relu,
                               path=path)
            for path in INLINED_PATHS
        ]

    for path, got in zip(INLINED_PATHS, every_path(x, mask)):
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, err_msg=path)


@pytest.mark.parametrize("path", EXECUTION_PATHS)
def test_compiled_paths_match_masked_reference(path, rng):
    kernel = rng.normal(size=(16, 12)).astype("float32")
    bias = rng.normal(size=12).astype("float32")
    for batch in (1, 2, 7, 64):
        x = rng.normal(size=(batch, 16)).astype("float32")
        x[:, 8:] = 0.0  # block-sparse input: the sparse-input branches run
        mask = (rng.random((batch, 4)) < 0.5).astype("float32")
        mask[0] = 0.0
        mask[-1] = 1.0
        expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()
        got = block_sparse_dense(
            x, to_block_kernel(kernel, 4), bias, mask, tf.nn.relu, path=path
        ).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"batch {batch}")


@pytest.mark.parametrize("path", EXECUTION_PATHS)
def test_paths_mask_after_an_activation_that_is_not_zero_at_zero(path, rng):
    # sigmoid(0) = 0.5: a skipped block must still come out exactly 0, and an
    # active one must see its bias before the activation.
    kernel = rng.normal(size=(16, 12)).astype("float32")
    bias = rng.normal(size=12).astype("float32")
    for batch in (1, 7):
        x = rng.normal(size=(batch, 16)).astype("float32")
        mask = (rng.random((batch, 4)) < 0.5).astype("float32")
        mask[0] = [1, 0, 1, 0]
        expected = masked_block_dense(x, kernel, bias, mask, tf.nn.sigmoid).numpy()
        got = block_sparse_dense(
            x, to_block_kernel(kernel, 4), bias, mask, tf.nn.sigmoid, path=path
        ).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"batch {batch}")
        assert np.all(got[np.repeat(mask, 3, axis=1) == 0] == 0.0)


@pytest.mark.parametrize("case", ["sparse input", "dense input", "zero input", "no block"])
def test_auto_at_batch_1_skips_exactly(rng, case):
    # Constants under which skipping always pays, so the batch-1 graph runs
    # (on these small shapes the measured ones pick the dense product).
    kernel = rng.normal(size=(16, 12)).astype("float32")
    bias = rng.normal(size=12).astype("float32")
    x = rng.normal(size=(1, 16)).astype("float32")
    mask = np.array([[1, 0, 1, 0]], "float32")
    if case == "sparse input":
        # 5 non-zero inputs, padded to 6 rows: the padding must add nothing.
        x[:, 5:] = 0.0
    elif case == "zero input":
        x[:] = 0.0
    elif case == "no block":
        mask[:] = 0.0
    expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()
    before = cost_constants()
    try:
        set_cost_constants(read=1e-6, overhead=1e-6)
        problem = _Problem(tf.constant(x), to_block_kernel(tf.constant(kernel), 4), None,
                           tf.constant(mask), tf.identity)
        assert bool(single_skipping_pays(problem))
        inlined = tf.function(lambda x, m: block_sparse_dense(
            x, to_block_kernel(kernel, 4), bias, m, tf.nn.relu))
        for got in (inlined(x, mask), block_sparse_dense(
                x, to_block_kernel(kernel, 4), bias, mask, tf.nn.relu)):
            np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    finally:
        set_cost_constants(**before)


def test_batch_1_dense_input_is_exact_for_every_active_block_count(rng):
    # A dense input at batch 1 multiplies 1 to 3 active blocks in inlined
    # branches, 4 to 8 in a called one, reading the kernel in place; more
    # blocks, or none, are gathered first. Every count, one trace.
    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")
    blocks = 12
    assert (engine._INLINED_IN_PLACE_BLOCKS, engine._IN_PLACE_BLOCKS) == (3, 8)
    kernel = rng.normal(size=(10, blocks * 3)).astype("float32")
    bias = rng.normal(size=blocks * 3).astype("float32")
    x = rng.normal(size=(1, 10)).astype("float32")
    run = tf.function(lambda x, m: block_sparse_dense(
        x, to_block_kernel(kernel, blocks), bias, m, tf.nn.relu, path="per_example"))
    for count in range(blocks + 1):
        mask = np.zeros((1, blocks), "float32")
        mask[0, rng.choice(blocks, count, replace=False)] = 1.0
        expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()
        np.testing.assert_allclose(run(x, mask).numpy(), expected, atol=1e-5,
                                   err_msg=f"{count} active blocks")
    assert run.experimental_get_tracing_count() == 1


def test_grouped_whole_blocks_are_exact_for_every_used_block_count(rng):
    # Copying a few used blocks priced cheaper than streaming the kernel,
    # so the grouped path multiplies each used block's examples: 1 to 3
    # blocks in inlined branches, 4 to 8 in a called one, reading the
    # kernel in place; more blocks, or none, are gathered first.
    blocks, batch = 12, 3
    kernel = rng.normal(size=(10, blocks * 3)).astype("float32")
    bias = rng.normal(size=blocks * 3).astype("float32")
    x = rng.normal(size=(batch, 10)).astype("float32")
    before = cost_constants()
    try:
        set_cost_constants(copy=1e6)
        run = tf.function(lambda x, m: block_sparse_dense(
            x, to_block_kernel(kernel, blocks), bias, m, tf.nn.relu, path="grouped"))
        for count in range(blocks + 1):
            used = rng.choice(blocks, count, replace=False)
            mask = np.zeros((batch, blocks), "float32")
            mask[0, used] = 1.0  # example 0 uses them all, the others some
            mask[1:, used] = rng.random((batch - 1, count)) < 0.5
            problem = _Problem(tf.constant(x), to_block_kernel(tf.constant(kernel), blocks),
                               None, tf.constant(mask), tf.identity)
            assert not bool(problem.grouped_in_place)
            expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()
            np.testing.assert_allclose(run(x, mask).numpy(), expected, atol=1e-5,
                                       err_msg=f"{count} used blocks")
        assert run.experimental_get_tracing_count() == 1
    finally:
        set_cost_constants(**before)


def test_row_buckets_are_the_smallest_power_of_two_or_three_quarters_of_one():
    from keras_condcomp.ops.block_sparse_dense import _row_buckets

    table = _row_buckets(3073)
    counts = [0, 1, 2, 3, 4, 5, 6, 7, 9, 13, 17, 25, 96, 97, 1025, 3073]
    assert [int(table[count]) for count in counts] == [
        1, 1, 2, 3, 4, 6, 6, 8, 12, 16, 24, 32, 96, 128, 1536, 4096]
    sizes = np.array(sorted({2**k for k in range(13)} | {3 * 2**k for k in range(12)}))
    for count, bucket in enumerate(table):
        assert bucket == sizes[sizes >= max(count, 1)].min()


@pytest.mark.parametrize("path", EXECUTION_PATHS)
def test_an_empty_batch_has_the_output_shape(rng, path):
    # Traced for a static empty batch too: the batch-1 branch, never run
    # there, must still build.
    kernel = to_block_kernel(rng.normal(size=(6, 8)).astype("float32"), 4)
    x, mask = np.zeros((0, 6), "float32"), np.zeros((0, 4), "float32")
    static = tf.function(lambda x, m: block_sparse_dense(x, kernel, None, m, path=path))
    dynamic = tf.function(
        lambda x, m: block_sparse_dense(x, kernel, None, m, path=path),
        input_signature=[tf.TensorSpec([None, 6]), tf.TensorSpec([None, 4])],
    )
    for run in (static, dynamic):
        assert run(x, mask).shape == (0, 8)


def test_one_trace_serves_every_batch_size(rng):
    block_kernel = rng.normal(size=(2, 6, 4)).astype("float32")
    for batch in (1, 3, 5, 17):
        x = rng.normal(size=(batch, 6)).astype("float32")
        block_sparse_dense(x, block_kernel, None, np.ones((batch, 2), "float32"), path="grouped")
    # The module (the package's `block_sparse_dense` is the function).
    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")
    compiled = [
        f for key, f in engine._compiled.items()
        if key[0] == "grouped" and key[2] == (2, 6, 4)
    ]
    assert len(compiled) == 1
    assert compiled[0].experimental_get_tracing_count() == 1


def test_errors_name_the_argument(rng):
    x = rng.normal(size=(2, 4)).astype("float32")
    block_kernel = rng.normal(size=(3, 4, 2)).astype("float32")
    with pytest.raises(ValueError, match="path='fast'"):
        block_sparse_dense(x, block_kernel, None, np.ones((2, 3)), path="fast")
    with pytest.raises(ValueError, match="inputs.shape=\\(2, 5\\)"):
        block_sparse_dense(np.ones((2, 5), "float32"), block_kernel, None, np.ones((2, 3)))
    with pytest.raises(ValueError, match="block_mask.shape=\\(2, 4\\)"):
        block_sparse_dense(x, block_kernel, None, np.ones((2, 4)))
    with pytest.raises(ValueError, match="block_kernel.shape=\\(4, 6\\)"):
        block_sparse_dense(x, np.ones((4, 6), "float32"), None, np.ones((2, 3)))
    # One example and three rows of mask: batch 1 reads the first row alone.
    with pytest.raises(ValueError, match=r"block_mask.shape=\(3, 3\), inputs.shape=\(1, 4\)"):
        block_sparse_dense(x[:1], block_kernel, None, np.ones((3, 3)))


@pytest.mark.parametrize("path", EXECUTION_PATHS)
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, np.nan])
def test_a_mask_other_than_zero_one_is_rejected_eagerly(rng, path, value):
    # The paths disagree on such a mask (the dense fallback scales by it, the
    # skipping paths test it against 0): every path refuses it, naming where.
    x = rng.normal(size=(2, 4)).astype("float32")
    block_kernel = rng.normal(size=(3, 4, 2)).astype("float32")
    mask = np.array([[1, 0, 1], [0, value, 0]], "float32")
    with pytest.raises(ValueError, match=r"block_mask\[1, 1\]="):
        block_sparse_dense(x, block_kernel, None, mask, path=path)


def test_a_boolean_mask_is_a_zero_one_mask(rng):
    x = rng.normal(size=(2, 4)).astype("float32")
    block_kernel = rng.normal(size=(3, 4, 2)).astype("float32")
    active = np.array([[True, False, True], [False, False, True]])
    np.testing.assert_array_equal(
        block_sparse_dense(x, block_kernel, None, active).numpy(),
        block_sparse_dense(x, block_kernel, None, active.astype("float32")).numpy(),
    )


def test_static_capacity_drops_examples_beyond_capacity(rng):
    x = rng.normal(size=(3, 4)).astype("float32")
    kernel = rng.normal(size=(4, 4)).astype("float32")
    mask = np.array([[1, 0], [1, 1], [1, 0]], "float32")
    got = block_sparse_dense(
        x, to_block_kernel(kernel, 2), None, mask, path="static_capacity", capacity=1
    ).numpy()
    expected = masked_block_dense(x, kernel, None, mask).numpy()
    # Block 0 keeps its first example only; block 1 has one example and keeps it.
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
    np.testing.assert_array_equal(got[1:, :2], 0.0)
    np.testing.assert_allclose(got[1, 2:], expected[1, 2:], atol=1e-5)


def _chosen_path(x, kernel, mask):
    """What `"auto"` runs: its decisions, evaluated eagerly."""
    block_kernel = to_block_kernel(tf.constant(kernel), mask.shape[1])
    problem = _Problem(tf.constant(x), block_kernel, None, tf.constant(mask), tf.identity)
    if bool(mostly_active(problem)):
        return "masked"
    if len(x) == 1:
        return "single" if bool(single_skipping_pays(problem)) else "masked"
    if not bool(batched_skipping_can_pay(problem)):
        return "masked"
    return BATCHED_CHOICES[int(batched_choice(problem))]


def test_cost_model_choices(rng):
    kernel = rng.normal(size=(3072, 1536)).astype("float32")
    sparse = np.zeros((1, 24), "float32")
    sparse[0, 3] = 1.0
    x = rng.random((1, 3072)).astype("float32")
    # Batch 1: its own lean graph when few blocks are active.
    assert _chosen_path(x, kernel, sparse) == "single"
    relu_input = np.maximum(rng.normal(size=(1, 3072)), 0).astype("float32")
    assert _chosen_path(relu_input, kernel, sparse) == "single"
    assert _chosen_path(x, kernel, np.ones((1, 24), "float32")) == "masked"
    nine = np.zeros((1, 24), "float32")
    nine[0, :9] = 1.0  # below half, but past the measured crossover (7 of 24)
    assert _chosen_path(x, kernel, nine) == "masked"
    # The same batch-1 example in a batch of two: the batched decision.
    assert _chosen_path(np.concatenate([x, x]), kernel, np.concatenate([sparse, sparse])) == (
        "grouped")
    assert _chosen_path(rng.random((256, 3072)).astype("float32"), kernel,
                        np.ones((256, 24), "float32")) == "masked"
    # Block-sparse inputs (one block per example, as behind another gated
    # layer) and outputs: per_example reads a tile per pair, grouped would
    # read most of the kernel; a dense input has every chunk non-zero.
    h = np.zeros((50, 24, 64), "float32")
    h[np.arange(50), rng.integers(0, 24, 50)] = rng.random((50, 64))
    h = h.reshape(50, 1536)
    mask = np.zeros((50, 24), "float32")
    mask[np.arange(50), rng.integers(0, 24, 50)] = 1.0
    assert _chosen_path(h, kernel[:1536], mask) == "per_example"
    assert _chosen_path(rng.random((50, 1536)).astype("float32"), kernel[:1536], mask) == (
        "grouped")
    # Many tiles per example in a large batch: copying a tile per pair and
    # chunk would copy the kernel several times over; grouped reads it once.
    h = np.zeros((256, 24, 64), "float32")
    mask = np.zeros((256, 24), "float32")
    for example in range(256):
        h[example, rng.choice(24, 4, replace=False)] = rng.random((4, 64))
        mask[example, rng.choice(24, 2, replace=False)] = 1.0
    assert _chosen_path(h.reshape(256, 1536), kernel[:1536], mask) == "grouped"
    # A tiny layer: the fixed cost of skipping outweighs the dense product,
    # at batch 1 and above.
    small = rng.normal(size=(64, 32)).astype("float32")
    assert _chosen_path(rng.random((1, 64)).astype("float32"), small,
                        np.eye(1, 4, dtype="float32")) == "masked"
    assert _chosen_path(rng.random((8, 64)).astype("float32"), small,
                        np.eye(8, 4, dtype="float32")) == "masked"


def test_small_layers_at_small_batches_run_the_dense_fallback_before_any_statistic(rng):
    # 784 -> 256: the batched paths' fixed cost exceeds the dense product's
    # below batch 77, decided from the batch size alone; 3072 -> 1536 can
    # pay at any batch size (a Python True: no ops).
    def problem(input_dim, units, batch):
        x = tf.constant(rng.random((batch, input_dim)).astype("float32"))
        block_kernel = to_block_kernel(tf.constant(rng.normal(size=(input_dim, units))), 16)
        mask = tf.constant(np.eye(batch, 16, dtype="float32"))
        return _Problem(x, tf.cast(block_kernel, tf.float32), None, mask, tf.identity)

    assert not bool(batched_skipping_can_pay(problem(784, 256, 76)))
    assert bool(batched_skipping_can_pay(problem(784, 256, 77)))
    assert batched_skipping_can_pay(problem(3072, 1536, 2)) is True
    kernel = rng.normal(size=(784, 256)).astype("float32")
    x = rng.random((50, 784)).astype("float32")
    mask = np.eye(50, 16, dtype="float32")
    assert _chosen_path(x, kernel, mask) == "masked"
    expected = masked_block_dense(x, kernel, None, mask, tf.nn.relu).numpy()
    got = block_sparse_dense(x, to_block_kernel(kernel, 16), None, mask, tf.nn.relu)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_auto_drops_the_batch_1_decision_where_skipping_cannot_pay(rng):
    # 784 -> 256: the batch-1 graph's fixed cost exceeds the dense product's,
    # so "auto" runs the dense fallback at batch 1 without deciding (no row
    # padding, which only the batch-1 skipping graph does); 1024 -> 1024 keeps
    # the decision. Exact either way.
    def traced_ops(input_dim, units):
        kernel = rng.normal(size=(input_dim, units)).astype("float32")
        block_kernel = to_block_kernel(tf.constant(kernel), 16)
        spec = [tf.TensorSpec([None, input_dim]), tf.TensorSpec([None, 16])]
        run = tf.function(
            lambda x, m: block_sparse_dense(x, block_kernel, None, m, tf.nn.relu),
            input_signature=spec,
        )
        x = rng.random((1, input_dim)).astype("float32")
        mask = np.eye(1, 16, dtype="float32")
        np.testing.assert_allclose(
            run(x, mask), masked_block_dense(x, kernel, None, mask, tf.nn.relu), atol=1e-4
        )
        graph = run.get_concrete_function().graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        problem = _Problem(tf.constant(x), block_kernel, None, tf.constant(mask), tf.identity)
        return {node.op for node in nodes}, single_skipping_can_pay(problem)

    small_ops, small_can_pay = traced_ops(784, 256)
    large_ops, large_can_pay = traced_ops(1024, 1024)
    assert not small_can_pay and large_can_pay
    assert "Pad" not in small_ops and "Pad" in large_ops


@pytest.mark.parametrize("used_blocks, in_place", [(3, True), (1, False)])
def test_grouped_reads_the_kernel_in_place_when_copying_would_cost_more(
    rng, used_blocks, in_place
):
    # 3 of 4 blocks: copying their tiles costs more than streaming all 4, so
    # the unused block's slots multiply padding; 1 of 4: its tiles are copied.
    kernel = rng.normal(size=(16, 12)).astype("float32")
    x = rng.normal(size=(5, 16)).astype("float32")
    mask = np.zeros((5, 4), "float32")
    mask[np.arange(5), np.arange(5) % used_blocks] = 1.0
    mask[0, :used_blocks] = 1.0
    problem = _Problem(tf.constant(x), to_block_kernel(tf.constant(kernel), 4), None,
                       tf.constant(mask), tf.nn.relu)
    assert bool(problem.grouped_in_place) is in_place
    expected = masked_block_dense(x, kernel, None, mask, tf.nn.relu).numpy()
    got = block_sparse_dense(x, to_block_kernel(kernel, 4), None, mask, tf.nn.relu,
                             path="grouped").numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("first_dense", [True, False])
def test_used_inputs_are_the_union_whether_or_not_the_first_example_is_dense(rng, first_dense):
    # Example 0 dense (every row read anyway) or sparse; the rest use rows
    # 0-2 only: the union is counted exactly when it can matter.
    x = np.zeros((6, 16), "float32")
    x[1:, :3] = rng.normal(size=(5, 3))
    x[0, :16 if first_dense else 2] = rng.normal(size=16 if first_dense else 2)
    kernel = rng.normal(size=(16, 8)).astype("float32")
    mask = (rng.random((6, 4)) < 0.5).astype("float32")
    mask[0, 0] = 1.0
    problem = _Problem(tf.constant(x), to_block_kernel(tf.constant(kernel), 4), None,
                       tf.constant(mask), tf.nn.relu)
    assert float(problem.used_input_count) == (16.0 if first_dense else 3.0)
    assert bool(tf.reduce_all(problem.used_inputs)) is first_dense
    expected = masked_block_dense(x, kernel, None, mask, tf.nn.relu).numpy()
    for path in ("grouped", "auto"):
        got = block_sparse_dense(x, to_block_kernel(kernel, 4), None, mask, tf.nn.relu,
                                 path=path).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=path)


@pytest.mark.parametrize("input_dim, block_size, chunk", [(48, 8, 8), (36, 8, 6), (7, 4, 1)])
def test_per_example_reads_the_tiles_of_each_examples_non_zero_chunks(
    rng, input_dim, block_size, chunk
):
    # Above batch 1 inputs are read by chunks (the block size, or the largest
    # divisor of the input size below it): whole chunks zero, as behind a
    # gated layer, zeros inside non-zero chunks, an all-zero example, and
    # all-on and all-off rows of the mask.
    blocks, batch = 4, 9
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    nonzero_chunks = rng.random((batch, input_dim // chunk)) < 0.4
    x[~np.repeat(nonzero_chunks, chunk, axis=1)] = 0.0
    x[0], nonzero_chunks[0] = 0.0, False
    x[1, ::2] = 0.0
    nonzero_chunks = nonzero_chunks.reshape(batch, -1, 1) & (
        x.reshape(batch, -1, chunk) != 0).any(axis=2, keepdims=True)
    kernel = rng.normal(size=(input_dim, blocks * block_size)).astype("float32")
    bias = rng.normal(size=blocks * block_size).astype("float32")
    mask = (rng.random((batch, blocks)) < 0.3).astype("float32")
    mask[2], mask[3] = 1.0, 0.0
    problem = _Problem(tf.constant(x), to_block_kernel(tf.constant(kernel), blocks), None,
                       tf.constant(mask), tf.nn.relu)
    assert problem.chunk == chunk
    tiles = float(np.sum(nonzero_chunks.sum(axis=(1, 2)) * mask.sum(axis=1)))
    assert float(problem.tile_count) == tiles
    expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()
    before = cost_constants()
    try:
        # Copies and the fixed cost next to nothing.
        set_cost_constants(copy=1e6, batched=1e6, overhead=1e-6, batched_overhead=1e-6)
        assert _chosen_path(x, kernel, mask) == "per_example"
        for path in ("per_example", "auto"):
            got = block_sparse_dense(x, to_block_kernel(kernel, blocks), bias, mask, tf.nn.relu,
                                     path=path).numpy()
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=path)
    finally:
        set_cost_constants(**before)


def test_auto_runs_the_dense_fallback_from_half_the_pairs_whatever_the_costs(rng):
    kernel = rng.normal(size=(3072, 1536)).astype("float32")
    x = rng.random((50, 3072)).astype("float32")
    mask = np.zeros((50, 24), "float32")
    mask[:, :12] = 1.0  # 12 of 24 blocks: half
    before = cost_constants()
    try:
        set_cost_constants(gemm=1e-3, read=1e-3, overhead=1.0)  # a very slow dense product
        problem = _Problem(tf.constant(x), to_block_kernel(tf.constant(kernel), 24), None,
                           tf.constant(mask), tf.identity)
        # The cost model alone would skip.
        assert float(grouped_cost(problem)) < float(_masked_cost(problem, 50.0))
        assert _chosen_path(x, kernel, mask) == "masked"
        mask[:, 11] = 0.0  # just under half: the cost model decides
        assert _chosen_path(x, kernel, mask) != "masked"
    finally:
        set_cost_constants(**before)


def test_cost_constants_are_validated():
    before = cost_constants()
    with pytest.raises(ValueError, match="copy=-1"):
        set_cost_constants(copy=-1)
    with pytest.raises(ValueError, match="'speed'"):
        set_cost_constants(speed=1.0)
    assert cost_constants() == before


def test_forced_execution_overrides_the_layer(rng):
    layer = GatedDense(8, blocks=4, activation="relu", execution="per_example")
    x = rng.normal(size=(3, 5)).astype("float32")
    expected = layer(x).numpy()
    # "native" (not built in this module): tests/ops/test_native_kernels.py.
    for path in (path for path in EXECUTION_PATHS if path != "native"):
        with forced_execution(path):
            got = tf.function(lambda x: layer(x, training=False))(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=path)
    with pytest.raises(ValueError, match="path='fastest'"):
        with forced_execution("fastest"):
            pass


def test_capacity_errors(rng):
    x = rng.normal(size=(2, 4)).astype("float32")
    block_kernel = rng.normal(size=(2, 4, 2)).astype("float32")
    with pytest.raises(ValueError, match="capacity=0"):
        block_sparse_dense(x, block_kernel, None, np.ones((2, 2)), path="static_capacity",
                           capacity=0)
    with pytest.raises(ValueError, match="capacity=2, path='grouped'"):
        block_sparse_dense(x, block_kernel, None, np.ones((2, 2)), path="grouped", capacity=2)


@pytest.mark.parametrize(
    "block_size, batch, copied", [(32, None, True), (8, 5, True), (32, 1, False), (64, None, False)]
)
def test_block_dense_copies_narrow_blocks_to_the_dense_layout_unless_the_batch_is_1(
    block_size, batch, copied, rng
):
    kernel = rng.normal(size=(20, 4 * block_size)).astype("float32")
    block_kernel = tf.Variable(to_block_kernel(kernel, 4))
    bias = rng.normal(size=4 * block_size).astype("float32")

    @tf.function
    def run(x, mask):
        with tf.GradientTape() as tape:
            outputs = block_dense(x, block_kernel, bias, mask, tf.nn.relu)
            loss = tf.reduce_sum(outputs**2)
        return outputs, tape.gradient(loss, block_kernel)

    types = graph_op_types(
        run, tf.TensorSpec([batch, 20], tf.float32), tf.TensorSpec([batch, 4], tf.float32)
    )
    assert ("BatchMatMulV2" in types) is not copied
    x = rng.normal(size=(batch or 3, 20)).astype("float32")
    mask = (rng.random((batch or 3, 4)) < 0.5).astype("float32")
    outputs, gradient = run(x, mask)
    expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()
    np.testing.assert_allclose(outputs.numpy(), expected, atol=1e-5)
    # d/dW of sum(y**2): x^T (2 y * relu'), y already 0 where masked or cut.
    expected_gradient = to_block_kernel(x.T @ (2 * expected), 4)
    np.testing.assert_allclose(gradient.numpy(), expected_gradient, atol=1e-4)


@pytest.mark.parametrize(
    "block_size, threads, per_block, copied",
    [(16, 1, False, True), (16, 2, True, True), (32, 1, True, False), (32, 2, True, False)],
)
def test_masked_multiplies_above_batch_1_without_the_batched_product(
    block_size, threads, per_block, copied, rng, monkeypatch
):
    # At batch 1, one batched product over the blocks; above it, blocks of
    # up to 16 units: one 2-D product with the kernel transposed to the
    # Dense layout (on several threads only above batch 64, one product a
    # block up to it); wider blocks: one 2-D product each, of the unstacked
    # kernel.
    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")
    monkeypatch.setattr(engine, "intra_op_threads", lambda: threads)
    copies = []
    monkeypatch.setattr(
        engine, "from_block_kernel", lambda k: copies.append(k) or from_block_kernel(k)
    )
    kernel = rng.normal(size=(20, 4 * block_size)).astype("float32")
    block_kernel = to_block_kernel(kernel, 4)

    @tf.function
    def run(x, mask):
        return block_sparse_dense(x, block_kernel, None, mask, path="masked")

    types = graph_op_types(
        run, tf.TensorSpec([None, 20], tf.float32), tf.TensorSpec([None, 4], tf.float32)
    )
    assert {"BatchMatMulV2", "MatMul"} <= types
    assert ("Unpack" in types) is per_block
    assert bool(copies) is copied
    for batch in (1, 5, 64, 65):
        x = rng.normal(size=(batch, 20)).astype("float32")
        mask = (rng.random((batch, 4)) < 0.5).astype("float32")
        np.testing.assert_allclose(run(x, mask).numpy(),
                                   masked_block_dense(x, kernel, None, mask).numpy(), atol=1e-5)
