import numpy as np
import pytest
import tensorflow as tf

from keras_condcomp import regularizers


def numpy_terms(sigma, tau, penalty=np.abs):
    l_b = np.sum(penalty(sigma.mean(axis=0) - tau))
    l_e = np.mean(penalty(sigma.mean(axis=1) - tau))
    l_v = -np.sum(sigma.var(axis=0))
    return l_b, l_e, l_v


def test_terms_match_numpy(rng):
    sigma = rng.uniform(size=(13, 7)).astype("float32")
    l_b, l_e, l_v = numpy_terms(sigma, 0.2)
    np.testing.assert_allclose(regularizers.block_balance(sigma, 0.2), l_b, rtol=1e-5)
    np.testing.assert_allclose(regularizers.example_balance(sigma, 0.2), l_e, rtol=1e-5)
    np.testing.assert_allclose(regularizers.block_variance(sigma), l_v, rtol=1e-5)
    np.testing.assert_allclose(
        regularizers.gating_regularization(sigma, 0.2, 3.0, 0.5),
        3.0 * (l_b + l_e) + 0.5 * l_v,
        rtol=1e-5,
    )


def test_disabled_terms():
    sigma = np.full((4, 3), 0.7, "float32")
    assert float(regularizers.gating_regularization(sigma, None, 5.0, 0.0)) == 0.0
    np.testing.assert_allclose(
        regularizers.gating_regularization(sigma, 0.5, 0.0, 1.0), 0.0, atol=1e-7
    )


def test_squared_deviations_as_the_authors_code(rng):
    sigma = rng.uniform(size=(13, 7)).astype("float32")
    l_b, l_e, l_v = numpy_terms(sigma, 0.2, np.square)
    np.testing.assert_allclose(regularizers.block_balance(sigma, 0.2, "squared"), l_b, rtol=1e-5)
    np.testing.assert_allclose(
        regularizers.example_balance(sigma, 0.2, "squared"), l_e, rtol=1e-5
    )
    np.testing.assert_allclose(
        regularizers.gating_regularization(sigma, 0.2, 3.0, 0.5, 7.0, deviation="squared"),
        3.0 * l_b + 7.0 * l_e + 0.5 * l_v,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "term", [regularizers.block_balance, regularizers.example_balance]
)
def test_unknown_deviation_is_refused(term):
    with pytest.raises(ValueError, match="deviation='cubed'"):
        term(np.full((2, 2), 0.5, "float32"), 0.5, "cubed")
    with pytest.raises(ValueError, match="deviation='cubed'"):
        regularizers.gating_regularization(np.full((2, 2), 0.5, "float32"), None, 0.0, 1.0,
                                           deviation="cubed")


@pytest.mark.parametrize("deviation", ["absolute", "squared"])
def test_an_example_of_weight_k_counts_as_k_copies(rng, deviation):
    sigma = rng.uniform(size=(6, 5)).astype("float32")
    counts = np.array([2, 0, 1, 3, 0, 1])
    weighted = regularizers.gating_regularization(
        sigma, 0.2, 3.0, 0.5, 7.0, deviation=deviation, weights=counts.astype("float32")
    )
    repeated = regularizers.gating_regularization(
        np.repeat(sigma, counts, axis=0), 0.2, 3.0, 0.5, 7.0, deviation=deviation
    )
    np.testing.assert_allclose(weighted, repeated, rtol=1e-5)
    l_b, l_e, l_v = numpy_terms(np.repeat(sigma, counts, axis=0), 0.2)
    weights = counts.astype("float32")
    np.testing.assert_allclose(regularizers.block_balance(sigma, 0.2, weights=weights), l_b, rtol=1e-5)
    np.testing.assert_allclose(regularizers.example_balance(sigma, 0.2, weights=weights), l_e, rtol=1e-5)
    np.testing.assert_allclose(regularizers.block_variance(sigma, weights=weights), l_v, rtol=1e-5)


def test_a_batch_of_weight_zero_gives_finite_terms_without_gradient():
    sigma = tf.Variable(np.full((4, 3), 0.7, "float32"))
    with tf.GradientTape() as tape:
        total = regularizers.gating_regularization(sigma, 0.5, 1.0, 1.0, weights=np.zeros(4, "float32"))
    assert np.isfinite(float(total))
    np.testing.assert_array_equal(tape.gradient(total, sigma), np.zeros((4, 3)))


def test_weights_of_another_batch_size_are_refused():
    with pytest.raises(ValueError, match=r"weights.shape=\(3,\)"):
        regularizers.block_balance(np.full((4, 3), 0.5, "float32"), 0.5, weights=np.ones(3))
    with pytest.raises(ValueError, match=r"weights.shape=\(4, 1\)"):
        regularizers.block_variance(np.full((4, 3), 0.5, "float32"), weights=np.ones((4, 1)))


def test_numbers_out_of_range_and_other_ranks_are_refused():
    sigma = np.full((4, 3), 0.5, "float32")
    with pytest.raises(ValueError, match="target_density=2.0"):
        regularizers.block_balance(sigma, 2.0)
    with pytest.raises(ValueError, match="target_density=0"):
        regularizers.example_balance(sigma, 0)
    with pytest.raises(ValueError, match="sparsity_weight=-1.0"):
        regularizers.gating_regularization(sigma, 0.25, -1.0, 0.0)
    with pytest.raises(ValueError, match="variance_weight=nan"):
        regularizers.gating_regularization(sigma, 0.25, 1.0, float("nan"))
    with pytest.raises(ValueError, match=r"probabilities.shape=\(3,\)"):
        regularizers.block_variance(sigma[0])
    # A scheduled tau is a tensor, read at call time: taken as it is.
    assert np.isfinite(float(regularizers.block_balance(sigma, tf.constant(0.25))))


def test_weighted_terms_of_float16_probabilities_do_not_overflow(rng):
    sigma = rng.uniform(size=(1024, 4)).astype("float32")
    weights = np.full(1024, 100.0, "float32")
    for term in (regularizers.block_balance, regularizers.example_balance):
        np.testing.assert_allclose(
            term(sigma.astype("float16"), 0.25, weights=weights), term(sigma, 0.25), rtol=1e-3
        )
    np.testing.assert_allclose(
        regularizers.block_variance(sigma.astype("float16"), weights=weights),
        regularizers.block_variance(sigma), rtol=1e-2,
    )
