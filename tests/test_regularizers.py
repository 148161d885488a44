import numpy as np

from keras_condcomp import regularizers


def numpy_terms(sigma, tau):
    l_b = np.sum(np.abs(sigma.mean(axis=0) - tau))
    l_e = np.mean(np.abs(sigma.mean(axis=1) - tau))
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
