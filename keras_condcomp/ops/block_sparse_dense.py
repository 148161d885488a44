"""Block-sparse execution of a gated dense layer: skipped blocks are not computed.

Both sparsities of Bengio et al.'s `((H * M_in) W) * M_out` are used. The
output mask `M_out` is the layer's own block mask. The input mask `M_in` is
recovered from the input itself: a skipped block upstream outputs exactly 0,
so only non-zero input units are read. That is exact whatever the upstream
layer (an active unit that happens to be 0 contributes nothing), and ReLU
zeros are skipped for free.

The weights are in `GatedDense`'s block-major layout (`block_kernel`, shape
`(blocks, input_dim, block_size)`, see `keras_condcomp.ops.to_block_kernel`),
viewed without a copy as `(blocks * input_dim, block_size)`, whose row
`j * input_dim + i` is input unit `i`'s slice of output block `j`. One
`tf.gather` of rows of that view fetches exactly the weight tiles (active
inputs x active output blocks) that a path needs, and the rows of a block's
tile are consecutive in memory.

Paths (TensorFlow graphs; one trace serves every batch size):

- `"native"`: one op of the native kernels (`keras_condcomp.ops.native_kernels`,
  compiled on first use): the active blocks' products, reading only the
  kernel rows of each example's non-zero inputs. `"auto"` runs it wherever
  the kernels are built, except above batch 1 when nearly every pair is
  active (then `"masked"`): with kernels built for AVX2, on one thread,
  for blocks of 64 units or more, from 15/16 of the pairs
  (`native_fallback_fraction`); the rules below are `"auto"`'s without
  them.
- `"per_example"`: every (example, active block) pair reads its own
  weights, restricted to that example's non-zero inputs. Above batch 1 the
  inputs are taken by chunks of `chunk` rows (the block size, or the
  largest divisor of the input size below it), as a gated layer upstream
  zeros whole blocks: one `(chunk, block_size)` tile, contiguous in the
  block-major layout and copied whole, per (example, active block, chunk
  with a non-zero input), one batched matrix-vector product, and a scatter
  that sums each pair's tiles. At batch 1 it runs the leanest
  graph of all (`_single`), `"auto"`'s skipping path there: the
  active blocks' tiles of the example's non-zero inputs, one gather, one
  product, one scatter. The tiles of sparse inputs are gathered row by row
  for one plain matrix product, their number padded with zero rows to the
  next `2^k` or `3 * 2^k` (oneDNN then reuses a few kernels instead of
  building one per count); those of a dense input are whole blocks, read
  in place for up to `_IN_PLACE_BLOCKS` (8) active blocks (a slice of the
  block axis is a view of the kernel: one product per block, no copy;
  Bengio MLP, one thread, A/B in one process: 1.67x-1.78x -> 1.93x-1.99x
  over Dense at density 1/16, +14-25% at 1/4), one contiguous copy each
  beyond that. The batch-1 case of the cost model below still counts the
  copy (it decides between skipping and the dense product, conservatively).
  A batch above 1 runs as a called function (see
  `keras_condcomp.ops._branches.called_branch`), whose ops batch 1 skips.
- `"grouped"`: examples grouped by output block, dropless: the rows of each
  block's examples are gathered, and one batched matmul computes all
  blocks. When the batch uses few tiles (blocks used by some example x
  inputs non-zero in some example), they are copied first; when it uses
  most, copying them would cost more than streaming the whole kernel, so the
  product reads `block_kernel` in place (an unused block multiplies padding).
  Few used blocks (up to 8) with every input row are not copied either: each
  block's examples multiply its weights in place, one product a block
  (Bengio MLP, one thread, A/B in one process, density 1/16: +16-25% at
  batches 2 and 4).
- `"static_capacity"`: the grouped path with static shapes (every block, a
  fixed number of example slots per block), which compiles under
  `jit_compile=True`. Exact when `capacity` >= the largest number of examples
  sharing a block (the default capacity is the batch size); examples beyond a
  block's capacity get 0 in that block (dropped), as in capacity-based MoE.
- `"masked"`: the dense product, then the mask: the reference, and the dense
  fallback when skipping cannot pay.
- `"auto"`: decided per call inside the graph. First, `"masked"` when at
  least half of the (example, block) pairs are active (skipping never paid
  there in `benchmarks/gated_dense.py`, and the mask alone decides it; at
  exactly half the cost model below still picked a batched skipping path,
  which lost: Bengio MLP, one thread, 0.85x and 0.97x of Dense at batches
  50 and 256 against 0.93x and 1.08x for the dense fallback, where from
  3/8 to 5/12 its choices were within 2% of the best or ahead; A/B in one
  process at half, the dense fallback from half the pairs instead of
  above half: +10-12% at batch 50, +4% at 256, equal at 1 (where the
  batch-1 decision already ran the dense fallback); 784 -> 256 on two
  threads, batch 256: +8-11%).
  Else one called function by batch size (the dense fallback and the
  other batch case do not pay for its ops, see `_auto`). At batch 1:
  `_single` or `"masked"`, by the batch-1 case of the cost model below,
  from the example's active blocks and non-zero inputs; `"masked"` with no
  decision when the layer is too small for skipping ever to pay
  (`single_skipping_can_pay`). Above batch 1: `"masked"` with no
  statistic when the batch is too small for a batched path's fixed cost
  to pay (`batched_skipping_can_pay`, from the batch size alone: 784 -> 256
  below batch 77), else `"grouped"`, `"per_example"` or `"masked"`, the
  cheapest by the cost model. `"per_example"` wins there
  when the input is block-sparse, as behind another gated layer: the
  Bengio MLP's second layer at density 1/16, one thread, alone, forced
  paths side by side: 0.55 ms against `"grouped"`'s 0.59 ms at batch 4,
  0.77 against 1.09 at 16, 1.25 against 1.47 at 50; at 128 and 256
  `"grouped"` wins (2.1 and 3.2 ms against 2.7 and 4.8), and at density
  1/4 from batch 8 on `"grouped"` or `"masked"`. (It was a third option
  before, when it gathered rows
  of single inputs through a ragged tensor: slower than `"grouped"` in
  every setting tried, and dropped before.)

Cost model of `"auto"`: estimated nanoseconds, from the shapes of the call.
With `B` the batch, `d` the input size, `u` the units, `s` the block size,
`b` the number of blocks, `r` the number of inputs non-zero in some example,
`n` the number of blocks active in some example and `C` the most examples
sharing a block (the grouped product is padded to it):

    masked      = max(B d u / gemm, d u / read)
    grouped     = n r s / copy + n C r s / batched + batched_overhead  (copied)
                = max(b C d s / batched, b d s / read) + batched_overhead
                                                                 (in place)
    per_example = T c s / copy + T c s / batched + batched_overhead

with `T` the tiles `"per_example"` reads (example, active block, chunk with
a non-zero input) and `c` the chunk size.
The grouped path reads in place when `n r / copy >= b d / read`. At batch 1
(`C = 1`, `n` and `r` the example's own) the batch-1 graph costs the copied
grouped cost, `n r s (1 / copy + 1 / batched) + overhead`.

`gemm` is the multiply-adds per ns of a dense matmul, `read` the weights per
ns it streams at batch 1 (a matrix-vector product is memory-bound), `copy`
the weights per ns `tf.gather` copies, `batched` the multiply-adds per ns of
a batch of small products, `overhead` the fixed cost of the batch-1
skipping graph's extra ops, which keeps small layers (e.g. 784 -> 256 at
batch 1) on the dense path, and `batched_overhead` that of a batched
skipping path (the call, its statistics and some forty ops), which keeps
them there at small batches. Only their ratios matter. The defaults were measured
with one thread on a shared 2-core 2.5 GHz AVX-512 Xeon (`copy` and
`overhead` refitted for the block-major layout from where skipping and the
dense product cross over at batch 1: about 5 of 16 blocks for 2048 -> 2048,
7 of 24 for 3072 -> 1536, 3-4 of 16 for 1024 -> 1024; `batched` from where
grouped and the dense product compare at batch 50 and 256, densities 1/8 to
1/2; `batched_overhead` from the batched paths' fixed cost against the
dense product's, fitted on 784 -> 256 and the Bengio MLP's second layer at
batch 50: about 0.26 ms more than the dense product's own, here about
0.9 million units); `set_cost_constants` changes them for other machines.
"""

import contextlib
import functools
import threading

import numpy as np
import tensorflow as tf

from keras_condcomp._arguments import check_activation, check_bias, is_integer, is_number
from keras_condcomp.ops._block_masks import check_block_mask
from keras_condcomp.ops._branches import called_branch
from keras_condcomp.ops._chunks import largest_divisor
from keras_condcomp.ops._threads import intra_op_threads, intra_op_threads_key
from keras_condcomp.ops.block_kernel import from_block_kernel
from keras_condcomp.ops.native_kernels import (
    load_native_kernels,
    native_activation,
    native_block_sparse_dense,
    native_gated_dense_or_fallback,
    native_kernels_error,
    native_vector_lanes,
)

__all__ = [
    "block_sparse_dense",
    "EXECUTION_PATHS",
    "forced_execution",
    "forced_execution_path",
    "cost_constants",
    "set_cost_constants",
]

EXECUTION_PATHS = ("auto", "native", "per_example", "grouped", "static_capacity", "masked")

_COSTS = {
    "gemm": 17.0,
    "read": 1.0,
    "copy": 0.4,
    "batched": 12.0,
    "overhead": 2.5e5,
    "batched_overhead": 9e5,
}

# Above this fraction of non-zero inputs, reading every input row is cheaper
# than finding and gathering the non-zero ones.
_INPUT_SPARSITY_THRESHOLD = 0.5

# `"auto"` runs the dense fallback, without evaluating the cost model, when
# at least this fraction of the (example, block) pairs is active.
_AUTO_MAX_FRACTION = 0.5
# The same on the native kernels, above batch 1 (`native_fallback_fraction`):
# built for AVX2, on one thread, `_NATIVE_ONE_THREAD_FALLBACK_FRACTION` for
# blocks of at least `_NATIVE_ONE_THREAD_FALLBACK_MIN_BLOCK` units.
_NATIVE_ONE_THREAD_FALLBACK_FRACTION = 15 / 16
_NATIVE_ONE_THREAD_FALLBACK_MIN_BLOCK = 64

# Above batch 1, `"masked"` multiplies blocks of up to this many units by the
# kernel copied to the Dense layout (one transpose, one product), and wider
# blocks one product each; at batch 1 by one batched product over the
# blocks, ahead at every width there (784 -> 16 x 16 0.98x of `x @ kernel`
# against 0.71x copied). TensorFlow's batched product is slow above batch 1.
# The product alone, against `x @ kernel`, batches 50 / 256, on a 2-core AMD
# EPYC (AVX2), one thread:
# - 784 -> 16 x 16: copied 0.85x-0.91x / 0.93x-0.95x, one product a block
#   0.83x-0.85x / 0.88x, batched 0.58x-0.63x / 0.51x-0.52x; 784 -> 32 x 8
#   copied 0.82x / 0.88x, a block 0.75x / 0.64x, batched 0.46x / 0.32x (on a
#   2-core Xeon (AVX-512), 784 -> 16 x 16 copied 0.88x / 0.94x, batched 0.94x
#   / 0.92x);
# - from 32 units one product a block 0.96x-2.02x, batched 0.79x-1.60x
#   (3072 -> 24 x 64 1.27x / 1.36x against 0.85x / 1.00x, 1024 -> 32 x 32
#   1.45x / 1.72x against 0.94x / 1.13x, up to 256 blocks: 512 -> 256 x 32
#   1.47x / 2.02x against 1.08x / 1.34x); on two threads 0.72x-1.69x against
#   0.50x-1.47x, one a block ahead in each of the 12 shapes and 2 batches.
_COPIED_PRODUCT_MAX_BLOCK = 16
# On several threads, narrow blocks too get one product each up to this
# batch. 784 -> 16 x 16 on two threads, against `x @ kernel`
# (benchmarks/block_major_products.py, session 45, three runs at batches 16
# and 128, four at 50 and 256), one a block against copied: 0.81x-0.96x
# against 0.65x-0.67x at 16, 0.92x-1.04x against 0.68x-0.78x at 50,
# 0.69x-0.83x against 0.74x-0.77x at 128, 0.73x-0.77x against 0.77x-0.82x
# at 256. (On one thread copied stays: 0.77x against 0.78x at 50, 0.87x
# against 0.78x at 256.)
_THREADS_PER_BLOCK_MAX_BATCH = 64

# With every input row (a dense input), up to `_IN_PLACE_BLOCKS` blocks (the
# example's active ones at batch 1, the batch's used ones in `"grouped"`) are
# multiplied in place, one product each (up to `_INLINED_IN_PLACE_BLOCKS` in
# branches inlined into the graph, more in one called branch); more blocks
# are copied by one gather for one product (`_in_place_or`).
_INLINED_IN_PLACE_BLOCKS = 3
_IN_PLACE_BLOCKS = 8


def cost_constants():
    """The constants of the `"auto"` cost model, as a dict (a copy).

    Returns:
        `{name: float}` for `"gemm"`, `"read"`, `"copy"`, `"batched"`,
        `"overhead"` and `"batched_overhead"` (see the module docs); changing
        the dict changes nothing, `set_cost_constants` does.

    Examples:
        >>> sorted(cost_constants())
        ['batched', 'batched_overhead', 'copy', 'gemm', 'overhead', 'read']
    """
    return dict(_COSTS)


def set_cost_constants(**constants):
    """Changes constants of the `"auto"` cost model (see the module docs).

    Takes effect at the next call of the engine or of a gated layer (graphs
    are traced anew for the new constants), but not inside a `tf.function`
    already traced, such as a model's compiled `predict`. Process-wide (not
    per thread); the names not given keep their values.

    Args:
        **constants: `name=value` for names of `cost_constants()`; each
            value a positive number.

    Raises:
        ValueError: an unknown name or a value that is not a positive
            number (then nothing is changed).

    Examples:
        >>> before = cost_constants()
        >>> set_cost_constants(overhead=3e5)
        >>> cost_constants()["overhead"]
        300000.0
        >>> set_cost_constants(**before)
    """
    for name, value in constants.items():
        if name not in _COSTS:
            raise ValueError(
                f"Unknown cost constant {name!r}: expected one of {sorted(_COSTS)}."
            )
        if not is_number(value) or not value > 0:
            raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    _COSTS.update({name: float(value) for name, value in constants.items()})
    global _COSTS_KEY
    _COSTS_KEY = tuple(sorted(_COSTS.items()))
    _compiled.clear()  # the old constants' graphs: a sweep would otherwise pile them up


_COSTS_KEY = tuple(sorted(_COSTS.items()))


def trace_settings():
    """What `"auto"` reads when a graph is traced: its cost model's
    constants, whether the native kernels are in use (loaded here, on
    first use), and the thread count (`native_fallback_fraction`). Part of
    every cache key of traced graphs, so that a change reaches the next
    call."""
    return _COSTS_KEY, load_native_kernels() is not None, intra_op_threads_key()


_forced = threading.local()


@contextlib.contextmanager
def forced_execution(path):
    """Runs every gated layer traced inside the block with execution `path`.

    Overrides each layer's `execution` argument, for benchmarks and
    debugging. It acts when a graph is traced, so wrap the first call (or
    build a new `tf.function`) inside the block. It holds for the current
    thread only; blocks nest, the innermost winning.

    Args:
        path: one of `EXECUTION_PATHS`.

    Raises:
        ValueError: `path` not in `EXECUTION_PATHS`.

    Examples:
        >>> import numpy as np
        >>> from keras_condcomp.layers import GatedDense
        >>> layer = GatedDense(8, blocks=4)
        >>> with forced_execution("masked"):
        ...     y = layer(np.ones((2, 3), "float32"))
        >>> tuple(y.shape)
        (2, 8)
    """
    _check_path(path)
    previous = getattr(_forced, "path", None)
    _forced.path = path
    try:
        yield
    finally:
        _forced.path = previous


def forced_execution_path():
    """The path forced by the innermost `forced_execution`, or None.

    Read by the gated layers when they trace; per thread.

    Returns:
        One of `EXECUTION_PATHS`, or None outside any `forced_execution`.

    Examples:
        >>> with forced_execution("grouped"):
        ...     print(forced_execution_path())
        grouped
        >>> print(forced_execution_path())
        None
    """
    return getattr(_forced, "path", None)


def _check_path(path):
    if path not in EXECUTION_PATHS:
        raise ValueError(
            f"Invalid `path`: expected one of {EXECUTION_PATHS}. Received: path={path!r}"
        )


def _identity(x):
    return x


class _Problem:
    """The shapes and index sets of one call, shared by the paths.

    The statistics are computed when first read, in the graph of the branch
    that reads them: at batch 1 `"auto"` reads none of them (`_single`).
    """

    def __init__(self, inputs, block_kernel, bias, block_mask, activation):
        self.inputs = inputs
        self.bias = bias
        self.activation = activation
        self.block_kernel = block_kernel
        self.block_mask = block_mask
        self.blocks, self.input_dim, self.block_size = block_kernel.shape
        self.units = self.blocks * self.block_size
        # Row `j * input_dim + i` is input unit i's slice of output block j.
        self.tiles = tf.reshape(block_kernel, [self.blocks * self.input_dim, self.block_size])
        self.batch = tf.shape(inputs)[0]
        self.sparse_limit = _INPUT_SPARSITY_THRESHOLD * self.input_dim
        # `"per_example"` above batch 1 reads inputs by chunks of this many rows.
        self.chunk = _chunk_size(self.input_dim, self.block_size)
        self.chunks = self.input_dim // self.chunk
        self._call = dict(self.__dict__)

    def share_first_example(self):
        """Makes the first example's statistics part of the call for this
        problem's branches: their `fresh` copies read them from here, not
        made again. (A new dict: problems of other graphs keep theirs.)"""
        names = ("first_input", "first_active", "first_nonzero", "first_rows_sparse")
        self._call = {**self._call, **{name: getattr(self, name) for name in names}}

    def fresh(self):
        """A problem of the same call with no statistics computed yet.

        A branch reads its statistics from its own copy: a tensor made in
        one branch's graph cannot be used in another's. The call's own
        tensors (`tiles`, `batch`) are shared, not made again in every
        branch: three ops a branch level at batch 1.
        """
        problem = object.__new__(_Problem)
        problem.__dict__.update(self._call)
        problem._call = self._call
        return problem

    def remade(self):
        """A problem of the same call whose own tensors (`tiles`, `batch`) are
        made again, in the graph of the branch that calls this: the graph
        outside then makes none of them when only the dense fallback reads
        the call (TensorFlow prunes ops nothing reads)."""
        return _Problem(self.inputs, self.block_kernel, self.bias, self.block_mask, self.activation)

    def compute_statistics(self):
        """Computes every statistic here, before the branches that share them."""
        for name in ("used_input_count", "used_block_count", "capacity", "rows_read",
                     "grouped_in_place", "tile_count"):
            getattr(self, name)

    @functools.cached_property
    def active(self):
        """`(batch, blocks)` bool. Made by the branches that read it: the
        dense fallback and the mostly-active test read `block_mask` itself
        (Bengio MLP, one thread, A/B in one process: +1-2% at densities 3/4
        and 1/16, batches 1 and 50)."""
        return self.block_mask > 0

    # The first example's input and mask (batch 1): slices of at most one
    # row, flattened, so that they can be made whatever the batch, even an
    # empty one (then of size 0), and "auto" decides for batch 1 before
    # branching on the batch size.
    @functools.cached_property
    def first_input(self):
        return _first_row(self.inputs)

    @functools.cached_property
    def first_active(self):
        return _first_row(self.active)

    @functools.cached_property
    def first_nonzero(self):
        """`(input_dim,)` bool: the non-zero inputs of the first example
        (size 0 for an empty batch)."""
        return tf.not_equal(self.first_input, 0)

    @functools.cached_property
    def first_rows_sparse(self):
        """`(sparse, count)`: whether the first example has few enough
        non-zero inputs to read only those rows, and their number."""
        count = tf.reduce_sum(tf.cast(self.first_nonzero, tf.float32))
        return count <= self.sparse_limit, count

    @functools.cached_property
    def _input_scan(self):
        """`(used_inputs, used_input_count, tile_count)`, scanned only when
        the first example alone is sparse enough for its rows to be read
        apart. When it is not, the batch is not either: every input is
        counted as used, and every (example, block, chunk) as a tile."""
        first_sparse, _ = self.first_rows_sparse

        def scanned():
            # A product of the 0/1 flags with a ones vector: reduce_any over
            # the batch axis measured 5-9x slower at batch 50-256.
            flags = tf.cast(tf.not_equal(self.inputs, 0), tf.float32)
            used = tf.matmul(tf.ones([1, self.batch]), flags)[0] > 0
            # (`reduce_any` over the input's chunks: a third of the time of
            # `reduce_max` over `flags`' chunks at batch 256.)
            chunks = tf.reduce_sum(tf.cast(_nonzero_chunks(self.inputs, self.chunk), tf.float32), 1)
            tiles = tf.reduce_sum(chunks * tf.reduce_sum(self._float_mask, axis=1))
            return used, tf.reduce_sum(tf.cast(used, tf.float32)), tiles

        def every():
            tiles = tf.reduce_sum(self._float_mask) * float(self.chunks)
            return tf.ones([self.input_dim], tf.bool), float(self.input_dim), tiles

        return tf.cond(first_sparse, scanned, every)

    @property
    def _float_mask(self):
        """`block_mask` as float32 (a no-op cast in float32)."""
        return tf.cast(self.block_mask, tf.float32)

    @property
    def used_inputs(self):
        """`(input_dim,)` bool: non-zero in some example (every input when
        the first example alone has too many to read only those)."""
        return self._input_scan[0]

    @property
    def used_input_count(self):
        """The number of `used_inputs`."""
        return self._input_scan[1]

    @property
    def tile_count(self):
        """The `(chunk, block_size)` weight tiles `"per_example"` reads above
        batch 1: one per (example, active block, input chunk non-zero in the
        example)."""
        return self._input_scan[2]

    @functools.cached_property
    def block_counts(self):
        """Examples per block."""
        return tf.reduce_sum(tf.cast(self.active, tf.int32), axis=0)

    @functools.cached_property
    def used_block_count(self):
        """Blocks used by some example."""
        return tf.reduce_sum(tf.cast(self.block_counts > 0, tf.float32))

    @functools.cached_property
    def capacity(self):
        """The most examples sharing a block (0 for an empty batch)."""
        return tf.reduce_max(tf.concat([self.block_counts, [0]], axis=0))

    @functools.cached_property
    def rows_read(self):
        """Input rows a grouped product reads: the used ones if few enough."""
        return _rows_read(self, self.used_input_count)

    @functools.cached_property
    def grouped_in_place(self):
        """Whether the grouped path multiplies the kernel in place (every
        block, every row) rather than a copy of the tiles it uses: when
        copying them would cost more than streaming the whole kernel."""
        return (
            self.used_block_count * self.rows_read / _COSTS["copy"]
            >= self.blocks * self.input_dim / _COSTS["read"]
        )

    def finish(self, outputs, examples, blocks_of_pairs):
        """Bias and activation of `(pairs, block_size)` outputs, scattered back.

        `examples` None: one example, whose blocks alone index the scatter
        (no example column, no shape stack: fewer ops at batch 1).
        """
        if self.bias is not None:
            bias = tf.reshape(self.bias, [self.blocks, self.block_size])
            outputs = outputs + tf.gather(bias, blocks_of_pairs)
        outputs = self.activation(outputs)
        if examples is None:
            indices, shape, batch = blocks_of_pairs[:, None], [self.blocks, self.block_size], 1
        else:
            indices = tf.stack([examples, tf.cast(blocks_of_pairs, tf.int64)], axis=1)
            shape = tf.stack([tf.cast(self.batch, tf.int64), self.blocks, self.block_size])
            batch = self.batch
        return tf.reshape(tf.scatter_nd(indices, outputs, shape), [batch, self.units])


def _nonzero_chunks(inputs, chunk):
    """`(batch, input_dim // chunk)` bool: the chunks of `chunk` inputs with a
    non-zero input."""
    chunks = inputs.shape[1] // chunk
    return tf.reduce_any(tf.not_equal(tf.reshape(inputs, [-1, chunks, chunk]), 0), axis=2)


def _chunk_size(input_dim, block_size):
    """The largest divisor of `input_dim` up to `block_size`: the rows of an
    input chunk, so that a weight tile is about square, and a chunk is one
    upstream gated layer's block when the two layers' block sizes agree."""
    return largest_divisor(input_dim, block_size)


def _first_row(tensor):
    """Row 0 of a `(batch, n)` tensor, of size 0 for an empty batch.

    For a batch known to be empty when traced, zeros of the row's shape: the
    batch-1 graph is then traced (with static shapes that must agree) but
    never run.
    """
    if tensor.shape[0] == 0:
        return tf.zeros(tensor.shape[1:], tensor.dtype)
    return tf.reshape(tensor[:1], [-1])


def _row_tiles(problem, blocks_of, rows):
    """`(len(blocks_of), R, block_size)`: rows `rows` of the given blocks,
    copied. `rows` is `(R,)` shared by every block, or `(len(blocks_of), R)`."""
    rows = rows if rows.shape.rank == 2 else rows[None, :]
    return tf.gather(problem.tiles, rows + blocks_of[:, None] * problem.input_dim)


def _in_place_or(block_kernel, blocks_of, product, copied):
    """`product(k, weights)` for each block `blocks_of[k]`, concatenated on
    axis 0, each reading the block's `(input_dim, block_size)` weights in
    place; `copied()` when there are none or more than `_IN_PLACE_BLOCKS`.

    A slice of whole blocks along `block_kernel`'s first axis is a view of
    its buffer (TensorFlow slices leading-axis rows without copying), where
    a gather copies them. Up to `_INLINED_IN_PLACE_BLOCKS` blocks run in
    branches inlined into the graph, more in one called branch (an untaken
    inlined branch still costs its ops). The slice bounds of all blocks are
    made at once: two ops a block.
    """
    count = tf.size(blocks_of)

    def in_place(n):
        def run():
            begins = tf.reshape(blocks_of, [n, 1])
            ends = tf.unstack(begins + 1, num=n)
            products = [
                product(k, tf.strided_slice(block_kernel, begin, end, shrink_axis_mask=1))
                for k, (begin, end) in enumerate(zip(tf.unstack(begins, num=n), ends))
            ]
            return tf.concat(products, 0) if n > 1 else products[0]
        return run

    def more():
        return tf.switch_case(
            count - _INLINED_IN_PLACE_BLOCKS - 1,
            [in_place(n) for n in range(_INLINED_IN_PLACE_BLOCKS + 1, _IN_PLACE_BLOCKS + 1)],
        )

    branches = [copied] + [in_place(n) for n in range(1, _INLINED_IN_PLACE_BLOCKS + 1)]
    # The branch of each count: 0 (copied) for no block or too many,
    # `len(branches)` (`more`) for the called ones; one gather, not four ops.
    branch_of_count = [
        n if n <= _INLINED_IN_PLACE_BLOCKS else len(branches)
        for n in range(_IN_PLACE_BLOCKS + 1)
    ] + [0]
    branch = tf.gather(branch_of_count, tf.minimum(count, _IN_PLACE_BLOCKS + 1))
    return tf.switch_case(branch, branches + [called_branch(more)])


@functools.lru_cache(maxsize=None)
def _row_buckets(limit):
    """`table[count]`: the smallest `2^k` or `3 * 2^k` >= `count` (1 for 0),
    for every count up to `limit`, as a constant a graph reads with one gather
    (computing it took some twenty scalar ops a layer, each costing
    microseconds at batch 1)."""
    sizes = sorted({1 << k for k in range(limit.bit_length() + 1)}
                   | {3 << k for k in range(limit.bit_length())})
    counts = np.maximum(np.arange(limit + 1), 1)
    return np.asarray(sizes, np.int32)[np.searchsorted(sizes, counts)]


def _padded(rows, values, limit):
    """`rows` and their `values` (at most `limit`), padded with row 0 and
    value 0 to a `_row_buckets` length.

    The product then runs on shapes from a few buckets, not on every count
    of non-zero inputs: oneDNN builds (and caches) a kernel per shape (in a
    profile over distinct inputs, the Bengio MLP's second-layer product took
    0.2 ms on average, 0.003 ms with oneDNN off). A padded row's value is
    0, so it adds nothing.
    """
    count = tf.size(rows)
    padding = tf.reshape(tf.stack([0, tf.gather(_row_buckets(limit), count) - count]), [1, 2])
    return tf.pad(rows, padding), tf.pad(values, padding)


def _single(problem):
    """Batch 1: the active blocks' tiles of the non-zero inputs, one product."""
    x = problem.first_input
    sparse_rows, _ = problem.first_rows_sparse
    blocks_of = tf.cast(tf.where(problem.first_active)[:, 0], tf.int32)  # (n,)

    def some_rows():
        rows = tf.cast(tf.where(problem.first_nonzero)[:, 0], tf.int32)
        rows, values = _padded(rows, tf.gather(x, rows), problem.input_dim)
        # (r, n, block_size), gathered row by row so that one plain matrix
        # product reads it as (r, n * block_size).
        weights = tf.gather(problem.tiles, rows[:, None] + blocks_of[None, :] * problem.input_dim)
        outputs = tf.matmul(values[None, :], tf.reshape(weights, [tf.size(rows), -1]))
        return tf.reshape(outputs, [-1, problem.block_size])

    def copied():
        # One contiguous copy per block.
        weights = tf.gather(problem.block_kernel, blocks_of)  # (n, input_dim, block_size)
        return tf.matmul(x[None, None, :], weights)[:, 0, :]

    def every_row():
        row = x[None, :]
        return _in_place_or(
            problem.block_kernel, blocks_of, lambda k, weights: tf.matmul(row, weights), copied
        )

    outputs = tf.cond(sparse_rows, some_rows, every_row)
    return problem.finish(outputs, None, blocks_of)


def _single_or(problem, single, batched):
    """`single(problem)` at batch 1, else `batched(problem)`, called, not inlined.

    Each gets its own copy of the problem (statistics in its own graph); the
    batched branch's ops cost one op at batch 1 (see `called_branch`).
    """
    return tf.cond(
        tf.equal(problem.batch, 1),
        lambda: single(problem.fresh()),
        called_branch(lambda: batched(problem.fresh())),
    )


def _per_example(problem):
    return _single_or(problem, _single, _per_example_batched)


def _per_example_batched(problem):
    """Each (example, active block) pair times the weight tiles of its
    example's non-zero input chunks: one `(chunk, block_size)` tile, copied,
    per (example, block, chunk) triple, one batched product, and the
    triples of a pair summed by the scatter."""
    inputs = tf.reshape(problem.inputs, [-1, problem.chunks, problem.chunk])
    # Made again here: `"auto"`'s tile count made them inside a `tf.cond`
    # branch, whose tensors this graph cannot read.
    nonzero_chunks = _nonzero_chunks(problem.inputs, problem.chunk)
    triples = tf.where(  # (T, 3): example, block, chunk
        tf.logical_and(problem.active[:, :, None], nonzero_chunks[:, None, :])
    )
    values = tf.gather_nd(inputs, tf.gather(triples, [0, 2], axis=1))  # (T, chunk)
    # Tile `j * chunks + c` is rows `c * chunk ...` of block j: contiguous.
    tiles = tf.reshape(
        problem.block_kernel, [problem.blocks * problem.chunks, problem.chunk, problem.block_size]
    )
    weights = tf.gather(tiles, triples[:, 1] * problem.chunks + triples[:, 2])
    products = tf.matmul(values[:, None, :], weights)[:, 0, :]  # (T, block_size)
    shape = tf.stack([tf.cast(problem.batch, tf.int64), problem.blocks, problem.block_size])
    return _finish_blocks(problem, tf.scatter_nd(triples[:, :2], products, shape))


def _used_input_rows(problem):
    """Indices and columns of the input units non-zero in some example, and
    whether they are a subset."""
    def sparse():
        rows = tf.cast(tf.where(problem.used_inputs)[:, 0], tf.int32)
        return rows, tf.gather(problem.inputs, rows, axis=1)

    def dense():
        return tf.range(problem.input_dim), problem.inputs

    sparse_enough = problem.used_input_count <= problem.sparse_limit
    rows, inputs = tf.cond(sparse_enough, sparse, dense)
    return rows, inputs, sparse_enough


def _grouped(problem):
    in_place = problem.grouped_in_place
    active = tf.transpose(problem.active)  # (blocks, batch)
    pairs = tf.where(active)  # (P, 2): block, example; sorted by block
    blocks_of_pairs, examples = tf.cast(pairs[:, 0], tf.int32), pairs[:, 1]
    counts = problem.block_counts
    # In place every block has its row of slots (an unused block's slots
    # multiply padding); else only the blocks some example uses.
    kept = tf.logical_or(counts > 0, in_place)
    kept_blocks = tf.cast(tf.where(kept)[:, 0], tf.int32)
    slot_block = tf.cumsum(tf.cast(kept, tf.int32)) - 1  # block -> its slot row
    starts = tf.cumsum(counts, exclusive=True)
    position = tf.range(tf.size(examples)) - tf.gather(starts, blocks_of_pairs)
    slots = tf.stack([tf.gather(slot_block, blocks_of_pairs), position], axis=1)
    # Example index per (kept block, slot). Empty slots read example 0: their
    # products are never gathered back (each row of a product depends on
    # its own input row alone), so the input needs no appended zero row,
    # which copied it whole. An empty batch has no slots.
    slot_examples = tf.tensor_scatter_nd_update(
        tf.zeros(tf.stack([tf.size(kept_blocks), problem.capacity]), tf.int64),
        slots,
        examples,
    )
    rows, inputs, sparse_rows = tf.cond(
        in_place,
        lambda: (tf.range(problem.input_dim), problem.inputs, tf.constant(False)),
        lambda: _used_input_rows(problem),
    )
    grouped_inputs = tf.gather(inputs, slot_examples)  # (n, C, r)

    def some_rows():
        return tf.matmul(grouped_inputs, _row_tiles(problem, kept_blocks, rows))

    def whole_blocks():
        # Each used block's examples times its weights read in place when
        # the blocks are few, else one contiguous copy per block.
        return _in_place_or(
            problem.block_kernel, kept_blocks,
            lambda k, weights: tf.matmul(grouped_inputs[k:k + 1], weights),
            lambda: tf.matmul(grouped_inputs, tf.gather(problem.block_kernel, kept_blocks)),
        )

    products = tf.cond(  # (n, C, block_size)
        in_place,
        lambda: tf.matmul(grouped_inputs, problem.block_kernel),
        lambda: tf.cond(sparse_rows, some_rows, whole_blocks),
    )
    outputs = tf.gather_nd(products, slots)
    return problem.finish(outputs, examples, blocks_of_pairs)


def _static_capacity(problem, capacity=None):
    batch = problem.batch
    capacity = batch if capacity is None else tf.constant(capacity, tf.int32)
    active = tf.cast(problem.active, tf.int32)  # (batch, blocks)
    position = tf.cumsum(active, axis=0) - 1
    kept = tf.logical_and(problem.active, position < capacity)
    slot = tf.where(kept, position, capacity)  # dropped and inactive -> dump slot
    block_ids = tf.broadcast_to(tf.range(problem.blocks)[None, :], tf.shape(slot))
    example_ids = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(slot))
    slot_examples = tf.tensor_scatter_nd_update(
        tf.fill(tf.stack([problem.blocks, capacity + 1]), batch),
        tf.reshape(tf.stack([block_ids, slot], axis=-1), [-1, 2]),
        tf.reshape(example_ids, [-1]),
    )[:, :capacity]
    # Inactive pairs all write the dump slot, so a kept pair's slot is its own.
    padded = tf.concat([problem.inputs, tf.zeros_like(problem.inputs[:1])], axis=0)
    grouped_inputs = tf.gather(padded, slot_examples)  # (blocks, C, d)
    grouped = tf.matmul(grouped_inputs, problem.block_kernel)  # (blocks, C, block_size)
    gather_at = tf.stack([block_ids, tf.minimum(slot, capacity - 1)], axis=-1)
    outputs = tf.gather_nd(grouped, gather_at)  # (batch, blocks, s)
    if problem.bias is not None:
        outputs = outputs + tf.reshape(problem.bias, [problem.blocks, problem.block_size])
    # A skipped pair read the zero padding (activation(bias)), which may
    # overflow: zeroed so that inf * 0 is not NaN.
    outputs = tf.math.multiply_no_nan(
        problem.activation(outputs), tf.cast(kept, outputs.dtype)[:, :, None]
    )
    return tf.reshape(outputs, [batch, problem.units])


def _masked(problem):
    """The dense product and the mask, from the block-major layout.

    The products, as `(batch, blocks, block_size)`, get bias, activation and
    mask there: the bias as a `(blocks, block_size)` row, the mask broadcast
    over each block's units, so it needs no expanding to units. At batch 1
    they are one batched product over the blocks, transposed; above batch 1,
    where TensorFlow's batched product is slow, blocks of up to
    `_COPIED_PRODUCT_MAX_BLOCK` units multiply the kernel copied to the
    Dense layout (on several threads only above
    `_THREADS_PER_BLOCK_MAX_BATCH`), other blocks one product each. The mask
    is applied by `multiply_no_nan`, 0 wherever the mask is, so that an
    infinite output of a skipped block (a float16 overflow) is 0 as in the
    skipping paths: one op, as the plain product (Bengio MLP, density 3/4,
    one thread, A/B in one process: at batch 1 0.905x-0.921x of Dense
    against 0.920x-0.922x for the plain product and 0.904x-0.912x for a
    select, at batch 50 0.910x-0.924x against 0.926x-0.955x and
    0.914x-0.979x: the same within the noise). The engine's activations are
    element-wise, so their order with the transpose does not matter
    (`block_dense`, which trains, applies them over the units, as Keras does
    for any activation). Measured, Bengio MLP, one thread, with
    the batched product at every batch:
    - bias and activation in block-major, the mask over units, against
      `block_dense`: 0.94x-0.95x -> 0.97x-0.98x of Dense at batch 50;
    - the mask after the transpose: +2% at batch 1, +0-2% at batch 50
      (density 3/4, A/B in one process);
    - then bias and activation after it too, and `-1` for the batch in the
      final reshape (no shape tensor passed into the branch): +2-3% at
      batch 1, +1-6% at batch 50 (density 3/4, A/B in one process).
    """
    x, kernel = problem.inputs, problem.block_kernel

    def above_batch_1():
        if problem.block_size > _COPIED_PRODUCT_MAX_BLOCK:
            products = per_block_product(x, kernel)
        elif intra_op_threads() > 1:
            products = tf.cond(
                problem.batch <= _THREADS_PER_BLOCK_MAX_BATCH,
                lambda: per_block_product(x, kernel),
                lambda: copied_product(x, kernel),
            )
        else:
            products = copied_product(x, kernel)
        return tf.reshape(products, [-1, problem.blocks, problem.block_size])

    return _finish_blocks(
        problem, tf.cond(problem.batch > 1, above_batch_1, lambda: batched_products(x, kernel))
    )


# The dense product's forms over the block-major kernel, of `inputs`
# `(batch, input_dim)` (also timed by benchmarks/block_major_products.py).
def batched_products(inputs, block_kernel):
    """`(batch, blocks, block_size)`: one batched product over the blocks."""
    return tf.transpose(tf.matmul(inputs[None], block_kernel), [1, 0, 2])


def copied_product(inputs, block_kernel):
    """`(batch, units)`: the kernel copied to the Dense layout, one product."""
    return tf.matmul(inputs, from_block_kernel(block_kernel))


def per_block_product(inputs, block_kernel):
    """`(batch, units)`: one 2-D product a block, of the unstacked kernel."""
    return tf.concat([tf.matmul(inputs, weights) for weights in tf.unstack(block_kernel)], axis=1)


def _finish_blocks(problem, outputs):
    """Bias, activation and mask of `(batch, blocks, block_size)` products."""
    if problem.bias is not None:
        outputs = outputs + tf.reshape(problem.bias, [problem.blocks, problem.block_size])
    # 0 where the mask is, even for an infinite output of a skipped block.
    outputs = tf.math.multiply_no_nan(problem.activation(outputs), problem.block_mask[:, :, None])
    return tf.reshape(outputs, [-1, problem.units])


def _rows_read(problem, count, sparse=None):
    """Input rows a product reads for `count` non-zero inputs: those, if few
    enough (`sparse`, when the caller has already compared them)."""
    if sparse is None:
        sparse = count <= problem.sparse_limit
    return tf.where(sparse, count, float(problem.input_dim))


def _copied_cost(problem, blocks, rows, capacity):
    """Copying `blocks` blocks' `rows` tiles, then their batched product."""
    s, c = float(problem.block_size), _COSTS
    return blocks * rows * s / c["copy"] + blocks * capacity * rows * s / c["batched"]


def _masked_cost(problem, batch):
    """The dense product's estimate: a Python float for a Python `batch`."""
    return _dense_product_cost(problem.input_dim, problem.units, batch)


def _dense_product_cost(input_dim, units, batch):
    weights = float(input_dim * units)
    maximum = max if isinstance(batch, (int, float)) else tf.maximum
    return maximum(batch * weights / _COSTS["gemm"], weights / _COSTS["read"])


def grouped_cost(problem):
    """The cost-model estimate (ns) of `"grouped"` for this call."""
    s = float(problem.block_size)
    capacity = tf.cast(problem.capacity, tf.float32)
    copied = _copied_cost(problem, problem.used_block_count, problem.rows_read, capacity)
    # In place, the product streams the whole kernel like the dense one.
    every = float(problem.blocks * problem.input_dim) * s
    in_place = tf.maximum(every * capacity / _COSTS["batched"], every / _COSTS["read"])
    return tf.where(problem.grouped_in_place, in_place, copied) + _COSTS["batched_overhead"]


def per_example_cost(problem):
    """The cost-model estimate (ns) of `"per_example"` above batch 1: the
    copied cost of its tiles, one example each. With a dense input (every
    chunk read) it copies each used block once per example using it, where
    `"grouped"`'s copied cost counts it once for all of them."""
    tiles = _copied_cost(problem, problem.tile_count, float(problem.chunk), 1.0)
    return tiles + _COSTS["batched_overhead"]


BATCHED_CHOICES = ("masked", "grouped", "per_example")


def batched_choice(problem):
    """`"auto"`'s path above batch 1 (under half the pairs active), as
    an index into `BATCHED_CHOICES`: the cheapest by the cost model (the
    dense fallback on a tie)."""
    costs = tf.stack([
        _masked_cost(problem, tf.cast(problem.batch, tf.float32)),
        grouped_cost(problem),
        per_example_cost(problem),
    ])
    return tf.argmin(costs, output_type=tf.int32)


def mostly_active(problem, fraction=_AUTO_MAX_FRACTION):
    """At least `fraction` of the (example, block) pairs are active.

    `"auto"` then runs the dense fallback without evaluating the cost model:
    skipping never paid there in `benchmarks/gated_dense.py`. (False for an
    empty batch.)
    """
    # The mean of the 0/1 mask (a no-op cast in float32): no compare.
    return tf.reduce_mean(problem._float_mask) >= fraction


def single_skipping_can_pay(problem):
    """Whether the batch-1 skipping graph can ever cost less than the dense
    product for this layer's shape (static): its fixed cost `overhead`
    alone must be below the dense product's. When it cannot (784 -> 256,
    say), `"auto"` at batch 1 runs the dense fallback with no decision ops
    (784 -> 256 in 16 blocks at batch 1, one thread, A/B in one process:
    0.75x -> 0.86x-0.87x of Dense; forced `"masked"` 0.89x-0.90x)."""
    return skipping_can_pay_at_batch_1(problem.input_dim, problem.units)


def skipping_can_pay_at_batch_1(input_dim, units):
    """`single_skipping_can_pay` for a layer of this shape (a Python bool)."""
    return _COSTS["overhead"] < _dense_product_cost(input_dim, units, 1)


def batched_skipping_can_pay(problem):
    """Whether a skipping path above batch 1 can cost less than the dense
    product at this batch size: its fixed cost `batched_overhead` alone must
    be below the dense product's. Two scalar ops on the batch size, before
    any statistic: a small layer at a small batch (784 -> 256 below batch 77)
    runs the dense fallback without them. `True` itself when the dense
    product's cost exceeds it at any batch size (no ops)."""
    if _masked_cost(problem, 1) > _COSTS["batched_overhead"]:
        return True
    return _masked_cost(problem, tf.cast(problem.batch, tf.float32)) > _COSTS["batched_overhead"]


def single_skipping_pays(problem):
    """Whether `"auto"` skips at batch 1 (`_single`): the cost model's batch-1
    case (the copied grouped cost, one example), from the example alone.
    `"auto"` asks it only when under half the blocks are active
    (`mostly_active` comes first)."""
    sparse, count = problem.first_rows_sparse
    active = tf.reduce_sum(tf.cast(problem.first_active, tf.float32))
    rows = _rows_read(problem, count, sparse)
    # `_copied_cost(problem, active, rows, 1) + overhead < _masked_cost(problem,
    # 1)`, solved for `active * rows` with Python floats: two ops, not ten.
    per_row = _copied_cost(problem, 1.0, 1.0, 1.0)  # a Python float
    return active * rows < (_masked_cost(problem, 1) - _COSTS["overhead"]) / per_row


def _native(problem):
    """The native op's products of the active blocks (`native_kernels`), in
    float32 (another dtype is cast there and back)."""
    if load_native_kernels() is None:
        raise RuntimeError(
            "path='native' needs keras_condcomp's native kernels, which are not "
            f"available: {native_kernels_error()}"
        )
    dtype = problem.inputs.dtype
    inputs, block_kernel, bias, block_mask = (
        None if value is None else tf.cast(value, tf.float32)
        for value in (problem.inputs, problem.block_kernel, problem.bias, problem.block_mask)
    )
    activation = None if problem.activation is _identity else problem.activation
    if native_activation(activation) is not None:
        outputs = native_block_sparse_dense(inputs, block_kernel, bias, block_mask, activation)
    else:  # another activation: applied here, to the active blocks only
        outputs = native_block_sparse_dense(inputs, block_kernel, bias, block_mask)
        active = tf.repeat(block_mask > 0, problem.block_size, axis=1)
        outputs = tf.where(active, activation(outputs), tf.zeros_like(outputs))
    return tf.cast(outputs, dtype)


def native_fallback_fraction(block_size):
    """Above batch 1, the fraction of active (example, block) pairs from
    which `"auto"` on the native kernels runs the dense fallback instead,
    for blocks of `block_size` units: with kernels built for AVX2, 15/16 on
    one thread (`intra_op_threads`) for blocks of at least 64 units; else 0
    (never).

    With AVX-512 on a 2-core AMD EPYC (Zen 4, session 47, benchmark run,
    batches 50 and 256, densities 7/8 and 1), the native op beat the dense
    fallback in all 16 cells: one thread, Bengio MLP 0.98x-1.12x of Dense
    against 0.84x-0.88x, 784 -> 256 0.89x-1.04x against 0.80x-0.86x; two
    threads 0.82x-1.10x against 0.69x-0.83x. (On a 2-core Xeon, one thread,
    with session 38's kernels, the fallback had won with every pair active,
    0.98x against 1.06x at batch 256, so it ran from 7/8 on AVX-512 until
    session 47.)

    With AVX2 (a 2-core AMD EPYC, session 43, the whole model's graph
    against Dense's, A/B in one process, batches 50 and 256, four runs
    unless said), since the fallback multiplies each block by its own
    product (session 41), native op against fallback:
    - one thread, every pair active, blocks of 64 units and more: the
      fallback ahead in 15 cells of 16, by up to 27% (Bengio MLP
      0.88x-1.24x of Dense against 1.12x-1.32x, 1024 -> 1024 1.10x-1.59x
      against 1.22x-1.66x; 1024 -> 8 x 128 1.06x-1.08x against
      1.23x-1.36x, one run), and at 15/16 in 7 of 10 (level in one; two
      runs);
    - one thread, 7/8 active: either ahead, by up to 17% (1024 -> 1024
      1.24x-1.85x against 1.25x-1.69x), so the bar is above 7/8;
    - blocks of 32 units and fewer, or two threads: the native op level
      or ahead (784 -> 256 at density 1 0.77x-0.86x against 0.65x-0.78x;
      two threads, 7/8 and 1, 0.85x-1.44x against 0.70x-0.94x; one run
      each).
    """
    if (native_vector_lanes() == 8 and intra_op_threads() == 1
            and block_size >= _NATIVE_ONE_THREAD_FALLBACK_MIN_BLOCK):
        return _NATIVE_ONE_THREAD_FALLBACK_FRACTION
    return 0.0


def native_runs(problem):
    """Whether `"auto"` runs the native path (with the dense fallback) for
    this call: the native kernels are loaded and the layer computes in
    float32."""
    return load_native_kernels() is not None and problem.inputs.dtype == tf.float32


def native_gated_inference(
    inputs, policy_kernel, policy_bias, block_kernel, bias, activation, path="auto"
):
    """A GatedDense layer's threshold inference as one native op, its policy
    included (`native_gated_dense_or_fallback`): for path `"native"` the
    op's products, for `"auto"` also `"auto"`'s dense fallback above batch
    1, where at least `native_fallback_fraction` of the pairs are active
    (the op then computes no product and the `"masked"` path runs with its
    mask). In a graph, one op and a cond where the policy's ops and
    `"auto"`'s choice took about 13 (Bengio MLP at density 1/16, batch 1,
    one thread, A/B in one process: 3.28x of Dense against 2.98x)."""
    fallback = native_fallback_fraction(block_kernel.shape[-1]) if path == "auto" else 0.0
    outputs, block_mask, computed = native_gated_dense_or_fallback(
        inputs, policy_kernel, policy_bias, block_kernel, bias, activation, fallback
    )
    if not fallback:
        return outputs
    return tf.cond(
        computed,
        lambda: outputs,
        lambda: block_sparse_dense(
            inputs, block_kernel, bias, block_mask, activation, path="masked"
        ),
    )


def _auto(problem):
    if native_runs(problem):
        # The native op beat every other path at batch 1, at every density
        # (Bengio MLP, one thread: about 3x of Dense at 1/16 and 1.2x at 3/4,
        # against 2x and 0.9x for the TensorFlow paths); above batch 1 the
        # dense fallback wins only where nearly every pair is active, with
        # AVX2 on one thread for wide blocks (`native_fallback_fraction`;
        # guide "How skipping runs fast").
        fraction = native_fallback_fraction(problem.block_size)
        if not fraction:
            return _native(problem)
        dense = tf.logical_and(problem.batch > 1, mostly_active(problem, fraction))
        return tf.cond(
            dense, lambda: _masked(problem.fresh()), lambda: _native(problem.fresh())
        )
    # Without the native kernels. At least half the pairs active: the dense
    # fallback, whatever the batch, after one cond. Else one called function by batch size: batch 1
    # decides between `_single` and the dense fallback from the example
    # alone, larger batches between the batched paths and the dense
    # fallback from their statistics (when the batch size alone does not
    # rule the batched paths out: then the dense fallback, no call).
    # Skipping graphs are called, not inlined: an inlined branch not taken
    # still costs each of its ops, a called one one op; and one call deep,
    # as each call costs tens of microseconds. (Bengio MLP, one thread, A/B
    # in one process: the batched branch called took density 3/4 and batch
    # 50 from 0.82x-0.85x to 0.88x-0.89x of Dense and batch 256 from 0.94x
    # to 0.96x; then the whole skipping side called, +5% at 3/4 and batch 1,
    # +2% at 1/4, +0-6% at 1/16 and batch 50, -1-2% at 1/16 and batch 1 and
    # -2-3.5% at 1/32, where the call costs more than the untaken dense
    # fallback's ops. A layer with no batch-1 skipping graph takes one branch
    # and no call at batch 1: 784 -> 256 +7%. The called side makes its own
    # tiles view and batch size (`remade`), so the fallback's graph makes
    # neither: 3/4 +1-2%, 1/16 +1-6%. One call by batch size, where the
    # batches above 1 made a second call inside the first: +7-12% at 1/16
    # and batches 4, 50 and 256, +6-11% at 1/4 and batches 4 and 50, +0-4%
    # at batch 1; 1024 -> 1024 at 1/16 +5-7% at batches 1 and 50.)
    def skipping(problem):
        problem.compute_statistics()
        paths = {"masked": _masked, "grouped": _grouped, "per_example": _per_example_batched}
        return tf.switch_case(
            batched_choice(problem),
            [functools.partial(paths[name], problem) for name in BATCHED_CHOICES],
        )

    def single_or_masked(problem):
        problem.share_first_example()
        return tf.cond(
            single_skipping_pays(problem),
            lambda: _single(problem.fresh()),
            lambda: _masked(problem.fresh()),
        )

    def masked():
        return _masked(problem.fresh())

    batched = called_branch(lambda: skipping(problem.remade()))
    is_single = tf.equal(problem.batch, 1)
    if not single_skipping_can_pay(problem):
        # No batch-1 skipping graph: one branch, no call, at batch 1.
        dense = tf.logical_or(is_single, mostly_active(problem))
        return tf.cond(
            tf.logical_or(dense, tf.logical_not(batched_skipping_can_pay(problem))),
            masked, batched,
        )

    def sparse():
        single = called_branch(lambda: single_or_masked(problem.remade()))
        can_pay = batched_skipping_can_pay(problem)
        if can_pay is True:
            return tf.cond(is_single, single, batched)
        # The dense fallback, batch 1's call, the larger batches' call.
        branch = tf.where(is_single, 1, tf.where(can_pay, 2, 0))
        return tf.switch_case(branch, [masked, single, batched])

    return tf.cond(mostly_active(problem), masked, sparse)


_PATHS = {
    "auto": _auto,
    "native": _native,
    "per_example": _per_example,
    "grouped": _grouped,
    "static_capacity": _static_capacity,
    "masked": _masked,
}
_compiled = {}


def _compiled_path(path, activation, kernel_shape, dtype, has_bias, capacity):
    key = (path, activation, kernel_shape, dtype, has_bias, capacity, trace_settings())
    if key not in _compiled:
        blocks, input_dim, block_size = kernel_shape
        signature = [
            tf.TensorSpec([None, input_dim], dtype),
            tf.TensorSpec(kernel_shape, dtype),
            tf.TensorSpec([blocks * block_size] if has_bias else [0], dtype),
            tf.TensorSpec([None, blocks], dtype),
        ]

        def run(inputs, block_kernel, bias, block_mask):
            problem = _Problem(
                inputs, block_kernel, bias if has_bias else None, block_mask, activation
            )
            if path == "static_capacity":
                return _static_capacity(problem, capacity)
            return _PATHS[path](problem)

        # No AutoGraph: the paths have no Python control flow on tensors.
        _compiled[key] = tf.function(
            run, input_signature=signature, autograph=False,
            jit_compile=path == "static_capacity" or None,
        )
    return _compiled[key]


# Not converted by AutoGraph in a caller's `tf.function`: no Python control
# flow on tensors, and converting the paths from their source is slow.
@tf.autograph.experimental.do_not_convert
def block_sparse_dense(
    inputs, block_kernel, bias, block_mask, activation=None, path="auto", capacity=None
):
    """Computes `masked_block_dense` without computing the skipped blocks.

    Args:
        inputs: `(batch, input_dim)` float tensor.
        block_kernel: `(blocks, input_dim, block_size)`, the block-major
            kernel (`to_block_kernel(kernel, blocks)` of a Dense kernel).
        bias: `(blocks * block_size,)` or None.
        block_mask: `(batch, blocks)`, 1 for an active block, 0 for a skipped one
            (no other values: the dense fallback multiplies by the mask, the
            skipping paths only test it against 0; called eagerly, other
            values raise a `ValueError`, in a graph they are not checked).
        activation: an element-wise callable applied to active blocks, or None.
            Called eagerly, each distinct callable compiles its own graph:
            pass the same function object (not a new lambda) every call.
        path: one of `EXECUTION_PATHS` (see the module docs).
        capacity: `"static_capacity"` only: example slots per block (default:
            the batch size, which never drops).

    Returns:
        `(batch, units)`, equal to `masked_block_dense(inputs,
        from_block_kernel(block_kernel), bias, block_mask, activation)` (for
        `"static_capacity"`, as long as no block has more than `capacity`
        active examples).

    Examples:
        >>> import numpy as np
        >>> from keras_condcomp.ops import to_block_kernel
        >>> x = np.random.rand(3, 8).astype("float32")
        >>> w = to_block_kernel(np.random.rand(8, 4).astype("float32"), 2)
        >>> mask = np.array([[1, 0], [0, 0], [1, 1]], "float32")
        >>> y = block_sparse_dense(x, w, None, mask)
        >>> bool(np.all(y.numpy()[1] == 0))
        True
    """
    _check_path(path)
    if capacity is not None and (
        path != "static_capacity" or not is_integer(capacity) or capacity <= 0
    ):
        raise ValueError(
            "`capacity` must be a positive int and is only used by "
            f"path='static_capacity'. Received: capacity={capacity!r}, path={path!r}"
        )
    capacity = None if capacity is None else int(capacity)
    inputs = tf.convert_to_tensor(inputs)
    block_kernel = tf.convert_to_tensor(block_kernel, dtype=inputs.dtype)
    block_mask = tf.cast(block_mask, inputs.dtype)
    if block_kernel.shape.rank != 3 or None in block_kernel.shape:
        raise ValueError(
            "`block_kernel` must have a static shape (blocks, input_dim, block_size). "
            f"Received: block_kernel.shape={tuple(block_kernel.shape)}"
        )
    blocks, input_dim, block_size = block_kernel.shape
    if inputs.shape.rank != 2 or inputs.shape[-1] != input_dim:
        raise ValueError(
            f"`inputs` must have shape (batch, {input_dim}) to match `block_kernel` "
            f"{tuple(block_kernel.shape)}. Received: inputs.shape={tuple(inputs.shape)}"
        )
    if block_mask.shape.rank != 2 or block_mask.shape[-1] != blocks:
        raise ValueError(
            f"`block_mask` must have shape (batch, {blocks}) to match `block_kernel` "
            f"{tuple(block_kernel.shape)}. Received: block_mask.shape={tuple(block_mask.shape)}"
        )
    check_block_mask(block_mask, inputs)
    check_activation(activation)
    has_bias = bias is not None
    bias = (
        tf.convert_to_tensor(bias, dtype=inputs.dtype)
        if has_bias
        else tf.zeros([0], inputs.dtype)
    )
    check_bias(bias if has_bias else None, blocks * block_size)
    if tf.inside_function() and path != "static_capacity":
        # Inlined into the caller's graph: a nested function call costs more
        # than the small layers it would wrap.
        problem = _Problem(
            inputs, block_kernel, bias if has_bias else None, block_mask,
            activation or _identity,
        )
        return _PATHS[path](problem)
    run = _compiled_path(
        path,
        activation or _identity,
        tuple(block_kernel.shape),
        inputs.dtype,
        has_bias,
        capacity,
    )
    return run(inputs, block_kernel, bias, block_mask)
