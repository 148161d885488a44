"""Per-example masks of a controlled size for the GatedDense benchmarks.

Setting each policy's bias so that each block is open for a fraction `d` of
random inputs gives every block the right frequency but not every example
the right number of blocks: the masks of consecutive layers go together (an
example with few active blocks upstream has small inputs downstream), so
some examples get none and others many. On the Bengio MLP at 1/16, 59 and
107 of 256 examples had no active block in the two layers, others up to 6
and 9. The benchmarks build inputs and weights instead:

- every input carries, in its first `blocks` features, a random 0/1
  selection of `floor(blocks d)` or `ceil(blocks d)` blocks (mean
  `blocks d`), the other features uniform noise;
- the first gated layer's policy reads it (logit `10 s_j - 5`, plus weights
  of about 1e-3 on every feature);
- every gated layer but the last copies its mask into the first unit of
  each block (50 when the block is active), which the next policy reads
  through a random permutation of the blocks (logit `unit - 25`).

So every example has the same number of active blocks in every gated
layer, at random places; the layers' own threshold policies compute the
masks (their cost included).
"""

import math

import numpy as np

SELECTED, CARRIER = 10.0, 50.0


def selection_inputs(n, input_dim, blocks, density, rng):
    """`(n, input_dim)` inputs selecting floor/ceil(`blocks * density`) blocks each."""
    mean = blocks * density
    low = math.floor(mean)
    counts = np.full(n, low)
    counts[: int(round((mean - low) * n))] += 1
    rng.shuffle(counts)
    x = rng.random((n, input_dim)).astype("float32")
    x[:, :blocks] = 0.0
    for i, count in enumerate(counts):
        x[i, rng.choice(blocks, size=count, replace=False)] = 1.0
    return x


def steer_policies(layers, rng):
    """Sets the policies (and carrier units) of consecutive GatedDense `layers`."""
    from keras_condcomp.ops import to_block_kernel

    first = layers[0]
    input_dim = first.kernel.shape[0]
    policy = rng.normal(0, 1e-3, (input_dim, first.blocks)).astype("float32")
    policy[np.arange(first.blocks), np.arange(first.blocks)] = SELECTED
    first.policy.kernel.assign(policy)
    first.policy.bias.assign(np.full(first.blocks, -SELECTED / 2, "float32"))
    # Rows of the previous layer's output (or of the input) that say, for
    # each of this layer's blocks, whether it is active.
    indicators = np.arange(first.blocks)
    for layer, following in zip(layers, layers[1:]):
        if following.blocks != layer.blocks:
            raise ValueError(
                f"{following.name} needs {layer.blocks} blocks, as {layer.name}. "
                f"Received: blocks={following.blocks}"
            )
        kernel = layer.kernel.numpy()
        size = layer.units // layer.blocks
        carriers = np.arange(layer.blocks) * size
        kernel[indicators] = 0.0
        # An input indicator of 1 (the selection) or CARRIER (a carrier) gives CARRIER.
        scale = CARRIER if layer is first else 1.0
        kernel[indicators, carriers] = scale
        layer.block_kernel.assign(to_block_kernel(kernel, layer.blocks))
        permutation = rng.permutation(layer.blocks)
        policy = rng.normal(0, 1e-3, (layer.units, following.blocks)).astype("float32")
        policy[carriers, permutation] = 1.0
        following.policy.kernel.assign(policy)
        following.policy.bias.assign(np.full(following.blocks, -CARRIER / 2, "float32"))
        # Block permutation[i] of the next layer is active with block i here.
        indicators = carriers[np.argsort(permutation)]
