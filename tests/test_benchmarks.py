"""The masks the convolution benchmark times are the densities it reports."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def conv_benchmark():
    path = os.path.join(ROOT, "benchmarks", "gated_conv2d.py")
    spec = importlib.util.spec_from_file_location("gated_conv2d_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stack", ["cifar", "full-resolution"])
@pytest.mark.parametrize("density", [1 / 8, 1 / 4, 3 / 4])
def test_every_example_has_the_density_in_every_layer(conv_benchmark, stack, density):
    gated, dense = conv_benchmark._build(stack=stack)
    x, per_example = conv_benchmark._controlled_masks(gated, dense, 64, density)
    layers = conv_benchmark._gated_convs(gated)
    masks, h = [], x
    for layer in gated.layers[1:]:
        if layer in layers:
            masks.append(np.asarray(layer.block_mask(h)))
        h = np.asarray(layer(h, training=False))
    for mask in masks:
        np.testing.assert_array_equal(mask.sum(axis=1), density * 8)
        # Random per example: several different masks, and each group used.
        assert len({tuple(row) for row in mask}) > 3
        assert mask.any(axis=0).all()
    np.testing.assert_allclose(per_example, density)
    # The Conv2D stack has the same kernels.
    for g, d in zip(gated.layers[1:], dense.layers[1:]):
        if d.weights:
            np.testing.assert_array_equal(g.kernel.numpy(), d.kernel.numpy())


def test_densities_must_be_whole_groups(conv_benchmark):
    gated, dense = conv_benchmark._build()
    with pytest.raises(ValueError, match="--densities must be multiples of 1/8.*0.3"):
        conv_benchmark._controlled_masks(gated, dense, 4, 0.3)
