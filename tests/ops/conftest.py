import numpy as np


def graph_op_types(function, *args):
    """The op types of `function`'s graph for `args` (inputs or
    `tf.TensorSpec`s), the functions it calls (cond branches) included."""
    graph = function.get_concrete_function(*args).graph
    types = {op.type for op in graph.get_operations()}
    for inner in graph.as_graph_def().library.function:
        types.update(node.op for node in inner.node_def)
    return types


def unit_scale_kernel(rng, *shape):
    """A random float32 kernel of `shape` ((input_dim, units), or a
    convolution's (height, width, in_channels, filters)) scaled by 1/sqrt
    of its fan-in, as Keras's initializers scale theirs, so that outputs of
    unit-normal inputs are about 1 at every fan-in: a float32 sum of 300
    unit-scale products is rounded by about 1e-5 in whatever order it is
    taken, which a 1e-5 comparison would read as a wrong product (at 64
    channels, 576 products an output, unit-normal kernels differed from the
    reference by 1.05e-5 on an AVX2 machine)."""
    fan_in = int(np.prod(shape[:-1]))
    return (rng.normal(size=shape) / np.sqrt(fan_in)).astype("float32")


def random_block_problem(seed, batch, input_dim, blocks, block_size, density, input_sparsity,
                         use_bias):
    """`(x, kernel, bias, mask)` for the block-sparse products: inputs with
    a fraction `input_sparsity` of zeros, a Dense-layout kernel, a bias or
    None, and a random per-example block mask of about `density` (above
    batch 2, its first row all off and its second all on)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    x[rng.random(x.shape) < input_sparsity] = 0.0
    kernel = unit_scale_kernel(rng, input_dim, blocks * block_size)
    bias = rng.normal(size=blocks * block_size).astype("float32") if use_bias else None
    mask = (rng.random((batch, blocks)) < density).astype("float32")
    if batch > 2:
        mask[0], mask[1] = 0.0, 1.0
    return x, kernel, bias, mask
