"""GateDecision: what one gated layer decided for a batch."""

import dataclasses

__all__ = ["GateDecision"]


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """What one gated layer decided for a batch.

    Attributes:
        layer: the gated layer.
        logits: `(batch, blocks)` policy logits, `sigma = sigmoid(logits)`.
        mask: `(batch, blocks)` 0/1 mask actually used.
        regularization: scalar gating regulariser of the batch.
    """

    layer: object
    logits: object
    mask: object
    regularization: object
