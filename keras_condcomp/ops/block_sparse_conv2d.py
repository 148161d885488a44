"""Block-sparse execution of a gated 2D convolution: skipped groups are not computed.

A gated convolution splits its `filters` output channels into `blocks` equal
groups switched per example by a `(batch, blocks)` mask. As in the dense
engine (`block_sparse_dense`), both sparsities are used:

- output: only the active groups' output channels are computed (the kernel
  is sliced to their columns); the others are written as exact zeros;
- input: only the input channels that are non-zero somewhere are read (the
  kernel is sliced to their rows). A skipped group of an upstream gated
  convolution outputs exact zeros, and pooling and ReLU keep zero channels
  zero, so this recovers the upstream mask from the input itself, whatever
  the layers in between; it is exact, since an all-zero channel adds nothing.
  Channels are read by chunks of up to `_CHANNEL_CHUNK` (8) consecutive ones
  (the largest divisor of `in_channels` up to 8); a skipped upstream group
  whose size is a multiple of the chunk zeros whole chunks. Copying single
  channels out of a channels-last tensor is one copy per position and
  channel (one thread, 32 of 128 channels at 32x32: 113 us one by one, 16
  us by chunks of 8). A chunk counts as used when one of its channels has
  a non-zero Euclidean norm (one pass over the input; a channel of values
  all below about 1e-19 in magnitude, whose squares underflow, counts as
  zero: it could add at most 1e-19 x the window's size x the largest weight
  to an output).

Inputs are channels-last `(batch, height, width, channels)`; the kernel has
the `(kernel_h, kernel_w, in_channels, filters)` layout of
`keras.layers.Conv2D`.

Paths (TensorFlow graphs; one trace serves every batch size):

- `"per_example"`: each example on its own: its non-zero input channels and
  its active output groups are gathered from the kernel, one convolution
  computes them, and a gather along the channel axis scatters them into the
  full channel layout (inactive channels read an appended zero channel). The
  input is not copied when every channel is non-zero (an image). At
  batch 1 this is a single convolution of the sliced kernel; at larger
  batches the examples run one after another in a `tf.map_fn` loop.
- `"grouped"`: a loop over the `blocks` output groups (a static number):
  the examples that use group `g` are gathered, the input channels non-zero
  in one of them are gathered, one convolution computes group `g` for them,
  and `tf.scatter_nd` puts the result back at their batch positions. The
  batched path: one convolution per group whatever the batch size.
- `"masked"`: the dense convolution, then the mask: the reference
  (`masked_block_conv2d`), and the fallback when skipping cannot pay.
- `"auto"`: picked per call inside the graph by the rule below.

Cost rule of `"auto"` (a rule of thumb from `benchmarks/gated_conv2d.py`,
not a fitted model), from the shapes and the fraction `f` of active
(example, group) pairs:

- `"masked"` when one output value costs fewer than `AUTO_MIN_OUTPUT_MACS`
  (256) multiply-adds (`kernel_h * kernel_w * in_channels`, static: no op
  decides it). Placing the computed groups in the full output costs a pass
  over it whatever the density, which such a convolution does not earn
  back (one thread, 8 groups, density 1/4, dense inputs, skipping against
  the masked convolution: 0.89x-0.95x at batch 1 and 0.47x-0.89x at batch
  32 for 27-144 multiply-adds, 0.98x-1.14x for 288 at 16x16 and 32x32). In
  the CIFAR-like stack at density 1/4 (A/B in one process), its first
  layer (3x3 on RGB: 27) masked instead of skipped took the stack from
  0.81x-0.82x to 0.84x-0.85x of Conv2D at batch 1 when each alternates
  with Conv2D alone (0.89x-0.93x to 0.97x-1.04x when six graphs alternate)
  and from 0.91x-0.97x to 1.13x-1.16x at batch 32 (six graphs);
- `"masked"` when `f >= AUTO_MAX_FRACTION` (0.5): from half the pairs up the
  dense convolution was as fast as skipping or faster (one thread: 0.85x-0.91x
  of Conv2D against 0.79x-0.90x for the best skipping path at density 1/2);
  for a convolution of at least `AUTO_LARGE_CONV_MACS` (5 * 10^7)
  multiply-adds an example, when `f >= AUTO_LARGE_MAX_FRACTION` (0.9)
  instead: there the convolution saved outweighs the gathers and the
  placement even at density 3/4 (the CIFAR-like stack at 32x32 throughout,
  7.5 * 10^7 and 1.5 * 10^8 an example in its second and third layers, one
  thread, forced `per_example` against `"masked"`: 1.45x against 0.93x of
  Conv2D at density 1/2 and batch 1, 1.15x against 0.92x at 3/4; the
  pooled stack's layers, 0.9 * 10^7 to 1.9 * 10^7, lose from density 1/2
  up: 0.82x against 0.87x, 0.77x against 0.88x);
- else, at batch 1, `"per_example"` (a single convolution) when one
  output value costs at least `AUTO_WIDE_OUTPUT_MACS` (512) multiply-adds
  or the example's convolution at least `AUTO_SINGLE_MIN_MACS` (10^7),
  else `"masked"`: a narrow, small convolution does not earn back the
  gathers and the placement (one thread, density 1/4, a gated 3x3
  convolution after a masked one, skipping against masking it: 288 an
  output value at 14x14 and 20x20, 3.6M and 7.4M an example, 0.77x-0.82x
  against 0.81x-0.87x of Conv2D; 432 at 14x14, 8.1M, 0.80x against 0.85x;
  but 288 at 28x28, 14.5M, 0.79x against 0.77x; 432 at 20x20 and 28x28,
  0.83x and 0.91x against 0.81x and 0.77x; 576 at 14x14, 0.91x against
  0.84x; the CIFAR-like stack's third layer, 1152 at 8x8, 9.4M, masked at
  batch 1 took the stack from 1.03x-1.07x to 0.97x-0.99x of Conv2D);
- else, at larger batches, `"grouped"` when the examples run on average at
  most `AUTO_GROUPED_MAX_GROUPS` (1.5) groups each (`f * blocks <= 1.5`);
  above, `"per_example"` if one example's dense convolution has at least
  `AUTO_LOOP_MIN_MACS` (10^6) multiply-adds and one output value at least
  `AUTO_WIDE_OUTPUT_MACS` (512), else `"masked"`. `"grouped"`
  gathers an example's input once per active group, `"per_example"` once
  per example plus a loop step, which costs as much as a small convolution
  (CIFAR-like stack, 1.8M-19M multiply-adds an example and layer, 8 groups,
  one thread, batch 32: at density 1/8 grouped 1.43x-1.67x vs per-example
  1.16x-1.34x of Conv2D, at 1/4 0.85x-1.08x vs 1.02x-1.17x, at 3/8 0.58x vs
  0.95x; batch 128: 1.29x vs 1.11x at 1/8, 0.69x vs 0.88x at 1/4. The
  digits CNN, 18K-295K an example and layer, at batch 256 and density 1/2:
  0.24x of Conv2D when its batches went to the loop). A looped example's
  convolution of few input channels runs far below the batch's speed: the
  MNIST CNN of `keras-condcomp train --model cnn` (14x14 inputs of 32
  channels, 64 filters: 288 multiply-adds an output value, 3.6M an
  example), one thread, the first layer masked, random masks, `"auto"`
  looping in its second layer against the masked convolution there: 0.54x
  against 0.73x of Conv2D at density 1/4 and batch 32, 0.50x against 0.78x
  at 3/8, 0.49x against 0.77x at 0.47, 0.46x against 0.63x at 0.47 and
  batch 256; with 40 and 48 channels in (360 and 432 an output value,
  5.6M and 8.1M an example) 0.59x against 0.71x and 0.63x against 0.78x at
  1/4 and batch 32; with 64 (576, 14.5M) the loop won, 1.03x against
  0.82x, as on the CIFAR-like stack (576 and 1152). A convolution of at
  least `AUTO_LARGE_CONV_MACS` multiply-adds an example is grouped only
  while, on average, at most `AUTO_LARGE_GROUPED_MAX_EXAMPLES` (4) examples
  share a group (`f * batch <= 4`): a group's convolution reads every input
  channel used by one of its examples, which behind another gated layer
  grows with their number far beyond each example's own, and for such a
  convolution that outweighs the loop's steps (the CIFAR-like stack at
  32x32 throughout, batch 32, one thread, first layer masked, forced paths
  in the other two: looped 32.4-32.5 ms, the third layer grouped 44.8-45.6
  ms at density 1/4, 6-8 examples a group; looped 27.4-30.5 ms, grouped
  30.9-35.5 ms at 3/16, 5-6; grouped 23.7-25.7 against looped 25.5-27.2
  ms at 1/8, 4; 17.7-17.8 against 24.7-24.8 ms at 1/16, 2. `"auto"` with
  this rule against the one before, in one process: +23-27% at density 1/4
  and batch 32, within +-3% at 1/16-3/16 and at batches 4 and 8). When
  TensorFlow's ops run on several threads (`intra_op_threads`, read when
  the graph is traced), only a large convolution (`AUTO_LARGE_CONV_MACS`)
  is looped over, a smaller one masked: the batch's convolution then runs
  on every thread, the loop's small convolutions and bookkeeping barely on
  two (the CIFAR-like stack, two cores, TensorFlow's default threads,
  batch 32, density 1/4: forced paths in the second and third layers,
  looped 0.66x of Conv2D, masked 0.86x-0.88x, grouped 0.90x-0.91x; `"auto"`
  against the rule before, in one process: 0.61x-0.62x -> 0.83x at 1/4 and
  0.63x-0.64x -> 0.84x at 1/2 at batch 32, 0.68x -> 0.77x at 1/4 and batch
  8, within 2% at 1/8; the same stack at 32x32 throughout still gains from
  the loop there: 1.48x looped, 1.41x grouped, 0.91x masked).

The batched branch is called as a function, not inlined
(`_branches.called_branch`), so its graph costs nothing at batch 1.

Input-channel sparsity is not counted by the rule (it only makes skipping
cheaper); computing it would cost a pass over the input before the choice.
On a loaded 2-core machine each extra graph op costs far more than its
arithmetic, so the skipping paths win less than the ideal MACs ratio.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_condcomp._arguments import check_activation, check_bias, is_integer
from keras_condcomp.ops._block_masks import check_block_mask
from keras_condcomp.ops._branches import called_branch
from keras_condcomp.ops._chunks import largest_divisor
from keras_condcomp.ops._threads import intra_op_threads, intra_op_threads_key

__all__ = [
    "AUTO_GROUPED_MAX_GROUPS",
    "AUTO_LARGE_CONV_MACS",
    "AUTO_LARGE_GROUPED_MAX_EXAMPLES",
    "AUTO_LARGE_MAX_FRACTION",
    "AUTO_LOOP_MIN_MACS",
    "AUTO_MAX_FRACTION",
    "AUTO_MIN_OUTPUT_MACS",
    "AUTO_SINGLE_MIN_MACS",
    "AUTO_WIDE_OUTPUT_MACS",
    "CONV2D_EXECUTION_PATHS",
    "block_sparse_conv2d",
    "masked_block_conv2d",
]

CONV2D_EXECUTION_PATHS = ("auto", "per_example", "grouped", "masked")
AUTO_MAX_FRACTION = 0.5
AUTO_LARGE_MAX_FRACTION = 0.9
AUTO_LARGE_CONV_MACS = 5e7
AUTO_GROUPED_MAX_GROUPS = 1.5
AUTO_LARGE_GROUPED_MAX_EXAMPLES = 4.0
AUTO_LOOP_MIN_MACS = 1e6
AUTO_WIDE_OUTPUT_MACS = 512
AUTO_MIN_OUTPUT_MACS = 256
AUTO_SINGLE_MIN_MACS = 1e7
_CHANNEL_CHUNK = 8


def _pair(value, name):
    received = value
    if is_integer(value):
        value = (value, value)
    value = tuple(value) if isinstance(value, (tuple, list)) else value
    if not (
        isinstance(value, tuple) and len(value) == 2 and all(is_integer(v) and v > 0 for v in value)
    ):
        raise ValueError(
            f"`{name}` must be a positive int or a tuple of 2 positive ints. "
            f"Received: {name}={received!r}"
        )
    return tuple(int(v) for v in value)


def _check_padding(padding):
    if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
        raise ValueError(
            f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}"
        )
    return padding.lower()


def masked_block_conv2d(
    inputs,
    kernel,
    bias,
    block_mask,
    activation=None,
    strides=(1, 1),
    padding="valid",
    dilation_rate=(1, 1),
    data_format="channels_last",
):
    """`activation(conv2d(inputs, kernel) + bias) * mask`, the mask repeated per group.

    The reference every skipping path is tested against, and the dense
    fallback: it computes all the work (it is never faster than
    `keras.layers.Conv2D`). Backend-agnostic (`keras.ops`).

    Args:
        inputs: `(batch, height, width, in_channels)` (or channels first).
        kernel: `(kernel_h, kernel_w, in_channels, filters)`.
        bias: `(filters,)` or None.
        block_mask: `(batch, blocks)`, 1 for an active group of
            `filters // blocks` output channels, 0 for a skipped one.
        activation: a callable or None.
        strides: as in `keras.layers.Conv2D`.
        padding: as in `keras.layers.Conv2D`.
        dilation_rate: as in `keras.layers.Conv2D`.
        data_format: as in `keras.layers.Conv2D`.

    Returns:
        The convolution's output; exactly 0 in the channels of skipped groups.

    Examples:
        >>> import numpy as np
        >>> x = np.random.rand(2, 5, 5, 3).astype("float32")
        >>> w = np.random.rand(3, 3, 3, 4).astype("float32")
        >>> y = masked_block_conv2d(x, w, None, np.array([[1, 0], [0, 1]], "float32"))
        >>> tuple(y.shape), float(np.abs(np.asarray(y)[0, ..., 2:]).max())
        ((2, 3, 3, 4), 0.0)
    """
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            "`data_format` must be 'channels_last' or 'channels_first'. "
            f"Received: data_format={data_format!r}"
        )
    padding = _check_padding(padding)
    inputs, block_mask = ops.convert_to_tensor(inputs), ops.convert_to_tensor(block_mask)
    filters, blocks = kernel.shape[-1], block_mask.shape[-1]
    if blocks is None or filters % blocks:
        raise ValueError(
            f"`block_mask` must have shape (batch, blocks) with blocks dividing "
            f"filters={filters}. Received: block_mask.shape={tuple(block_mask.shape)}"
        )
    channel_axis = -1 if data_format == "channels_last" else 1
    if inputs.shape[0] == 0:
        # TensorFlow's convolution of an empty batch keeps the input's rows
        # and columns (2.21): the empty output is made here.
        spatial = inputs.shape[1:3] if channel_axis == -1 else inputs.shape[2:4]
        strides, dilation_rate = _pair(strides, "strides"), _pair(dilation_rate, "dilation_rate")
        sizes = [
            _output_size(size, k, s, d, padding.upper())
            for size, k, s, d in zip(spatial, kernel.shape[:2], strides, dilation_rate)
        ]
        shape = (0, *sizes, filters) if channel_axis == -1 else (0, filters, *sizes)
        return ops.zeros(shape, inputs.dtype)
    # TensorFlow's CPU Conv2D kernel refuses NCHW without oneDNN (2.21;
    # Keras's own channels_first Conv2D fails there too): convolve
    # channels-last.
    transposed = channel_axis == 1 and keras.backend.backend() == "tensorflow"
    outputs = ops.conv(
        ops.transpose(inputs, (0, 2, 3, 1)) if transposed else inputs, kernel,
        strides=strides, padding=padding, dilation_rate=dilation_rate,
        data_format="channels_last" if transposed else data_format,
    )
    if transposed:
        outputs = ops.transpose(outputs, (0, 3, 1, 2))
    if bias is not None:
        shape = (1, -1, 1, 1) if channel_axis == 1 else (-1,)
        outputs = outputs + ops.reshape(bias, shape)
    if activation is not None:
        outputs = activation(outputs)
    active = ops.repeat(block_mask, filters // blocks, axis=-1) > 0
    active = active[:, :, None, None] if channel_axis == 1 else active[:, None, None, :]
    # A select, not a product: TensorFlow's graph optimiser mis-folds a
    # convolution times a constant broadcast mask into the kernel (crash).
    return ops.where(active, outputs, ops.convert_to_tensor(0, outputs.dtype))


def _identity(x):
    return x


class _Problem:
    """The shapes and options of one call, shared by the paths."""

    def __init__(self, inputs, kernel, bias, block_mask, activation, strides,
                 padding, dilation_rate):
        self.inputs = inputs
        self.kernel = kernel
        self.bias = bias
        self.activation = activation
        self.strides = strides
        self.padding = padding.upper()
        self.dilations = dilation_rate
        self.in_channels = kernel.shape[2]
        self.filters = kernel.shape[3]
        self.blocks = block_mask.shape[-1]
        self.group_size = self.filters // self.blocks
        self.batch = tf.shape(inputs)[0]
        self.block_mask = block_mask
        # Input channels are read by chunks of this many (see the module docs).
        self.chunk = _channel_chunk(self.in_channels)
        self.chunks = self.in_channels // self.chunk

    @property
    def active(self):
        """`(batch, blocks)` bool, made in the graph of the branch that reads
        it: the dense fallback and the skipping test read the 0/1
        `block_mask` itself."""
        return self.block_mask > 0

    def conv(self, inputs, kernel):
        return tf.nn.conv2d(
            inputs, kernel, strides=self.strides, padding=self.padding,
            dilations=self.dilations,
        )

    def chunk_used(self, inputs):
        """`(chunks,)` bool: chunk of input channels non-zero somewhere in `inputs`.

        Each channel's Euclidean norm, compared with 0: one pass over the
        input, where its largest magnitude took two (`abs`, then `max`), and
        `reduce_any(inputs != 0)` four times as long as those. `NaN` and
        infinities count as used. Computed in float32 (half-precision
        squares underflow from about 2e-4): a channel whose values are all
        below about 1e-19 in magnitude counts as zero, and could add at most
        1e-19 times the window's size times the kernel's largest weight to
        an output.
        """
        magnitudes = tf.math.reduce_euclidean_norm(tf.cast(inputs, tf.float32), axis=[0, 1, 2])
        magnitudes = tf.reduce_max(tf.reshape(magnitudes, [self.chunks, self.chunk]), axis=1)
        return tf.not_equal(magnitudes, 0)

    def used_channels(self, inputs, kernel, used_chunks):
        """`inputs` and `kernel` `(kh, kw, in_channels, ...)` restricted to
        the chunks `used_chunks` (int indices) of input channels."""
        spatial = [size if size is not None else -1 for size in inputs.shape[1:3]]
        if -1 in spatial:
            spatial = tf.unstack(tf.shape(inputs)[1:3])
        chunked = tf.reshape(inputs, [-1, *spatial, self.chunks, self.chunk])
        channels = tf.size(used_chunks) * self.chunk
        inputs = tf.reshape(tf.gather(chunked, used_chunks, axis=3), [-1, *spatial, channels])
        window, columns = kernel.shape[:2], kernel.shape[3:]
        chunked = tf.reshape(kernel, [*window, self.chunks, self.chunk, *columns])
        kernel = tf.gather(chunked, used_chunks, axis=2)
        return inputs, tf.reshape(kernel, [*window, channels, *columns])

    def finish(self, outputs, bias):
        if bias is not None:
            # bias_add, which TensorFlow fuses with the convolution (and ReLU).
            outputs = tf.nn.bias_add(outputs, bias)
        return self.activation(outputs)


def _channel_chunk(in_channels):
    """Input channels read together: the largest divisor of `in_channels`
    up to `_CHANNEL_CHUNK`. A skipped group upstream zeros whole chunks when
    its size is a multiple of the chunk (else a chunk it shares with an
    active group is read whole: more work, the same result)."""
    return largest_divisor(in_channels, _CHANNEL_CHUNK)


def _first_if_none(flags):
    """`flags`, with element 0 set when none is: a convolution needs one channel.

    `argmax` of all-False is 0, and of anything else an element already set,
    so this costs no branch.
    """
    first = tf.argmax(tf.cast(flags, tf.int32), output_type=tf.int32)
    return tf.logical_or(flags, tf.equal(tf.range(tf.size(flags)), first))


def _one_example(problem, inputs, active):
    """One example `(1, h, w, in)` with its `(blocks,)` active groups.

    At batch 1 this is the whole layer, so every op counts: shapes are
    constants wherever the input's spatial size is static.
    """
    blocks, size = problem.blocks, problem.group_size
    kernel_h, kernel_w = problem.kernel.shape[:2]
    kernel = tf.reshape(problem.kernel, [kernel_h, kernel_w, problem.in_channels, blocks, size])
    # Chunks of non-zero input channels, and chunk 0 always (a convolution
    # needs one channel; a zero one adds nothing): one op, where
    # `_first_if_none` is five.
    used = tf.logical_or(
        problem.chunk_used(inputs), tf.constant([c == 0 for c in range(problem.chunks)])
    )
    used_chunks = tf.reshape(tf.where(used), [-1])

    # Every channel used (an image, a dense upstream layer): no copy. Rows
    # before groups: the second gather then copies the fewer rows.
    inputs, kernel = tf.cond(
        tf.equal(tf.size(used_chunks), problem.chunks),
        lambda: (inputs, kernel),
        lambda: problem.used_channels(inputs, kernel, used_chunks),
    )
    # Active groups (group 0 computed, then discarded, if none is active).
    groups = tf.reshape(tf.where(_first_if_none(active)), [-1])
    kernel = tf.gather(kernel, groups, axis=3)
    kernel = tf.reshape(kernel, [kernel_h, kernel_w, tf.size(used_chunks) * problem.chunk, -1])
    outputs = problem.conv(inputs, kernel)
    bias = None
    if problem.bias is not None:
        bias = tf.reshape(tf.gather(tf.reshape(problem.bias, [blocks, size]), groups), [-1])
    outputs = problem.finish(outputs, bias)
    # Group g reads its position among the computed groups, or a zero group
    # appended after them (a product with the mask would turn an overflow
    # in a computed group into NaN in the skipped ones).
    rows, cols = outputs.shape[1:3]
    if rows is None or cols is None:
        rows, cols = tf.unstack(tf.shape(outputs)[1:3])
        zero_group = tf.zeros(tf.stack([1, rows, cols, 1, size]), outputs.dtype)
    else:
        zero_group = tf.zeros([1, rows, cols, 1, size], outputs.dtype)  # no shape ops
    outputs = tf.reshape(outputs, [1, rows, cols, -1, size])
    outputs = tf.concat([outputs, zero_group], axis=3)
    position = tf.where(active, tf.cumsum(tf.cast(active, tf.int32)) - 1, tf.size(groups))
    outputs = tf.gather(outputs, position, axis=3)
    return tf.reshape(outputs, [1, rows, cols, problem.filters])


def _example_loop(problem):
    """The examples of a batch one after another, each its own convolution."""
    def one(args):
        x, active = args
        return _one_example(problem, x[None], active)[0]

    # The static output shape of one example.
    spec = tf.TensorSpec(_output_shape(problem)[1:], problem.inputs.dtype)

    def loop():
        return tf.map_fn(one, (problem.inputs, problem.active), fn_output_signature=spec)

    if spec.shape.is_fully_defined():
        return loop()
    # map_fn cannot stack no results of an unknown shape.
    return tf.cond(
        problem.batch > 0,
        loop,
        lambda: tf.zeros([0, *_output_spatial(problem), problem.filters], spec.dtype),
    )


def _single_or(problem, batched):
    """One convolution at batch 1, else `batched()` (called, not inlined)."""
    static_batch = problem.inputs.shape[0]
    if static_batch is not None and static_batch != 1:
        # No batch-1 branch: its static batch of 1 would not take the
        # gradient of a larger batch (a tape around an inference call).
        return called_branch(batched)()
    return tf.cond(
        tf.equal(problem.batch, 1),
        # A gather, not `[0]`: a graph traced for a static empty batch builds.
        lambda: _one_example(problem, problem.inputs, tf.gather(problem.active, 0)),
        called_branch(batched),
    )


def _per_example(problem):
    return _single_or(problem, lambda: _example_loop(problem))


def _output_shape(problem):
    """The static `[None, out_h, out_w, filters]` (None where unknown)."""
    shape = problem.inputs.shape
    spatial = [
        _output_size(size, k, s, d, problem.padding)
        for size, k, s, d in zip(
            shape[1:3], problem.kernel.shape[:2], problem.strides, problem.dilations
        )
    ]
    return [None, *spatial, problem.filters]


def _output_spatial(problem):
    """`[out_h, out_w]`: Python ints where the input's size is static, else
    scalar tensors (computed from the input: on an empty batch TensorFlow
    2.21's convolution returns its input, whose shape is not the output's)."""
    dynamic = None
    spatial = []
    for axis, k, s, d in zip(
        (1, 2), problem.kernel.shape[:2], problem.strides, problem.dilations
    ):
        size = problem.inputs.shape[axis]
        if size is None:
            dynamic = tf.shape(problem.inputs) if dynamic is None else dynamic
            size = dynamic[axis]
        spatial.append(_output_size(size, k, s, d, problem.padding))
    return spatial


def _output_size(size, kernel, stride, dilation, padding):
    # Python ints or scalar tensors alike.
    if size is None:
        return None
    if padding == "SAME":
        return (size + stride - 1) // stride
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _grouped(problem):
    # Output shape of one group for the whole batch.
    shape = tf.stack([problem.batch, *_output_spatial(problem), problem.group_size])
    outputs = []
    active = problem.active
    for g in range(problem.blocks):
        columns = slice(g * problem.group_size, (g + 1) * problem.group_size)
        examples = tf.cast(tf.where(active[:, g]), tf.int32)  # (n, 1)

        def compute(examples=examples, columns=columns):
            inputs = tf.gather_nd(problem.inputs, examples)
            used_chunks = tf.where(_first_if_none(problem.chunk_used(inputs)))[:, 0]
            group = problem.conv(
                *problem.used_channels(inputs, problem.kernel[:, :, :, columns], used_chunks)
            )
            bias = None if problem.bias is None else problem.bias[columns]
            return tf.scatter_nd(examples, problem.finish(group, bias), shape)

        # A convolution of an empty batch is skipped (oneDNN mis-shapes it).
        outputs.append(
            tf.cond(
                tf.size(examples) > 0,
                compute,
                lambda: tf.zeros(shape, problem.inputs.dtype),
            )
        )
    return tf.concat(outputs, axis=-1)


def _masked(problem):
    outputs = problem.finish(problem.conv(problem.inputs, problem.kernel), problem.bias)
    # `multiply_no_nan` is 0 wherever the mask is 0, as a select, even where
    # an overflow made the output infinite (a product would give NaN); the
    # select's broadcast ran 1.7x-2.7x slower. Over `(batch, positions,
    # filters)`: a product fed straight by a convolution with a constant mask
    # crashes TensorFlow 2.21's graph optimiser (`MulConvPushDown`), and a
    # mask broadcast over positions only is faster than over positions and
    # groups. Shapes with -1 for the batch are constants: no shape ops.
    # The output's shape from the input's: see `_output_spatial`.
    rows, cols = _output_spatial(problem)
    active = tf.reshape(problem.block_mask, [-1, problem.blocks, 1])
    active = tf.reshape(tf.tile(active, [1, 1, problem.group_size]), [-1, 1, problem.filters])
    static = isinstance(rows, int) and isinstance(cols, int) and rows * cols > 0
    # (-1 cannot stand for the batch when there are no positions.)
    batch = -1 if static else problem.batch
    outputs = tf.reshape(outputs, [batch, rows * cols, problem.filters])
    outputs = tf.math.multiply_no_nan(outputs, active)
    return tf.reshape(outputs, [batch, rows, cols, problem.filters])


def active_fraction(problem):
    """The cost rule's input: the fraction of (example, group) pairs active."""
    # The mean of the 0/1 mask (a no-op cast in float32): no compare.
    return tf.reduce_mean(tf.cast(problem.block_mask, tf.float32))


def is_large(problem):
    """One example's convolution has at least `AUTO_LARGE_CONV_MACS`
    multiply-adds (static; False when the spatial size is unknown)."""
    macs = example_macs(problem)
    return macs is not None and macs >= AUTO_LARGE_CONV_MACS


def max_fraction(problem):
    """The fraction of active pairs from which `"auto"` runs the dense
    convolution (static): `AUTO_LARGE_MAX_FRACTION` for a large convolution
    (`is_large`), else `AUTO_MAX_FRACTION`."""
    return AUTO_LARGE_MAX_FRACTION if is_large(problem) else AUTO_MAX_FRACTION


def skipping_pays(problem):
    """`"auto"` skips: fewer than `max_fraction(problem)` of the pairs are active."""
    return active_fraction(problem) < max_fraction(problem)


def grouping_pays(problem):
    """`"auto"` skipping a batch > 1 groups it: few active groups an example
    and, for a large convolution (`is_large`), few examples a group."""
    fraction = active_fraction(problem)
    few_groups = fraction * problem.blocks <= AUTO_GROUPED_MAX_GROUPS
    if not is_large(problem):
        return few_groups
    examples_per_group = fraction * tf.cast(problem.batch, tf.float32)
    return tf.logical_and(few_groups, examples_per_group <= AUTO_LARGE_GROUPED_MAX_EXAMPLES)


def is_wide(problem):
    """One output value costs at least `AUTO_WIDE_OUTPUT_MACS` multiply-adds
    (static): one example's convolution then runs near the batch's speed."""
    return output_macs(problem) >= AUTO_WIDE_OUTPUT_MACS


def single_skipping_can_pay(problem):
    """`"auto"` may skip at batch 1 (static): the convolution is wide
    (`is_wide`) or one example's has at least `AUTO_SINGLE_MIN_MACS`
    multiply-adds (or an unknown size)."""
    macs = example_macs(problem)
    return is_wide(problem) or macs is None or macs >= AUTO_SINGLE_MIN_MACS


def looping_pays(problem):
    """`"auto"` may loop over a batch: one example's convolution is large
    (static): on one thread, wide (`is_wide`) and of at least
    `AUTO_LOOP_MIN_MACS` multiply-adds; at least `AUTO_LARGE_CONV_MACS`
    (`is_large`) when TensorFlow's ops run on several (`intra_op_threads`)."""
    macs = example_macs(problem)
    if intra_op_threads() > 1:
        return macs is None or is_large(problem)
    return is_wide(problem) and (macs is None or macs >= AUTO_LOOP_MIN_MACS)


def example_macs(problem):
    """Multiply-adds of one example's dense convolution (static), or None
    when the spatial size is unknown."""
    rows, cols, filters = _output_shape(problem)[1:]
    if rows is None or cols is None:
        return None
    return rows * cols * output_macs(problem) * filters


def output_macs(problem):
    """Multiply-adds of one output value (static): `kernel_h * kernel_w * in_channels`."""
    kernel_h, kernel_w = problem.kernel.shape[:2]
    return kernel_h * kernel_w * problem.in_channels


def _auto(problem):
    if output_macs(problem) < AUTO_MIN_OUTPUT_MACS:
        return _masked(problem)

    # Nested branches, no switch: every op counts at batch 1, which takes two.
    def batched():
        many_groups = _example_loop if looping_pays(problem) else _masked
        return tf.cond(
            grouping_pays(problem), lambda: _grouped(problem), lambda: many_groups(problem)
        )

    if not single_skipping_can_pay(problem):
        # Batch 1 runs the masked convolution: no single-example graph.
        masked = tf.logical_or(
            tf.logical_not(skipping_pays(problem)), tf.equal(problem.batch, 1)
        )
        return tf.cond(masked, lambda: _masked(problem), called_branch(batched))
    return tf.cond(
        skipping_pays(problem), lambda: _single_or(problem, batched), lambda: _masked(problem)
    )


_PATHS = {
    "auto": _auto,
    "per_example": _per_example,
    "grouped": _grouped,
    "masked": _masked,
}
_compiled = {}


def trace_settings():
    """What `"auto"`'s rules read when a graph is traced: the thread count and
    the `AUTO_*` constants. Part of every cache key of traced graphs, so that
    a change reaches the next call (made only once TensorFlow runs)."""
    return (
        intra_op_threads_key(), AUTO_MAX_FRACTION, AUTO_LARGE_MAX_FRACTION, AUTO_LARGE_CONV_MACS,
        AUTO_GROUPED_MAX_GROUPS, AUTO_LARGE_GROUPED_MAX_EXAMPLES, AUTO_LOOP_MIN_MACS,
        AUTO_WIDE_OUTPUT_MACS, AUTO_MIN_OUTPUT_MACS, AUTO_SINGLE_MIN_MACS,
    )


def _compiled_path(path, activation, input_shape, kernel_shape, blocks, dtype,
                   has_bias, strides, padding, dilation_rate):
    key = (path, activation, input_shape, kernel_shape, blocks, dtype, has_bias,
           strides, padding, dilation_rate, trace_settings())
    if key not in _compiled:
        signature = [
            tf.TensorSpec([None, *input_shape], dtype),
            tf.TensorSpec(kernel_shape, dtype),
            tf.TensorSpec([kernel_shape[-1]] if has_bias else [0], dtype),
            tf.TensorSpec([None, blocks], dtype),
        ]

        def run(inputs, kernel, bias, block_mask):
            problem = _Problem(
                inputs, kernel, bias if has_bias else None, block_mask, activation,
                strides, padding, dilation_rate,
            )
            return _PATHS[path](problem)

        # No AutoGraph: the paths have no Python control flow on tensors.
        _compiled[key] = tf.function(run, input_signature=signature, autograph=False)
    return _compiled[key]


# Not converted by AutoGraph in a caller's `tf.function`: no Python control
# flow on tensors, and converting the paths from their source is slow.
@tf.autograph.experimental.do_not_convert
def block_sparse_conv2d(
    inputs,
    kernel,
    bias,
    block_mask,
    activation=None,
    strides=(1, 1),
    padding="valid",
    dilation_rate=(1, 1),
    path="auto",
):
    """Computes `masked_block_conv2d` without computing the skipped groups.

    Args:
        inputs: `(batch, height, width, in_channels)` float tensor
            (channels last).
        kernel: `(kernel_h, kernel_w, in_channels, filters)`, `filters`
            divisible by the mask's blocks.
        bias: `(filters,)` or None.
        block_mask: `(batch, blocks)`, 1 for an active group, 0 for a skipped one
            (no other values: the dense fallback multiplies by the mask, the
            skipping paths only test it against 0; called eagerly, other
            values raise a `ValueError`, in a graph they are not checked).
        activation: an element-wise callable with `activation(0)` finite,
            applied to active groups, or None. Called eagerly, each distinct
            callable compiles its own graph: pass the same function object.
        strides, padding, dilation_rate: as in `keras.layers.Conv2D`.
        path: one of `CONV2D_EXECUTION_PATHS` (see the module docs).

    Returns:
        `(batch, out_height, out_width, filters)`, equal to
        `masked_block_conv2d` on the same arguments.

    Examples:
        >>> import numpy as np
        >>> x = np.random.rand(1, 6, 6, 4).astype("float32")
        >>> w = np.random.rand(3, 3, 4, 8).astype("float32")
        >>> mask = np.array([[0, 1, 0, 0]], "float32")
        >>> y = block_sparse_conv2d(x, w, None, mask, padding="same").numpy()
        >>> y.shape, bool(np.all(y[..., :2] == 0) and np.all(y[..., 2:4] > 0))
        ((1, 6, 6, 8), True)
    """
    if path not in CONV2D_EXECUTION_PATHS:
        raise ValueError(
            f"Invalid `path`: expected one of {CONV2D_EXECUTION_PATHS}. "
            f"Received: path={path!r}"
        )
    strides = _pair(strides, "strides")
    dilation_rate = _pair(dilation_rate, "dilation_rate")
    padding = _check_padding(padding)
    if max(strides) > 1 and max(dilation_rate) > 1:
        raise ValueError(
            "`strides > 1` is not supported with `dilation_rate > 1`. "
            f"Received: strides={strides}, dilation_rate={dilation_rate}"
        )
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel, dtype=inputs.dtype)
    block_mask = tf.cast(block_mask, inputs.dtype)
    if kernel.shape.rank != 4:
        raise ValueError(
            "`kernel` must have shape (kernel_h, kernel_w, in_channels, filters). "
            f"Received: kernel.shape={tuple(kernel.shape)}"
        )
    in_channels, filters = kernel.shape[2], kernel.shape[3]
    if inputs.shape.rank != 4 or inputs.shape[-1] not in (None, in_channels):
        raise ValueError(
            f"`inputs` must have shape (batch, height, width, {in_channels}) to "
            f"match `kernel` {tuple(kernel.shape)}. Received: inputs.shape={tuple(inputs.shape)}"
        )
    blocks = block_mask.shape[-1]
    if block_mask.shape.rank != 2 or blocks is None or blocks == 0 or filters % blocks:
        raise ValueError(
            f"`block_mask` must have shape (batch, blocks) with blocks dividing "
            f"filters={filters}. Received: block_mask.shape={tuple(block_mask.shape)}"
        )
    check_block_mask(block_mask, inputs)
    check_activation(activation)
    sizes = [
        _output_size(size, k, s, d, padding.upper())
        for size, k, s, d in zip(inputs.shape[1:3], kernel.shape[:2], strides, dilation_rate)
    ]
    if any(size is not None and size <= 0 for size in sizes):
        raise ValueError(
            f"`inputs` are too small for the kernel {tuple(kernel.shape[:2])} with "
            f"padding={padding!r}, dilation_rate={dilation_rate}. "
            f"Received: inputs.shape={tuple(inputs.shape)}"
        )
    has_bias = bias is not None
    bias = (
        tf.convert_to_tensor(bias, dtype=inputs.dtype) if has_bias else tf.zeros([0], inputs.dtype)
    )
    check_bias(bias if has_bias else None, filters)
    activation = activation or _identity
    if tf.inside_function():
        # Inlined into the caller's graph (a model's tf.function).
        problem = _Problem(
            inputs, kernel, bias if has_bias else None, block_mask, activation,
            strides, padding, dilation_rate,
        )
        outputs = _PATHS[path](problem)
        # The paths' control flow loses the static shape; layers after a
        # gated convolution (Flatten -> GatedDense) need it.
        outputs.set_shape([inputs.shape[0], *_output_shape(problem)[1:]])
        return outputs
    run = _compiled_path(
        path, activation, tuple(inputs.shape[1:]), tuple(kernel.shape), blocks,
        inputs.dtype, has_bias, strides, padding, dilation_rate,
    )
    return run(inputs, kernel, bias, block_mask)
