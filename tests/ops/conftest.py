import numpy as np


def random_block_problem(seed, batch, input_dim, blocks, block_size, density, input_sparsity,
                         use_bias):
    """`(x, kernel, bias, mask)` for the block-sparse products: inputs with
    a fraction `input_sparsity` of zeros, a Dense-layout kernel, a bias or
    None, and a random per-example block mask of about `density` (above
    batch 2, its first row all off and its second all on)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    x[rng.random(x.shape) < input_sparsity] = 0.0
    kernel = rng.normal(size=(input_dim, blocks * block_size)).astype("float32")
    bias = rng.normal(size=blocks * block_size).astype("float32") if use_bias else None
    mask = (rng.random((batch, blocks)) < density).astype("float32")
    if batch > 2:
        mask[0], mask[1] = 0.0, 1.0
    return x, kernel, bias, mask
