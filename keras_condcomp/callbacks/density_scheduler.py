"""DensityScheduler: a curriculum over the gated layers' target densities."""

import keras

from keras_condcomp._arguments import is_integer
from keras_condcomp._arguments import check_density, check_non_negative_int
from keras_condcomp.callbacks._common import require_gated_layers

__all__ = ["DensityScheduler"]


class DensityScheduler(keras.callbacks.Callback):
    """Anneals each gated layer's target density tau over epochs.

    A curriculum that starts from a high target density and lowers it to
    the layer's `target_density`. Bengio et al. note that, without their
    regularisers (`L_b`, `L_e`, `L_v`), training either saturates every
    block or drops blocks too early; the regularisers are their remedy, not
    a schedule. This callback is an option to try on top of them: on the
    digits the project measured none of its curricula beating training
    without one (guide "Schedules and monitoring"). At the start of every
    epoch the scheduler sets, for each gated layer with a `target_density`,

    `tau(epoch) = start + (end - start) * min(1, max(0, epoch - start_epoch) / epochs)`

    (linear; `end` defaults to the layer's own `target_density`), or
    `tau(epoch) = schedule(epoch, target_density)` for a custom `schedule`.
    The value reaches the already-compiled train step through
    `GatedDense.set_current_target_density` (a non-trainable variable read at
    call time); the layer's config keeps its final `target_density`.

    Writes `<layer name>_target_density` for each scheduled layer and
    `target_density` (their mean) into the epoch's `logs`. When training
    ends, every layer's tau goes back to its `target_density`, as a reloaded
    copy of the model would have it (a `fit` stopped mid-schedule does not
    leave the next `fit` training towards an intermediate tau). A
    `PolicyGradientModel.fit` stopped by an exception or Ctrl-C, where Keras
    does not end training, gives every layer the tau it had before `fit`.

    Args:
        schedule: optional callable `(epoch, target_density) -> float in (0, 1]`
            (epoch 0-based); when given, `start`, `end`, `epochs` and
            `start_epoch` must be left unset.
        start: tau at the beginning, in (0, 1] (default 1.0).
        end: tau at the end, in (0, 1], or None (default) for each layer's
            own `target_density`.
        epochs: positive int, epochs the linear anneal lasts (default 10).
        start_epoch: non-negative int, epochs to hold `start` first (e.g. the
            epochs of a `PolicyWarmup`; default 0).
        verbose: 0 quiet, 1 prints the targets at each epoch.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.models import build_gated_mlp
        >>> model = build_gated_mlp(8, 3, units=16, blocks=4, layers=1, target_density=0.25)
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 8).astype("float32"), np.arange(32) % 3
        >>> scheduler = DensityScheduler(start=1.0, epochs=3)
        >>> history = model.fit(x, y, epochs=4, callbacks=[scheduler], verbose=0)
        >>> print(*(round(t, 2) for t in history.history["gated_1_target_density"]))
        1.0 0.75 0.5 0.25
    """

    def __init__(
        self,
        schedule=None,
        start=None,
        end=None,
        epochs=None,
        start_epoch=None,
        verbose=0,
    ):
        super().__init__()
        if schedule is not None:
            if not callable(schedule):
                raise ValueError(
                    "`schedule` must be a callable (epoch, target_density) -> "
                    f"float. Received: schedule={schedule!r}"
                )
            given = {
                name: value
                for name, value in (
                    ("start", start), ("end", end), ("epochs", epochs),
                    ("start_epoch", start_epoch),
                )
                if value is not None
            }
            if given:
                raise ValueError(
                    "Give either `schedule` or start/end/epochs/start_epoch, not "
                    f"both. Received: schedule={schedule!r} and {given}"
                )
        start = 1.0 if start is None else start
        epochs = 10 if epochs is None else epochs
        start_epoch = 0 if start_epoch is None else start_epoch
        check_density("start", start)
        check_density("end", end, allow_none=True)
        if not is_integer(epochs) or epochs <= 0:
            raise ValueError(
                f"`epochs` must be a positive integer. Received: epochs={epochs!r}"
            )
        check_non_negative_int("start_epoch", start_epoch)
        if verbose not in (0, 1):
            raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
        self.schedule = schedule
        self.start = float(start)
        self.end = None if end is None else float(end)
        self.epochs = int(epochs)
        self.start_epoch = int(start_epoch)
        self.verbose = verbose

    def target_at(self, epoch, target_density):
        """The tau of epoch `epoch` for a layer whose final target is `target_density`.

        `schedule(epoch, target_density)` when the scheduler has one, else
        the linear anneal from `start` to `end` (or `target_density`).

        Args:
            epoch: 0-based epoch index.
            target_density: the layer's final target density.

        Returns:
            float, the target density for that epoch.

        Raises:
            ValueError: a custom `schedule` returned a value outside (0, 1].

        Examples:
            >>> scheduler = DensityScheduler(start=1.0, epochs=4, start_epoch=1)
            >>> [round(scheduler.target_at(epoch, 0.2), 3) for epoch in range(6)]
            [1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
        """
        if self.schedule is not None:
            value = self.schedule(epoch, target_density)
            try:
                check_density("schedule(epoch, target_density)", value)
            except ValueError as error:
                raise ValueError(f"{error} (epoch={epoch})") from None
            return float(value)
        end = target_density if self.end is None else self.end
        progress = max(0, epoch - self.start_epoch) / self.epochs
        if progress >= 1:
            return float(end)  # exactly, not within a rounding error of it
        return self.start + (end - self.start) * progress

    def _scheduled_layers(self):
        layers = [
            layer
            for layer in require_gated_layers(self, self.model)
            if layer.target_density is not None
        ]
        if not layers:
            raise ValueError(
                "DensityScheduler found no gated layer with a target_density in "
                f"model {self.model.name!r}: nothing to schedule."
            )
        return layers

    def on_train_begin(self, logs=None):
        self._scheduled_layers()

    def on_epoch_begin(self, epoch, logs=None):
        for layer in self._scheduled_layers():
            layer.set_current_target_density(self.target_at(epoch, layer.target_density))
        if self.verbose:
            targets = ", ".join(
                f"{layer.name} {layer.current_target_density:.3f}"
                for layer in self._scheduled_layers()
            )
            print(f"\nDensityScheduler: epoch {epoch + 1}: target density {targets}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        values = []
        for layer in self._scheduled_layers():
            logs[f"{layer.name}_target_density"] = layer.current_target_density
            values.append(layer.current_target_density)
        logs["target_density"] = sum(values) / len(values)

    def on_train_end(self, logs=None):
        for layer in self._scheduled_layers():
            layer.set_current_target_density(layer.target_density)
