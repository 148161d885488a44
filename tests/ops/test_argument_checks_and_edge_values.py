"""The ops' edge values (overflow, float16 magnitudes, empty batches) and bad arguments."""

import numpy as np
import pytest
import tensorflow as tf

from keras_condcomp.ops import (
    CONV2D_EXECUTION_PATHS,
    EXECUTION_PATHS,
    block_dense,
    block_sparse_conv2d,
    block_sparse_dense,
    expand_block_mask,
    masked_block_conv2d,
    masked_block_dense,
    to_block_kernel,
)
from keras_condcomp.ops.static_budget_conv2d import static_budget_conv2d
from keras_condcomp.ops.static_budget_dense import static_budget_dense


@pytest.mark.parametrize("path", EXECUTION_PATHS)
def test_an_overflowing_skipped_block_is_zero_on_every_dense_path(path):
    # Block 1's product overflows float16 (inf); it is skipped, so it is 0.
    x = np.ones((1, 4), "float16")
    kernel = np.ones((4, 8), "float16")
    kernel[:, 4:] = 60000
    mask = np.array([[1, 0]], "float16")
    y = block_sparse_dense(x, to_block_kernel(kernel, 2), None, mask, path=path).numpy()
    np.testing.assert_array_equal(y, [[4, 4, 4, 4, 0, 0, 0, 0]])
    np.testing.assert_array_equal(masked_block_dense(x, kernel, None, mask), y)
    np.testing.assert_array_equal(block_dense(x, to_block_kernel(kernel, 2), None, mask), y)
    # Block 1's activation overflows from its bias alone (static_capacity
    # computes a skipped pair from its zero padding: activation(bias)).
    bias = np.array([0, 0, 0, 0, 100, 100, 100, 100], "float32")
    y = block_sparse_dense(x.astype("float32"), to_block_kernel(kernel.astype("float32"), 2),
                           bias, mask.astype("float32"), activation=tf.exp, path=path).numpy()
    np.testing.assert_allclose(y, [[np.exp(4)] * 4 + [0] * 4], rtol=1e-6)


@pytest.mark.parametrize("path", CONV2D_EXECUTION_PATHS)
def test_float16_channels_of_small_values_are_read(path, rng):
    # Values about 1e-4: their float16 squares underflow to 0.
    x = (rng.uniform(0.5, 1.5, (2, 6, 6, 16)) * 1e-4).astype("float16")
    kernel = rng.normal(size=(3, 3, 16, 8)).astype("float16")
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], "float16")
    expected = np.asarray(masked_block_conv2d(x, kernel, None, mask), "float32")
    y = block_sparse_conv2d(x, kernel, None, mask, path=path).numpy().astype("float32")
    np.testing.assert_allclose(y, expected, rtol=2e-2, atol=1e-6)
    assert np.abs(expected).max() > 1e-4


def test_masks_of_another_block_count_are_refused():
    kernel = to_block_kernel(np.ones((4, 6), "float32"), 3)
    with pytest.raises(ValueError, match=r"block_mask` must have shape \(batch, 3\)"):
        block_dense(np.ones((1, 4), "float32"), kernel, None, np.ones((1, 2), "float32"))
    with pytest.raises(ValueError, match=r"units=7. Received: block_mask.shape=\(1, 2\)"):
        expand_block_mask(np.ones((1, 2), "float32"), 7)
    for blocks in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match=f"blocks={blocks}"):
            to_block_kernel(np.ones((4, 6), "float32"), blocks)


def test_engine_arguments_name_argument_and_value():
    x, kernel = np.ones((2, 4), "float32"), to_block_kernel(np.ones((4, 6), "float32"), 3)
    mask = np.ones((2, 3), "float32")
    with pytest.raises(ValueError, match=r"bias.shape=\(3, 2\)"):
        block_sparse_dense(x, kernel, np.ones((3, 2), "float32"), mask)
    with pytest.raises(ValueError, match="activation='relu'"):
        block_sparse_dense(x, kernel, None, mask, activation="relu")
    images, filters = np.ones((1, 2, 2, 3), "float32"), np.ones((3, 3, 3, 4), "float32")
    with pytest.raises(ValueError, match=r"too small.*inputs.shape=\(1, 2, 2, 3\)"):
        block_sparse_conv2d(images, filters, None, np.ones((1, 2), "float32"))
    with pytest.raises(ValueError, match=r"bias.shape=\(3,\)"):
        block_sparse_conv2d(
            np.ones((1, 5, 5, 3), "float32"), filters, np.ones(3, "float32"),
            np.ones((1, 2), "float32"),
        )


def test_masked_block_conv2d_checks_its_arguments_and_takes_an_empty_batch():
    kernel, mask = np.ones((3, 3, 4, 4), "float32"), np.ones((2, 2), "float32")
    with pytest.raises(ValueError, match="data_format='channels_firts'"):
        masked_block_conv2d(np.ones((2, 4, 6, 6), "float32"), kernel, None, mask,
                            data_format="channels_firts")
    with pytest.raises(ValueError, match="padding='full'"):
        masked_block_conv2d(np.ones((2, 6, 6, 4), "float32"), kernel, None, mask, padding="full")
    with pytest.raises(ValueError, match=r"filters=4. Received: block_mask.shape=\(2, 3\)"):
        masked_block_conv2d(np.ones((2, 6, 6, 4), "float32"), kernel, None, np.ones((2, 3)))
    empty = masked_block_conv2d(np.ones((0, 6, 6, 4), "float32"), kernel, None, mask[:0])
    assert tuple(empty.shape) == (0, 4, 4, 4)


def test_static_budget_ops_check_mask_rows_strides_kernel_and_bias():
    x, kernel = np.ones((1, 5, 5, 3), "float32"), np.ones((3, 3, 3, 8), "float32")
    with pytest.raises(ValueError, match=r"one row per example.*\(3, 4\)"):
        static_budget_conv2d(x, kernel, None, np.ones((3, 4), "float32"), budget=2)
    y = static_budget_conv2d(x, kernel, None, np.ones((1, 4), "float32"), strides=2, budget=4)
    assert tuple(y.shape) == (1, 2, 2, 8)
    dense_x, dense_kernel = np.ones((2, 4), "float32"), np.ones((4, 6), "float32")
    with pytest.raises(ValueError, match=r"one row per example"):
        static_budget_dense(dense_x, dense_kernel, None, np.ones((3, 3), "float32"), budget=1)
    with pytest.raises(ValueError, match=r"bias.shape=\(5,\)"):
        static_budget_dense(dense_x, dense_kernel, tf.ones(5), np.ones((2, 3), "float32"),
                            budget=1)
    with pytest.raises(ValueError, match=r"kernel.shape=\(2, 4, 6\)"):
        static_budget_dense(dense_x, np.ones((2, 4, 6), "float32"), None,
                            np.ones((2, 3), "float32"), budget=1)


def test_every_dense_op_refuses_a_named_activation_and_a_mask_of_other_rows():
    x, kernel = np.ones((4, 6), "float32"), np.ones((6, 8), "float32")
    mask, short = np.ones((4, 2), "float32"), np.ones((3, 2), "float32")
    calls = {
        "masked_block_dense": lambda m, a: masked_block_dense(x, kernel, None, m, a),
        "block_dense": lambda m, a: block_dense(x, to_block_kernel(kernel, 2), None, m, a),
        "block_sparse_dense": lambda m, a: block_sparse_dense(
            x, to_block_kernel(kernel, 2), None, m, a
        ),
        "static_budget_dense": lambda m, a: static_budget_dense(x, kernel, None, m, a, budget=1),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="activation='relu'"):
            call(mask, "relu")
        with pytest.raises(ValueError, match="one row per example"):
            call(short, None)
    # The references broadcast one row over the batch, as they always did.
    np.testing.assert_allclose(
        masked_block_dense(x, kernel, None, mask[:1]), masked_block_dense(x, kernel, None, mask)
    )


def test_the_static_budget_convolution_checks_its_kernel_bias_and_steps():
    x = np.ones((1, 6, 6, 2), "float32")
    kernel, mask = np.ones((3, 3, 2, 4), "float32"), np.ones((1, 2), "float32")
    with pytest.raises(ValueError, match=r"kernel.shape=\(3, 2, 4\)"):
        static_budget_conv2d(x, kernel[0], None, mask, budget=1)
    with pytest.raises(ValueError, match=r"bias.shape=\(3,\)"):
        static_budget_conv2d(x, kernel, np.ones(3, "float32"), mask, budget=1)
    with pytest.raises(ValueError, match="dilation_rate > 1"):
        static_budget_conv2d(x, kernel, None, mask, budget=1, strides=2, dilation_rate=2)
    with pytest.raises(ValueError, match="activation='relu'"):
        static_budget_conv2d(x, kernel, None, mask, "relu", budget=1)
