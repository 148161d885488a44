import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_condcomp.ops import EXECUTION_PATHS, block_sparse_dense, masked_block_dense


@settings(max_examples=25, deadline=None)
@given(
    batch=st.sampled_from([1, 2, 7, 64]),
    blocks=st.sampled_from([1, 2, 4, 8]),
    block_size=st.sampled_from([1, 3, 8]),
    density=st.sampled_from([0.0, 1 / 32, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0]),
    input_sparsity=st.sampled_from([0.0, 0.7, 1.0]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_paths_match_masked_reference(
    batch, blocks, block_size, density, input_sparsity, use_bias, seed
):
    rng = np.random.default_rng(seed)
    input_dim = 12
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    x[rng.random(x.shape) < input_sparsity] = 0.0
    kernel = rng.normal(size=(input_dim, blocks * block_size)).astype("float32")
    bias = rng.normal(size=blocks * block_size).astype("float32") if use_bias else None
    mask = (rng.random((batch, blocks)) < density).astype("float32")
    if batch > 2:  # an all-off and an all-on row
        mask[0], mask[1] = 0.0, 1.0
    expected = masked_block_dense(x, kernel, bias, mask, tf.nn.relu).numpy()
    for path in EXECUTION_PATHS:
        got = block_sparse_dense(x, kernel, bias, mask, tf.nn.relu, path=path).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=path)


def test_one_trace_serves_every_batch_size(rng):
    kernel = rng.normal(size=(6, 8)).astype("float32")
    for batch in (1, 3, 5, 17):
        x = rng.normal(size=(batch, 6)).astype("float32")
        block_sparse_dense(x, kernel, None, np.ones((batch, 2), "float32"), path="grouped")
    from keras_condcomp.ops import block_sparse_dense as module_function

    compiled = [
        f for key, f in module_function.__globals__["_compiled"].items()
        if key[0] == "grouped" and key[2:4] == (6, 8)
    ]
    assert len(compiled) == 1
    assert compiled[0].experimental_get_tracing_count() == 1


def test_errors_name_the_argument(rng):
    x = rng.normal(size=(2, 4)).astype("float32")
    kernel = rng.normal(size=(4, 6)).astype("float32")
    with pytest.raises(ValueError, match="path='fast'"):
        block_sparse_dense(x, kernel, None, np.ones((2, 3)), path="fast")
    with pytest.raises(ValueError, match="inputs.shape=\\(2, 5\\)"):
        block_sparse_dense(np.ones((2, 5), "float32"), kernel, None, np.ones((2, 3)))
    with pytest.raises(ValueError, match="block_mask.shape=\\(2, 4\\)"):
        block_sparse_dense(x, kernel, None, np.ones((2, 4)))
