"""ComputeMonitor: densities and conditional MACs per epoch, TensorBoard, a PNG."""

import os
import warnings

import keras
import numpy as np

from keras_condcomp._arguments import check_positive_int
from keras_condcomp._inputs import as_model_inputs, check_arrays, example_count
from keras_condcomp.callbacks._common import require_gated_layers
from keras_condcomp.layers.decision_recorder import DecisionRecorder

__all__ = ["ComputeMonitor"]


def _profile(model, densities=None, x=None, batch_size=256):
    """`(conditional MACs per example, dense MACs)`, or None (with a
    warning) if `profile_macs` cannot count them."""
    from keras_condcomp.profiling import profile_macs

    try:
        macs = profile_macs(model, densities, x=x, batch_size=batch_size)
    except ValueError as error:
        # A monitor should not end a training run: the MACs are left out.
        warnings.warn(
            f"ComputeMonitor leaves the MACs out of the logs: {error}", stacklevel=3
        )
        return None
    return float(macs.conditional_macs), float(macs.dense_macs)


def _classes(outputs):
    """Predicted classes of 2-D outputs of several columns; other outputs as they are."""
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return outputs.argmax(axis=-1)
    return outputs


class ComputeMonitor(keras.callbacks.Callback):
    """Logs what a gated model computes each epoch, and draws it at the end.

    At the end of every epoch it adds to `logs`:

    - `conditional_macs` and `val_conditional_macs`: MACs per example at the
      epoch's logged densities (`<layer>_density`, `val_<layer>_density`),
      policies included (`keras_condcomp.profiling.profile_macs`), unless the
      model already logs them; `dense_macs`, the MACs of the same network with
      every block on;
    - with `x`: `<layer>_inference_density`, `inference_density` and
      `inference_conditional_macs`, measured on `x` with the masks the model
      uses at inference (threshold policy), as `predict` would (the MACs as
      `keras_condcomp.summary(model, x)` counts them).

    With `log_dir` it writes these as TensorBoard scalars under
    `log_dir/compute` and, with `x`, a histogram per gated layer of which
    blocks run (the indices of the active blocks over `x`). With
    `plot_path` it saves a PNG when training ends: a heatmap per gated layer
    of block usage per class on `x` (classes from `y`, else the model's
    predicted classes: the argmax of an output of several columns; one row
    "all" for other outputs) and the density curves over the epochs.

    Args:
        x: optional inputs to measure inference densities and block usage
            on, typically validation data: an array, or a dict, list or
            tuple of arrays for a model of several inputs.
        y: optional integer labels of `x` (shape `(n,)` or `(n, 1)`, or
            one-hot rows), to group block usage by class in the heatmap.
        log_dir: optional TensorBoard log directory.
        plot_path: optional path of the PNG written at the end of training
            (must end with `.png`).
        batch_size: positive int, batch size of the passes over `x`.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.models import build_gated_mlp
        >>> model = build_gated_mlp(8, 3, units=16, blocks=4, layers=1, target_density=0.5)
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 8).astype("float32"), np.arange(32) % 3
        >>> history = model.fit(x, y, epochs=2, callbacks=[ComputeMonitor(x, y)], verbose=0)
        >>> sorted(k for k in history.history if "macs" in k)
        ['conditional_macs', 'dense_macs', 'inference_conditional_macs']
    """

    def __init__(self, x=None, y=None, log_dir=None, plot_path=None, batch_size=256):
        super().__init__()
        if x is not None:
            check_arrays("x", x)
            x = as_model_inputs(x)
            shapes = [np.shape(a) for a in keras.tree.flatten(x)]
            if not shapes or min(len(shape) for shape in shapes) < 2 \
                    or len({shape[0] for shape in shapes}) != 1 or shapes[0][0] == 0:
                raise ValueError(
                    "`x` must be a non-empty batch of inputs (at least 2 "
                    "dimensions; for several inputs, as many examples in each). "
                    f"Received: x with shapes {shapes}"
                )
        if y is not None:
            if x is None:
                raise ValueError("`y` needs `x`: the labels of the inputs. Received: x=None")
            y = np.asarray(y)
            if y.ndim == 2:
                # (n, 1): labels in a column, as keras.datasets.cifar10 gives them.
                y = y[:, 0] if y.shape[1] == 1 else y.argmax(axis=-1)
            examples = example_count(x)
            if y.ndim != 1 or len(y) != examples or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    "`y` must hold one integer label (or one-hot row) per example "
                    f"of `x` ({examples}). Received: y with shape {np.shape(y)} "
                    f"and dtype {y.dtype}"
                )
        for name, value in (("log_dir", log_dir), ("plot_path", plot_path)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"`{name}` must be a path or None. Received: {name}={value!r}")
        if plot_path is not None and not os.fspath(plot_path).lower().endswith(".png"):
            raise ValueError(
                f"`plot_path` must end with '.png'. Received: plot_path={plot_path!r}"
            )
        batch_size = check_positive_int("batch_size", batch_size)
        self.x = x
        self.y = y
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.plot_path = None if plot_path is None else os.fspath(plot_path)
        self.batch_size = batch_size
        self.history = []
        self.block_usage = None
        self._writer = None

    def measure(self):
        """`({layer name: (examples, blocks) masks}, predicted classes)` on `x`.

        Runs the model on `x` in batches of `batch_size` with
        `training=False` (the inference masks). The masks are 0/1, or for a
        layer the model calls several times the mean of its calls' masks.
        The predicted classes are the argmax of 2-D outputs of several
        columns; other outputs (one unit, sequences) are returned as they
        are. Needs `x` and a model set (as during
        `fit`).

        Returns:
            `(masks, predictions)`: `{layer name: float32 (examples, blocks)
            array}` for each gated layer that took a decision, and a numpy
            array of one prediction per example.

        Raises:
            ValueError: the model has no gated layers, or the monitor no `x`.

        Examples:
            >>> import numpy as np
            >>> from keras_condcomp.models import build_gated_mlp
            >>> monitor = ComputeMonitor(np.random.rand(5, 8).astype("float32"))
            >>> monitor.set_model(build_gated_mlp(8, 3, units=16, blocks=4, layers=1))
            >>> masks, predictions = monitor.measure()
            >>> masks["gated_1"].shape, predictions.shape
            ((5, 4), (5,))
        """
        if self.x is None:
            raise ValueError("ComputeMonitor.measure needs examples: create the monitor with `x`.")
        layers = require_gated_layers(self, self.model)
        masks = {layer.name: [] for layer in layers}
        predictions = []
        for begin in range(0, example_count(self.x), self.batch_size):
            batch = keras.tree.map_structure(
                lambda inputs: inputs[begin:begin + self.batch_size], self.x
            )
            with DecisionRecorder() as recorder:
                outputs = self.model(batch, training=False)
            calls = {}
            for decision in recorder.decisions:
                if decision.layer.name in masks:
                    calls.setdefault(decision.layer.name, []).append(
                        keras.ops.convert_to_numpy(decision.mask).astype("float32")
                    )
            # A layer called several times (shared): the mean of its calls' masks.
            for name, values in calls.items():
                masks[name].append(np.mean(values, axis=0))
            outputs = keras.ops.convert_to_numpy(outputs)
            predictions.append(_classes(outputs))
        masks = {name: np.concatenate(values) for name, values in masks.items() if values}
        return masks, np.concatenate(predictions)

    def on_train_begin(self, logs=None):
        require_gated_layers(self, self.model)
        self.history = []
        # A fit that raised skipped on_train_end, which closes the writer.
        self._close_writer()
        if self.log_dir is not None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "compute"))

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        layers = require_gated_layers(self, self.model)
        record = {"epoch": epoch}
        for prefix in ("", "val_"):
            densities = {
                layer.name: float(logs[f"{prefix}{layer.name}_density"])
                for layer in layers
                if f"{prefix}{layer.name}_density" in logs
            }
            if f"{prefix}density" in logs:
                record[f"{prefix}density"] = float(logs[f"{prefix}density"])
            if len(densities) == len(layers):
                profile = _profile(self.model, densities)
                if profile is not None:
                    logs.setdefault(f"{prefix}conditional_macs", profile[0])
                    logs.setdefault("dense_macs", profile[1])
        # Read from the layers, whatever the order of a DensityScheduler.
        targets = [layer.current_target_density for layer in layers
                   if layer.current_target_density is not None]
        if targets:
            record["target_density"] = float(np.mean(targets))
        masks = None
        if self.x is not None:
            masks, predictions = self.measure()
            densities = {name: float(mask.mean()) for name, mask in masks.items()}
            for name, value in densities.items():
                logs[f"{name}_inference_density"] = value
            logs["inference_density"] = float(np.mean(list(densities.values())))
            record["inference_density"] = logs["inference_density"]
            # Measured per example on x, as keras_condcomp.summary(model, x) does.
            profile = _profile(self.model, x=self.x, batch_size=self.batch_size)
            if profile is not None:
                logs["inference_conditional_macs"] = profile[0]
            classes = self.y if self.y is not None else predictions
            if classes.ndim != 1:  # no classes: the usage over all of x
                self.block_usage = {
                    name: {"all": mask.mean(axis=0)} for name, mask in masks.items()
                }
            else:
                self.block_usage = {
                    name: {int(c): mask[classes == c].mean(axis=0) for c in np.unique(classes)}
                    for name, mask in masks.items()
                }
        self.history.append(record)
        if self._writer is not None:
            self._write_tensorboard(epoch, logs, masks)

    def _write_tensorboard(self, epoch, logs, masks):
        import tensorflow as tf

        with self._writer.as_default(step=epoch):
            for key, value in logs.items():
                if "density" in key or "macs" in key:
                    tf.summary.scalar(key, float(value))
            for name, mask in (masks or {}).items():
                active_blocks = np.nonzero(mask)[1].astype("float32")
                tf.summary.histogram(
                    f"{name}_block_usage", active_blocks, buckets=mask.shape[1]
                )
        self._writer.flush()

    def _close_writer(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_train_end(self, logs=None):
        self._close_writer()
        if self.plot_path is not None:
            self.plot(self.plot_path)

    def plot(self, path):
        """Saves the block-usage heatmaps and the density curves as a PNG.

        One heatmap per gated layer of the last epoch's block usage per
        class on `x` (none without `x`), and the curves of the densities
        of each epoch so far (training, validation, inference on `x`, and
        the mean of the layers' current target densities). Called with
        `plot_path` when training ends.

        Args:
            path: the file to write (its folder is created if missing).

        Returns:
            `path`.

        Examples:
            >>> import os, tempfile, numpy as np, keras
            >>> from keras_condcomp.models import build_gated_mlp
            >>> model = build_gated_mlp(8, 3, units=16, blocks=4, layers=1, target_density=0.5)
            >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            >>> x, y = np.random.rand(32, 8).astype("float32"), np.arange(32) % 3
            >>> monitor = ComputeMonitor(x, y)
            >>> _ = model.fit(x, y, epochs=2, callbacks=[monitor], verbose=0)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     path = monitor.plot(os.path.join(tmp, "compute.png"))
            ...     os.path.getsize(path) > 0
            True
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        usage = self.block_usage or {}
        panels = len(usage) + 1
        figure = Figure(figsize=(4.5 * panels, 4), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, panels, squeeze=False)[0]
        for axis, (name, by_class) in zip(axes, usage.items()):
            classes = sorted(by_class)
            image = axis.imshow(
                np.stack([by_class[c] for c in classes]), aspect="auto",
                vmin=0, vmax=1, cmap="viridis", interpolation="nearest",
            )
            axis.set_yticks(range(len(classes)), [str(c) for c in classes])
            axis.set_xlabel("block")
            axis.set_ylabel("class" if self.y is not None else
                            "predicted class" if "all" not in by_class else "")
            axis.set_title(f"{name}: block usage")
            figure.colorbar(image, ax=axis, label="fraction of examples")
        axis = axes[-1]
        epochs = [record["epoch"] + 1 for record in self.history]
        for key, label in (
            ("density", "training (sampled)"),
            ("val_density", "validation"),
            ("inference_density", "inference on x"),
            ("target_density", "target"),
        ):
            # Epochs without a value (validation_freq > 1) are left out.
            points = [(epoch, record[key]) for epoch, record in zip(epochs, self.history)
                      if record.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker=".", label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel("fraction of blocks active")
        axis.set_ylim(0, 1.02)
        axis.set_title("density")
        axis.legend(loc="best")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        figure.savefig(path, dpi=100)
        return path
