"""The gating regularisers of Bengio et al. (arXiv 1511.06297), eq. L_b, L_e, L_v.

All three take `probabilities`, the policy's block probabilities `sigma` of
shape `(batch, blocks)`, and return a scalar.

Example:

>>> import numpy as np
>>> from keras_condcomp import regularizers
>>> sigma = np.array([[0.9, 0.1], [0.1, 0.1]], "float32")
>>> round(float(regularizers.block_balance(sigma, 0.5)), 4)  # |0.5-0.5| + |0.1-0.5|
0.4
"""

from keras import ops

__all__ = [
    "block_balance",
    "example_balance",
    "block_variance",
    "gating_regularization",
]


def block_balance(probabilities, target_density):
    """`L_b = sum_j | mean_i sigma_ij - tau |`: each block's mean near tau."""
    probabilities = ops.convert_to_tensor(probabilities)
    return ops.sum(ops.abs(ops.mean(probabilities, axis=0) - target_density))


def example_balance(probabilities, target_density):
    """`L_e = mean_i | mean_j sigma_ij - tau |`: each example's mean near tau."""
    probabilities = ops.convert_to_tensor(probabilities)
    return ops.mean(ops.abs(ops.mean(probabilities, axis=1) - target_density))


def block_variance(probabilities):
    """`L_v = - sum_j var_i sigma_ij`: rewards policies that differ across examples."""
    probabilities = ops.convert_to_tensor(probabilities)
    return -ops.sum(ops.var(probabilities, axis=0))


def gating_regularization(
    probabilities, target_density, sparsity_weight, variance_weight,
    example_sparsity_weight=None,
):
    """`lambda_s (L_b + L_e) + lambda_v L_v`; the sparsity terms are skipped
    when `target_density` is None, the variance term when its weight is 0.

    `example_sparsity_weight`, when given, weighs `L_e` instead of
    `sparsity_weight` (`lambda_s L_b + lambda_e L_e + lambda_v L_v`), as the
    authors' code weighs the two terms apart."""
    probabilities = ops.convert_to_tensor(probabilities)
    total = ops.zeros((), dtype=probabilities.dtype)
    if example_sparsity_weight is None:
        example_sparsity_weight = sparsity_weight
    if target_density is not None and sparsity_weight:
        total = total + sparsity_weight * block_balance(probabilities, target_density)
    if target_density is not None and example_sparsity_weight:
        total = total + example_sparsity_weight * example_balance(
            probabilities, target_density
        )
    if variance_weight:
        total = total + variance_weight * block_variance(probabilities)
    return total
