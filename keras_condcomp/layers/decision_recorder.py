"""Collects the gating decisions taken inside a forward pass.

`PolicyGradientModel.train_step` opens a recorder around its forward pass;
every gated layer called inside it reports the policy's logits, the mask it
used and its gating regularisation, so the model can form the REINFORCE
objective without layers knowing about models. The stack is thread-local
because `tf.distribute.MirroredStrategy` traces each replica in its own thread.
"""

import threading

__all__ = ["DecisionRecorder", "current_recorder"]

_state = threading.local()


class DecisionRecorder:
    """Context manager gathering the `GateDecision`s of the layers called in it.

    Args:
        scheduled: whether the layers apply their schedule state (a
            `PolicyWarmup` that switched the policies off, a
            `DensityScheduler`'s tau) in calls with `training=False`, as
            `PolicyGradientModel`'s evaluation steps do. False (default):
            such calls decide as `predict` does, whatever the schedule.
        example_weights: None (default), or the `(batch,)` weights of the
            examples of the calls made inside it (their `sample_weight`),
            which weigh the examples in the layers' gating regularisers.

    Examples:
        >>> import numpy as np
        >>> from keras_condcomp.layers import GatedDense
        >>> layer = GatedDense(8, blocks=2)
        >>> with DecisionRecorder() as recorder:
        ...     _ = layer(np.ones((3, 4), "float32"))
        >>> tuple(recorder.decisions[0].mask.shape)
        (3, 2)
    """

    def __init__(self, scheduled=False, example_weights=None):
        if not isinstance(scheduled, bool):
            raise ValueError(f"`scheduled` must be a bool. Received: scheduled={scheduled!r}")
        self.scheduled = scheduled
        self.example_weights = example_weights
        self.decisions = []

    def record(self, decision):
        self.decisions.append(decision)

    def __enter__(self):
        if not hasattr(_state, "stack"):
            _state.stack = []
        _state.stack.append(self)
        return self

    def __exit__(self, *exc_info):
        _state.stack.pop()
        return False


def current_recorder():
    """The innermost active `DecisionRecorder` of this thread, or None."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None
