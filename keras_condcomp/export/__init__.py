"""Export to ONNX and LiteRT (TFLite) graphs that keep the skipping.

Exported gated layers gate with their deterministic threshold policy and
compute a fixed budget of blocks per example with static shapes (top-k of
the mask, gather of only the chosen blocks' weights, one product, scatter
back): inactive blocks' weights are never read and every weight is stored
once. See "Deploying to edge devices" in the docs.

A gated layer plugs in by setting the class attribute
`supports_static_budget = True` and, when
`keras_condcomp.ops.static_budget_dense.static_budget_settings(self)` returns
settings at call time (only while an exporter traces the model), running its
static-budget path with them (`budget`, and for inputs that come from another
gated layer `input_blocks`, `input_budget`).
"""

from keras_condcomp.export._plan import active_block_counts, block_budgets
from keras_condcomp.export.litert import export_litert, litert_op_names, litert_predict
from keras_condcomp.export.onnx import export_onnx, onnx_predict

__all__ = [
    "active_block_counts",
    "block_budgets",
    "export_litert",
    "export_onnx",
    "litert_op_names",
    "litert_predict",
    "onnx_predict",
]
