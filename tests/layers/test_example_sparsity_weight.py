"""GatedDense's separate weight of the example-balance term L_e."""

import numpy as np
import pytest

from keras_condcomp import regularizers
from keras_condcomp.layers import GatedConv2D, GatedDense


def test_weighs_l_e_apart_from_l_b(rng):
    sigma = rng.uniform(size=(6, 4)).astype("float32")
    tau = 0.25
    l_b = np.abs(sigma.mean(axis=0) - tau).sum()
    l_e = np.abs(sigma.mean(axis=1) - tau).mean()
    l_v = -sigma.var(axis=0).sum()
    layer = GatedDense(8, blocks=4, target_density=tau, sparsity_weight=2.0, variance_weight=3.0,
                       example_sparsity_weight=40.0)
    np.testing.assert_allclose(
        layer.gating_regularization(sigma), 2 * l_b + 40 * l_e + 3 * l_v, rtol=1e-5
    )
    # None keeps the paper's single lambda_s for both terms.
    np.testing.assert_allclose(
        regularizers.gating_regularization(sigma, tau, 2.0, 3.0, None),
        2 * (l_b + l_e) + 3 * l_v, rtol=1e-5,
    )
    np.testing.assert_allclose(
        regularizers.gating_regularization(sigma, tau, 0.0, 0.0, 5.0), 5 * l_e, rtol=1e-5
    )
    again = GatedDense.from_config(layer.get_config())
    assert again.example_sparsity_weight == 40.0
    assert GatedDense(8, blocks=4).get_config()["example_sparsity_weight"] is None


def test_bad_example_sparsity_weight():
    with pytest.raises(ValueError, match="example_sparsity_weight=-1"):
        GatedDense(8, blocks=4, example_sparsity_weight=-1)


@pytest.mark.parametrize("layer_class", [GatedDense, GatedConv2D])
def test_sparsity_deviation_reaches_the_regulariser_and_the_config(layer_class, rng):
    sigma = rng.uniform(size=(6, 4)).astype("float32")
    tau = 0.25
    arguments = (8,) if layer_class is GatedDense else (8, 3)
    layer = layer_class(*arguments, blocks=4, target_density=tau, sparsity_weight=2.0,
                        example_sparsity_weight=40.0, sparsity_deviation="squared")
    l_b = np.square(sigma.mean(axis=0) - tau).sum()
    l_e = np.square(sigma.mean(axis=1) - tau).mean()
    np.testing.assert_allclose(layer.gating_regularization(sigma), 2 * l_b + 40 * l_e, rtol=1e-5)
    assert layer_class.from_config(layer.get_config()).sparsity_deviation == "squared"
    assert layer_class(*arguments, blocks=4).sparsity_deviation == "absolute"
    with pytest.raises(ValueError, match="sparsity_deviation='l1'"):
        layer_class(*arguments, blocks=4, sparsity_deviation="l1")
