"""The gating regularisers of Bengio et al. (arXiv 1511.06297), eq. L_b, L_e, L_v.

All three take `probabilities`, the policy's block probabilities `sigma` of
shape `(batch, blocks)`, and return a scalar. With `weights`, one per
example (`(batch,)`, such as `sample_weight`), every mean and variance over
the examples is weighted (`sum_i w_i x_i / sum_i w_i`): an example of weight
k counts as k copies of it, one of weight 0 not at all. `L_b` and `L_e` measure each
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

import numbers

from keras import ops

from keras_condcomp._arguments import check_density, check_non_negative_number

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


def _probabilities(probabilities, target_density=None):
    """`probabilities` as a `(batch, blocks)` tensor, with `target_density`
    checked when it is a number (a tensor, such as a scheduled tau, is not)."""
    if isinstance(target_density, numbers.Real):
        check_density("target_density", target_density, allow_none=True)
    probabilities = ops.convert_to_tensor(probabilities)
    if len(probabilities.shape) != 2:
        raise ValueError(
            "`probabilities` must have shape (batch, blocks). "
            f"Received: probabilities.shape={tuple(probabilities.shape)}"
        )
    return probabilities


def _example_weights(probabilities, weights):
    """`weights` as a `(batch, 1)` tensor of the probabilities' dtype (at
    least float32: sums of weights overflow float16), or None."""
    if weights is None:
        return None
    weights = ops.convert_to_tensor(weights)
    if len(weights.shape) != 1 or (
        weights.shape[0] is not None
        and probabilities.shape[0] is not None
        and weights.shape[0] != probabilities.shape[0]
    ):
        raise ValueError(
            "`weights` must hold one weight per example, of shape "
            f"({probabilities.shape[0]},). Received: weights.shape={tuple(weights.shape)}"
        )
    return ops.expand_dims(ops.cast(weights, _at_least_float32(probabilities.dtype)), -1)


def _at_least_float32(dtype):
    return "float64" if dtype == "float64" else "float32"


def _mean_over_examples(values, weights):
    """The (weighted) mean over axis 0 of `values`, `(batch, k) -> (k,)`; 0
    where every weight is 0."""
    if weights is None:
        return ops.mean(values, axis=0)
    values = ops.cast(values, weights.dtype)
    return ops.divide_no_nan(ops.sum(weights * values, axis=0), ops.sum(weights))


def block_balance(probabilities, target_density, deviation="absolute", weights=None):
    """`L_b = sum_j | mean_i sigma_ij - tau |`: each block's mean near tau
    (squared deviations with `deviation="squared"`; the mean weighted by
    `weights`)."""
    probabilities = _probabilities(probabilities, target_density)
    weights = _example_weights(probabilities, weights)
    means = _mean_over_examples(probabilities, weights)
    return ops.sum(_penalty(means - target_density, deviation))


def example_balance(probabilities, target_density, deviation="absolute", weights=None):
    """`L_e = mean_i | mean_j sigma_ij - tau |`: each example's mean near tau
    (squared deviations with `deviation="squared"`; the mean over examples
    weighted by `weights`)."""
    probabilities = _probabilities(probabilities, target_density)
    weights = _example_weights(probabilities, weights)
    if weights is None:
        # This form, not the weighted one with unit weights: its gradient
        # rounds as before, so earlier runs (the README's) reproduce exactly.
        return ops.mean(_penalty(ops.mean(probabilities, axis=1) - target_density, deviation))
    deviations = _penalty(ops.mean(probabilities, axis=1, keepdims=True) - target_density, deviation)
    return ops.squeeze(_mean_over_examples(deviations, weights), 0)


def block_variance(probabilities, weights=None):
    """`L_v = - sum_j var_i sigma_ij`: rewards policies that differ across
    examples (the variance weighted by `weights`)."""
    probabilities = _probabilities(probabilities)
    weights = _example_weights(probabilities, weights)
    if weights is None:
        return -ops.sum(ops.var(probabilities, axis=0))
    probabilities = ops.cast(probabilities, weights.dtype)
    means = _mean_over_examples(probabilities, weights)
    return -ops.sum(_mean_over_examples(ops.square(probabilities - means), weights))


def gating_regularization(
    probabilities, target_density, sparsity_weight, variance_weight,
    example_sparsity_weight=None, deviation="absolute", weights=None,
):
    """`lambda_s (L_b + L_e) + lambda_v L_v`; the sparsity terms are skipped
    when `target_density` is None, the variance term when its weight is 0.

    `example_sparsity_weight`, when given, weighs `L_e` instead of
    `sparsity_weight` (`lambda_s L_b + lambda_e L_e + lambda_v L_v`), as the
    authors' code weighs the two terms apart. `deviation` is that of `L_b`
    and `L_e`; `weights`, the examples' weights of all three."""
    _check_deviation(deviation)
    check_non_negative_number("sparsity_weight", sparsity_weight)
    check_non_negative_number("variance_weight", variance_weight)
    if example_sparsity_weight is not None:
        check_non_negative_number("example_sparsity_weight", example_sparsity_weight)
    probabilities = _probabilities(probabilities, target_density)
    total = ops.zeros((), dtype=probabilities.dtype)
    if example_sparsity_weight is None:
        example_sparsity_weight = sparsity_weight
    if target_density is not None and sparsity_weight:
        total = total + sparsity_weight * block_balance(
            probabilities, target_density, deviation, weights
        )
    if target_density is not None and example_sparsity_weight:
        total = total + example_sparsity_weight * example_balance(
            probabilities, target_density, deviation, weights
        )
    if variance_weight:
        total = total + variance_weight * block_variance(probabilities, weights)
    return total
