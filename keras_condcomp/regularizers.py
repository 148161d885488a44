"""The gating regularisers of Bengio et al. (arXiv 1511.06297), eq. L_b, L_e, L_v.

All three take `probabilities`, the policy's block probabilities `sigma` of
shape `(batch, blocks)`, and return a scalar. `L_b` and `L_e` measure each
deviation from tau as the paper writes it, `|.|` (`deviation="absolute"`),
or squared (`deviation="squared"`), as the authors' code does: the squared
pull fades near tau, so the learned density settles above it.

Examples:
    >>> import numpy as np
    >>> from keras_condcomp import regularizers
    >>> sigma = np.array([[0.9, 0.1], [0.1, 0.1]], "float32")
    >>> round(float(regularizers.block_balance(sigma, 0.5)), 4)  # |0.5-0.5| + |0.1-0.5|
    0.4
    >>> round(float(regularizers.block_balance(sigma, 0.5, "squared")), 4)  # 0 + 0.4 ** 2
    0.16
"""

from keras import ops

__all__ = [
    "DEVIATIONS",
    "block_balance",
    "example_balance",
    "block_variance",
    "gating_regularization",
]


DEVIATIONS = ("absolute", "squared")


def _check_deviation(deviation):
    if deviation not in DEVIATIONS:
        raise ValueError(
            f"`deviation` must be one of {DEVIATIONS}. Received: deviation={deviation!r}"
        )


def _penalty(difference, deviation):
    _check_deviation(deviation)
    return ops.abs(difference) if deviation == "absolute" else ops.square(difference)


def block_balance(probabilities, target_density, deviation="absolute"):
    """`L_b = sum_j | mean_i sigma_ij - tau |`: each block's mean near tau
    (squared deviations with `deviation="squared"`)."""
    probabilities = ops.convert_to_tensor(probabilities)
    return ops.sum(_penalty(ops.mean(probabilities, axis=0) - target_density, deviation))


def example_balance(probabilities, target_density, deviation="absolute"):
    """`L_e = mean_i | mean_j sigma_ij - tau |`: each example's mean near tau
    (squared deviations with `deviation="squared"`)."""
    probabilities = ops.convert_to_tensor(probabilities)
    return ops.mean(_penalty(ops.mean(probabilities, axis=1) - target_density, deviation))


def block_variance(probabilities):
    """`L_v = - sum_j var_i sigma_ij`: rewards policies that differ across examples."""
    probabilities = ops.convert_to_tensor(probabilities)
    return -ops.sum(ops.var(probabilities, axis=0))


def gating_regularization(
    probabilities, target_density, sparsity_weight, variance_weight,
    example_sparsity_weight=None, deviation="absolute",
):
    """`lambda_s (L_b + L_e) + lambda_v L_v`; the sparsity terms are skipped
    when `target_density` is None, the variance term when its weight is 0.

    `example_sparsity_weight`, when given, weighs `L_e` instead of
    `sparsity_weight` (`lambda_s L_b + lambda_e L_e + lambda_v L_v`), as the
    authors' code weighs the two terms apart. `deviation` is that of `L_b`
    and `L_e`."""
    _check_deviation(deviation)
    probabilities = ops.convert_to_tensor(probabilities)
    total = ops.zeros((), dtype=probabilities.dtype)
    if example_sparsity_weight is None:
        example_sparsity_weight = sparsity_weight
    if target_density is not None and sparsity_weight:
        total = total + sparsity_weight * block_balance(
            probabilities, target_density, deviation
        )
    if target_density is not None and example_sparsity_weight:
        total = total + example_sparsity_weight * example_balance(
            probabilities, target_density, deviation
        )
    if variance_weight:
        total = total + variance_weight * block_variance(probabilities)
    return total
