"""Block-sparse execution: the masked reference and the paths that skip work."""

from keras_condcomp.ops.block_kernel import block_dense, from_block_kernel, to_block_kernel
from keras_condcomp.ops.block_sparse_conv2d import (
    CONV2D_EXECUTION_PATHS,
    block_sparse_conv2d,
    masked_block_conv2d,
)
from keras_condcomp.ops.block_sparse_dense import (
    EXECUTION_PATHS,
    block_sparse_dense,
    cost_constants,
    forced_execution,
    forced_execution_path,
    set_cost_constants,
)
from keras_condcomp.ops.masked_reference import expand_block_mask, masked_block_dense
from keras_condcomp.ops.native_kernels import (
    build_native_kernels,
    load_native_kernels,
    native_kernels_disabled,
    native_kernels_error,
)

__all__ = [
    "CONV2D_EXECUTION_PATHS",
    "EXECUTION_PATHS",
    "block_dense",
    "block_sparse_conv2d",
    "block_sparse_dense",
    "build_native_kernels",
    "cost_constants",
    "expand_block_mask",
    "forced_execution",
    "forced_execution_path",
    "from_block_kernel",
    "load_native_kernels",
    "masked_block_conv2d",
    "masked_block_dense",
    "native_kernels_disabled",
    "native_kernels_error",
    "set_cost_constants",
    "to_block_kernel",
]
