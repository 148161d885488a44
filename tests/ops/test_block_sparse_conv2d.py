import importlib
import itertools

import numpy as np
import pytest
import tensorflow as tf

from keras_condcomp.ops import (
    CONV2D_EXECUTION_PATHS,
    block_sparse_conv2d,
    masked_block_conv2d,
)
from tests.ops.conftest import unit_scale_kernel

engine = importlib.import_module("keras_condcomp.ops.block_sparse_conv2d")

GEOMETRIES = [
    # strides, padding, dilation_rate
    ((1, 1), "same", (1, 1)),
    ((2, 2), "valid", (1, 1)),
    ((2, 1), "same", (1, 1)),
    ((1, 1), "valid", (2, 2)),
]


def block_sparse_input(rng, batch, channels=8, groups=4):
    """Random input whose channel groups are switched off per example."""
    x = rng.normal(size=(batch, 9, 8, channels)).astype("float32")
    upstream = rng.random((batch, groups)) < 0.5
    return x * np.repeat(upstream, channels // groups, axis=1)[:, None, None, :]


@pytest.mark.parametrize("path", CONV2D_EXECUTION_PATHS)
def test_paths_match_masked_reference(rng, path):
    # Every geometry for the skipping paths; "auto" (which traces all three)
    # and "masked" on two. "auto" also on sparse masks (its grouped branch)
    # and dense ones (its masked branch).
    geometries = GEOMETRIES if path in ("per_example", "grouped") else GEOMETRIES[1::2]
    probabilities = (0.15, 0.4, 0.8) if path == "auto" else (0.4,)
    # "auto" skips only convolutions of at least AUTO_MIN_OUTPUT_MACS an
    # output value; at batch 1 only wide ones (AUTO_WIDE_OUTPUT_MACS) when
    # they are this small: 32 channels (288) mask there, 64 (576) skip.
    channel_counts = (32, 64) if path == "auto" else (8,)
    for (strides, padding, dilation_rate), batch, probability, channels in itertools.product(
        geometries, (1, 7), probabilities, channel_counts
    ):
        x = block_sparse_input(rng, batch, channels)
        kernel = unit_scale_kernel(rng, 3, 3, channels, 12)
        bias = rng.normal(size=12).astype("float32")
        mask = (rng.random((batch, 4)) < probability).astype("float32")
        mask[0] = 0  # an example with no active group
        args = (x, kernel, bias, mask, tf.nn.relu, strides, padding, dilation_rate)
        expected = masked_block_conv2d(*args)
        np.testing.assert_allclose(
            block_sparse_conv2d(*args, path=path), expected, atol=1e-5,
            err_msg=f"{path} {strides} {padding} {dilation_rate} batch {batch} "
            f"p {probability} channels {channels}",
        )


def test_inlined_in_a_graph_without_bias_and_all_zero_input(rng):
    x = block_sparse_input(rng, 5)
    x[2] = 0  # an example whose every input channel is zero
    kernel = unit_scale_kernel(rng, 2, 3, 8, 6)
    mask = (rng.random((5, 3)) < 0.6).astype("float32")

    @tf.function
    def run(x, path):
        return block_sparse_conv2d(x, kernel, None, mask, path=path, padding="same")

    expected = masked_block_conv2d(x, kernel, None, mask, padding="same")
    for path in CONV2D_EXECUTION_PATHS:
        np.testing.assert_allclose(run(x, path), expected, atol=1e-5)


@pytest.mark.parametrize("path", CONV2D_EXECUTION_PATHS)
def test_input_channels_are_read_by_chunks(rng, path):
    # Chunks of 8 (16 and 32 channels), 6 (12, 36), 5 (20), 7 (a prime: one
    # chunk). Whole zero chunks, a chunk with one non-zero channel, a zero
    # channel inside a used chunk, an all-zero example; the spatial size
    # static and unknown.
    for channels, chunk in ((16, 8), (12, 6), (36, 6), (20, 5), (7, 7), (32, 8)):
        assert engine._channel_chunk(channels) == chunk
        chunks = channels // chunk
        x = rng.normal(size=(5, 6, 7, channels)).astype("float32")
        zero_chunks = rng.random((5, chunks)) < 0.5
        x *= np.repeat(~zero_chunks, chunk, axis=1)[:, None, None, :]
        x[1, :, :, :chunk] = 0
        x[1, :, :, chunk - 1] = rng.normal(size=(6, 7))
        x[2, :, :, 1] = 0
        x[3] = 0
        kernel = unit_scale_kernel(rng, 3, 3, channels, 8)
        bias = rng.normal(size=8).astype("float32")
        mask = (rng.random((5, 4)) < 0.4).astype("float32")
        mask[:, 1] = 1

        @tf.function(
            input_signature=[tf.TensorSpec([None, None, None, channels]), tf.TensorSpec([None, 4])]
        )
        def dynamic(x, mask):
            return block_sparse_conv2d(x, kernel, bias, mask, path=path, padding="same")

        for batch in (1, 5):
            args = (x[:batch], kernel, bias, mask[:batch])
            expected = masked_block_conv2d(*args, padding="same")
            np.testing.assert_allclose(
                block_sparse_conv2d(*args, path=path, padding="same"), expected, atol=1e-5,
                err_msg=f"{path} channels {channels} batch {batch}",
            )
            np.testing.assert_allclose(dynamic(x[:batch], mask[:batch]), expected, atol=1e-5)


@pytest.mark.parametrize("path", CONV2D_EXECUTION_PATHS)
def test_a_nan_in_an_otherwise_zero_channel_reaches_the_active_groups(rng, path):
    # The chunk scan compares each channel's Euclidean norm with 0: NaN must
    # count as non-zero, as it does in the reference.
    x = np.zeros((1, 5, 5, 32), "float32")
    x[0, :, :, :8] = rng.normal(size=(5, 5, 8))
    x[0, 2, 3, 20] = np.nan
    kernel = unit_scale_kernel(rng, 3, 3, 32, 8)
    mask = np.array([[1, 0, 0, 1]], "float32")
    expected = np.asarray(masked_block_conv2d(x, kernel, None, mask, padding="same"))
    got = np.asarray(block_sparse_conv2d(x, kernel, None, mask, path=path, padding="same"))
    assert np.isnan(expected).any()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("path", CONV2D_EXECUTION_PATHS)
def test_tiny_channels_are_read_down_to_the_scans_underflow(rng, path):
    # The chunk scan compares each channel's Euclidean norm with 0. Values of
    # 1e-18 (squares 1e-36) must be read: times weights of 1e15 they add
    # about 1e-3 to the active groups. Values of 1e-20 (squares underflow)
    # count as zero: they could add at most 9 * 1e-20 times a weight here.
    x = np.zeros((1, 5, 5, 32), "float32")
    x[0, :, :, :8] = rng.normal(size=(5, 5, 8))
    x[0, :, :, 20] = 1e-18
    x[0, :, :, 28] = 1e-20
    kernel = unit_scale_kernel(rng, 3, 3, 32, 8)
    kernel[:, :, 20, :] = 1e15
    mask = np.array([[1, 0, 0, 1]], "float32")
    args = (x, kernel, None, mask)
    expected = np.asarray(masked_block_conv2d(*args, padding="same"))
    without = np.asarray(masked_block_conv2d(x * (np.arange(32) != 20), *args[1:], padding="same"))
    assert np.abs(expected - without).max() > 1e-4  # the tiny channel matters
    got = np.asarray(block_sparse_conv2d(*args, path=path, padding="same"))
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("path", CONV2D_EXECUTION_PATHS)
def test_an_overflow_stays_out_of_skipped_groups(rng, path):
    # Every output overflows to inf: skipped groups must still be exactly 0
    # (a product with the mask would make them NaN).
    x = np.full((2, 5, 5, 4), 1e30, "float32")
    kernel = np.full((3, 3, 4, 6), 1e30, "float32")
    mask = np.array([[1, 0, 1], [0, 1, 0]], "float32")
    got = np.asarray(block_sparse_conv2d(x, kernel, None, mask, path=path))
    skipped = np.repeat(mask, 2, axis=1)[:, None, None, :] == 0
    assert np.all(np.broadcast_to(skipped, got.shape) == (got == 0))
    assert np.all(np.isinf(got[np.broadcast_to(~skipped, got.shape)]))


@pytest.mark.parametrize("path", CONV2D_EXECUTION_PATHS)
def test_an_empty_batch_has_the_output_shape(rng, path):
    # TensorFlow 2.21's conv2d returns its input for an empty batch: the
    # paths take the output's shape from the input's, not from it.
    kernel = unit_scale_kernel(rng, 3, 3, 4, 6)
    x = np.zeros((0, 7, 9, 4), "float32")
    mask = np.zeros((0, 3), "float32")

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 4]), tf.TensorSpec([None, 3])]
    )
    def dynamic(x, mask):
        return block_sparse_conv2d(x, kernel, None, mask, path=path, strides=2)

    @tf.function
    def static(x, mask):
        return block_sparse_conv2d(x, kernel, None, mask, path=path, strides=2)

    assert block_sparse_conv2d(x, kernel, None, mask, path=path, strides=2).shape == (0, 3, 4, 6)
    assert dynamic(x, mask).shape == (0, 3, 4, 6)
    assert static(x, mask).shape == (0, 3, 4, 6)


def test_one_trace_serves_every_batch_size(rng):
    kernel = unit_scale_kernel(rng, 3, 3, 8, 8)
    for batch in (1, 3, 6):
        x = block_sparse_input(rng, batch)
        mask = (rng.random((batch, 4)) < 0.5).astype("float32")
        block_sparse_conv2d(x, kernel, None, mask, path="auto")
    traced = [f for key, f in engine._compiled.items() if key[0] == "auto"]
    assert traced and all(f.experimental_get_tracing_count() == 1 for f in traced)


def test_auto_rule_masks_from_half_the_pairs_and_groups_sparse_batches(rng):
    kernel = tf.constant(unit_scale_kernel(rng, 3, 3, 8, 8))  # 8 groups of 1

    def rule(mask):
        mask = np.array(mask, "float32")
        problem = engine._Problem(
            tf.ones((len(mask), 4, 4, 8)), kernel, None, tf.constant(mask),
            lambda t: t, (1, 1), "same", (1, 1),
        )
        return (
            float(engine.active_fraction(problem)),
            bool(engine.skipping_pays(problem)),
            bool(engine.grouping_pays(problem)),
        )

    def row(*groups):
        return [1 if g in groups else 0 for g in range(8)]

    # 5 of 8 groups, then exactly half: the dense convolution.
    assert rule([row(0, 1, 2, 3, 4), row(1, 2, 3, 4, 5)])[:2] == (0.625, False)
    assert rule([row(0, 1, 2, 3), row(4, 5, 6, 7)])[:2] == (0.5, False)
    # 3 and 2 groups an example: skipped, not grouped.
    assert rule([row(0, 1, 2), row(3, 4)]) == (0.3125, True, False)
    # At most 1.5 groups an example on average: grouped.
    assert rule([row(0, 1), row(5)]) == (0.1875, True, True)
    assert rule([row(), row(1, 2, 3)]) == (0.1875, True, True)
    assert (engine.AUTO_MAX_FRACTION, engine.AUTO_GROUPED_MAX_GROUPS) == (0.5, 1.5)


def test_auto_skips_large_convolutions_up_to_a_higher_fraction(rng, monkeypatch):
    def problem(inputs, kernel_shape, mask):
        inputs = tf.ones(inputs) if isinstance(inputs, tuple) else inputs
        return engine._Problem(
            inputs, tf.ones(kernel_shape), None, tf.constant(mask, tf.float32),
            lambda t: t, (1, 1), "same", (1, 1),
        )

    three_quarters = [[1, 1, 1, 0, 1, 1, 1, 0]]
    # 32 * 32 * 3 * 3 * 64 * 128 = 7.5e7 multiply-adds an example: skipped at
    # 3/4 of the groups, not at 15/16; 16 * 16 * 3 * 3 * 64 * 128 = 1.9e7 and an
    # unknown spatial size: the dense convolution from half the groups.
    large = problem((1, 32, 32, 64), (3, 3, 64, 128), three_quarters)
    assert engine.example_macs(large) == 32 * 32 * 9 * 64 * 128
    assert engine.max_fraction(large) == engine.AUTO_LARGE_MAX_FRACTION == 0.9
    assert bool(engine.skipping_pays(large))
    assert not bool(engine.skipping_pays(
        problem((2, 32, 32, 64), (3, 3, 64, 128), [[1] * 8, [1] * 7 + [0]])
    ))
    small = problem((1, 16, 16, 64), (3, 3, 64, 128), three_quarters)
    assert engine.max_fraction(small) == engine.AUTO_MAX_FRACTION
    assert not bool(engine.skipping_pays(small))
    assert engine.AUTO_LARGE_CONV_MACS == 5e7

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 64])])
    def unknown_size(x):
        return tf.constant(engine.max_fraction(problem(x, (3, 3, 64, 128), three_quarters)))

    assert float(unknown_size(tf.ones((1, 32, 32, 64)))) == engine.AUTO_MAX_FRACTION
    # Skipping at 3/4 of the groups equals the reference (the rule lowered to
    # reach these small shapes), at batch 1 and in the example loop.
    monkeypatch.setattr(engine, "AUTO_LARGE_CONV_MACS", 0)
    monkeypatch.setattr(engine, "AUTO_LOOP_MIN_MACS", 0)
    monkeypatch.setattr(engine, "_compiled", {})
    for batch in (1, 7):
        x = block_sparse_input(rng, batch, channels=32)
        kernel = unit_scale_kernel(rng, 3, 3, 32, 12)
        mask = np.ones((batch, 4), "float32")
        mask[:, 1] = 0
        np.testing.assert_allclose(
            block_sparse_conv2d(x, kernel, None, mask, padding="same"),
            masked_block_conv2d(x, kernel, None, mask, padding="same"), atol=1e-5,
        )


def test_auto_groups_large_convolutions_only_for_few_examples_a_group():
    def grouping_pays(batch, spatial, groups_per_example):
        # 8 groups; every example runs the same number of them.
        mask = np.zeros((batch, 8), "float32")
        mask[:, :groups_per_example] = 1
        problem = engine._Problem(
            tf.ones((batch, spatial, spatial, 64)), tf.ones((3, 3, 64, 128)), None,
            tf.constant(mask), lambda t: t, (1, 1), "same", (1, 1),
        )
        return bool(engine.grouping_pays(problem))

    assert engine.AUTO_LARGE_GROUPED_MAX_EXAMPLES == 4
    # 32x32: 7.5e7 multiply-adds an example, a large convolution. One group
    # an example: 4 examples a group at batch 32 are grouped, 8 at 64 are not.
    assert grouping_pays(32, 32, 1)
    assert not grouping_pays(64, 32, 1)
    # 16x16 (1.9e7): the number of examples a group does not count.
    assert grouping_pays(64, 16, 1)
    # Two groups an example are never grouped.
    assert not grouping_pays(4, 32, 2)
    assert not grouping_pays(4, 16, 2)


def test_auto_masks_convolutions_too_small_to_skip(rng):
    def graph_ops(in_channels):
        kernel = tf.constant(unit_scale_kernel(rng, 3, 3, in_channels, 8))
        run = tf.function(lambda x, mask: block_sparse_conv2d(x, kernel, None, mask))
        graph = run.get_concrete_function(
            tf.TensorSpec([None, 6, 6, in_channels]), tf.TensorSpec([None, 4])
        ).graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        return {node.op for node in nodes}

    # 3 * 3 * 28 = 252 multiply-adds an output value: the masked convolution
    # only (no index computation); 3 * 3 * 29 = 261: the skipping branches too.
    assert engine.AUTO_MIN_OUTPUT_MACS == 256
    assert "Where" not in graph_ops(28)
    assert "Where" in graph_ops(29)
    x = block_sparse_input(rng, 3, channels=4, groups=2)
    kernel = unit_scale_kernel(rng, 3, 3, 4, 8)
    mask = (rng.random((3, 4)) < 0.3).astype("float32")
    np.testing.assert_allclose(
        block_sparse_conv2d(x, kernel, None, mask),
        masked_block_conv2d(x, kernel, None, mask), atol=1e-5,
    )


def test_auto_loops_over_a_batch_only_for_large_convolutions(rng, monkeypatch):
    def problem(input_shape, kernel_shape):
        return engine._Problem(
            tf.ones(input_shape), tf.ones(kernel_shape), None, tf.ones((1, 8)),
            lambda t: t, (1, 1), "same", (1, 1),
        )

    tiny = problem((2, 4, 4, 8), (3, 3, 8, 8))  # 9.2e3 multiply-adds an example
    # 3.6e6, but 288 an output value (the MNIST CNN's second layer).
    narrow = problem((2, 14, 14, 32), (3, 3, 32, 64))
    pooled = problem((2, 16, 16, 64), (3, 3, 64, 128))  # 1.9e7, 576 an output value
    full = problem((2, 32, 32, 64), (3, 3, 64, 128))  # 7.5e7
    assert engine.AUTO_LOOP_MIN_MACS == 1e6
    assert engine.AUTO_WIDE_OUTPUT_MACS == 512
    assert engine.AUTO_LARGE_CONV_MACS == 5e7
    cases = (tiny, narrow, pooled, full)
    monkeypatch.setattr(engine, "intra_op_threads", lambda: 1)
    assert [engine.looping_pays(p) for p in cases] == [False, False, True, True]
    # At batch 1 a narrow convolution skips only when it is large.
    assert engine.AUTO_SINGLE_MIN_MACS == 1e7
    narrow_large = problem((2, 28, 28, 32), (3, 3, 32, 64))  # 1.4e7, 288 an output value
    assert [engine.single_skipping_can_pay(p) for p in cases + (narrow_large,)] == [
        False, False, True, True, True]
    # On several threads only a large convolution is looped over.
    monkeypatch.setattr(engine, "intra_op_threads", lambda: 2)
    assert [engine.looping_pays(p) for p in cases] == [False, False, False, True]
    # Both branches of a batch with many groups an example equal the reference
    # (one thread: the loop when both minimums are 0).
    monkeypatch.setattr(engine, "intra_op_threads", lambda: 1)
    x = block_sparse_input(rng, 7, channels=32)
    kernel = unit_scale_kernel(rng, 3, 3, 32, 12)
    mask = np.zeros((7, 4), "float32")
    mask[:6, :2] = 1.0  # 12 of 28 pairs, 1.7 groups an example
    expected = masked_block_conv2d(x, kernel, None, mask, padding="same")
    for loop_min_macs in (0.0, 1e6):
        monkeypatch.setattr(engine, "AUTO_LOOP_MIN_MACS", loop_min_macs)
        monkeypatch.setattr(engine, "AUTO_WIDE_OUTPUT_MACS", loop_min_macs)
        monkeypatch.setattr(engine, "_compiled", {})
        np.testing.assert_allclose(
            block_sparse_conv2d(x, kernel, None, mask, padding="same"), expected, atol=1e-5
        )


def test_errors_name_the_argument(rng):
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    kernel = unit_scale_kernel(rng, 3, 3, 3, 4)
    mask = np.ones((2, 2), "float32")
    with pytest.raises(ValueError, match="path='grouped_fast'"):
        block_sparse_conv2d(x, kernel, None, mask, path="grouped_fast")
    with pytest.raises(ValueError, match="static_capacity"):
        block_sparse_conv2d(x, kernel, None, mask, path="static_capacity")
    with pytest.raises(ValueError, match=r"inputs.shape=\(2, 5, 5\)"):
        block_sparse_conv2d(x[..., 0], kernel, None, mask)
    with pytest.raises(ValueError, match=r"block_mask.shape=\(2, 3\)"):
        block_sparse_conv2d(x, kernel, None, np.ones((2, 3), "float32"))
    with pytest.raises(ValueError, match="padding='full'"):
        block_sparse_conv2d(x, kernel, None, mask, padding="full")
    with pytest.raises(ValueError, match=r"strides=\(2, 2\), dilation_rate=\(2, 2\)"):
        block_sparse_conv2d(x, kernel, None, mask, strides=2, dilation_rate=2)
    mismatch = r"block_mask.shape=\(3, 2\), inputs.shape=\(2, 5, 5, 3\)"
    with pytest.raises(ValueError, match=mismatch):
        block_sparse_conv2d(x, kernel, None, np.ones((3, 2), "float32"))
    with pytest.raises(ValueError, match=r"block_mask\[0, 1\]=0.5"):
        block_sparse_conv2d(x, kernel, None, np.array([[1, 0.5], [0, 1]], "float32"))


@pytest.mark.parametrize("strides, padding, dilation_rate", GEOMETRIES)
def test_static_budget_path_matches_masked_reference(rng, strides, padding, dilation_rate):
    from keras_condcomp.ops.static_budget_conv2d import static_budget_conv2d

    for batch in (1, 3):
        x = block_sparse_input(rng, batch)
        kernel = unit_scale_kernel(rng, 3, 3, 8, 12)
        bias = rng.normal(size=12).astype("float32")
        mask = (rng.random((batch, 4)) < 0.4).astype("float32")
        mask[0, 1] = 1.0  # at least one active group
        union = int(mask.max(axis=0).sum())
        arguments = dict(strides=strides, padding=padding, dilation_rate=dilation_rate)
        expected = masked_block_conv2d(x, kernel, bias, mask, tf.nn.relu, **arguments)
        for budget in range(union, 5):
            got = static_budget_conv2d(x, kernel, bias, mask, tf.nn.relu, **arguments, budget=budget)
            np.testing.assert_allclose(got, expected, atol=1e-5)
