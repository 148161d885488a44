import importlib

import numpy as np
import pytest
import tensorflow as tf

from keras_condcomp.ops import (
    CONV2D_EXECUTION_PATHS,
    block_sparse_conv2d,
    masked_block_conv2d,
)

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
    # and "masked" on two.
    geometries = GEOMETRIES if path in ("per_example", "grouped") else GEOMETRIES[1::2]
    for strides, padding, dilation_rate in geometries:
        for batch in (1, 7):
            x = block_sparse_input(rng, batch)
            kernel = rng.normal(size=(3, 3, 8, 12)).astype("float32")
            bias = rng.normal(size=12).astype("float32")
            mask = (rng.random((batch, 4)) < 0.4).astype("float32")
            mask[0] = 0  # an example with no active group
            args = (x, kernel, bias, mask, tf.nn.relu, strides, padding, dilation_rate)
            expected = masked_block_conv2d(*args)
            np.testing.assert_allclose(
                block_sparse_conv2d(*args, path=path), expected, atol=1e-5,
                err_msg=f"{path} {strides} {padding} {dilation_rate} batch {batch}",
            )


def test_inlined_in_a_graph_without_bias_and_all_zero_input(rng):
    x = block_sparse_input(rng, 5)
    x[2] = 0  # an example whose every input channel is zero
    kernel = rng.normal(size=(2, 3, 8, 6)).astype("float32")
    mask = (rng.random((5, 3)) < 0.6).astype("float32")

    @tf.function
    def run(x, path):
        return block_sparse_conv2d(x, kernel, None, mask, path=path, padding="same")

    expected = masked_block_conv2d(x, kernel, None, mask, padding="same")
    for path in CONV2D_EXECUTION_PATHS:
        np.testing.assert_allclose(run(x, path), expected, atol=1e-5)


def test_one_trace_serves_every_batch_size(rng):
    kernel = rng.normal(size=(3, 3, 8, 8)).astype("float32")
    for batch in (1, 3, 6):
        x = block_sparse_input(rng, batch)
        mask = (rng.random((batch, 4)) < 0.5).astype("float32")
        block_sparse_conv2d(x, kernel, None, mask, path="auto")
    traced = [f for key, f in engine._compiled.items() if key[0] == "auto"]
    assert traced and all(f.experimental_get_tracing_count() == 1 for f in traced)


def test_auto_rule_reads_the_fraction_of_active_pairs(rng):
    kernel = rng.normal(size=(3, 3, 8, 8)).astype("float32")
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], "float32")
    problem = engine._Problem(
        tf.ones((2, 4, 4, 8)), tf.constant(kernel), None, tf.constant(mask),
        lambda t: t, (1, 1), "same", (1, 1),
    )
    assert float(engine.active_fraction(problem)) == 0.625
    assert engine.AUTO_MAX_FRACTION == 0.5


def test_errors_name_the_argument(rng):
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    kernel = rng.normal(size=(3, 3, 3, 4)).astype("float32")
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


@pytest.mark.parametrize("strides, padding, dilation_rate", GEOMETRIES)
def test_static_budget_path_matches_masked_reference(rng, strides, padding, dilation_rate):
    from keras_condcomp.ops.static_budget_conv2d import static_budget_conv2d

    for batch in (1, 3):
        x = block_sparse_input(rng, batch)
        kernel = rng.normal(size=(3, 3, 8, 12)).astype("float32")
        bias = rng.normal(size=12).astype("float32")
        mask = (rng.random((batch, 4)) < 0.4).astype("float32")
        mask[0, 1] = 1.0  # at least one active group
        union = int(mask.max(axis=0).sum())
        arguments = dict(strides=strides, padding=padding, dilation_rate=dilation_rate)
        expected = masked_block_conv2d(x, kernel, bias, mask, tf.nn.relu, **arguments)
        for budget in range(union, 5):
            got = static_budget_conv2d(x, kernel, bias, mask, tf.nn.relu, **arguments, budget=budget)
            np.testing.assert_allclose(got, expected, atol=1e-5)
