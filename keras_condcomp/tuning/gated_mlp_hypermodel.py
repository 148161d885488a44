"""GatedMLPHyperModel: a KerasTuner search space over gated MLPs."""

import math

import keras

from keras_condcomp._arguments import is_integer
from keras_condcomp.layers.gated_dense import GatedDense
from keras_condcomp.tuning._gated_hypermodel import GatedHyperModel

__all__ = ["GatedMLPHyperModel"]

LAYERS = (1, 3)
UNITS = (64, 128, 256, 512)
BLOCKS = (4, 8, 16)


class GatedMLPHyperModel(GatedHyperModel):
    """Searches gated MLPs `input -> layers x GatedDense -> Dense` logits.

    The search space (hyperparameter names, as KerasTuner's
    `hyperparameters=` and `tune_new_entries=` can fix or narrow them):

    - `layers`: 1 to 3 gated layers;
    - `units` in (64, 128, 256, 512) and `blocks` in (4, 8, 16), the same
      for every layer;
    - `target_density` tau in [0.05, 0.5] (log scale);
    - `sparsity_weight` lambda_s in [0.1, 10] (log), `variance_weight`
      lambda_v in [0, 10];
    - `policy_learning_rate` in [1e-4, 1e-1] (log).

    Models are compiled with Adam (`learning_rate`) for the network, Adam
    (`policy_learning_rate`) for the policies, sparse categorical
    cross-entropy on logits and the `accuracy` metric. `fit` adds a
    `ComputeAwareScore`, so a tuner can maximise
    `keras_condcomp.tuning.compute_aware_objective()` (`val_compute_aware_score`
    = `val_accuracy - macs_weight * log2(val_conditional_macs / reference_macs)`)
    or plain `"val_accuracy"`.

    Args:
        input_shape: shape of one example (flattened if not 1-D).
        num_classes: number of classes.
        learning_rate: the network's Adam learning rate.
        reference_macs: MACs per example that the score compares against;
            default: the dense MACs of the widest network of the space
            (3 layers of 512 units).
        macs_weight: accuracy a halving of compute is worth in the score.
        seed: seed of the gated layers' mask sampling (None: random).
        name: as `keras_tuner.HyperModel`.
        tunable: as `keras_tuner.HyperModel`.

    Examples:
        >>> import keras_tuner
        >>> hypermodel = GatedMLPHyperModel((64,), 10)
        >>> hp = keras_tuner.HyperParameters()
        >>> hp.Fixed("layers", 2)
        2
        >>> model = hypermodel.build(hp)
        >>> print(*(layer.name for layer in model.layers[1:]))
        gated_1 gated_2 logits
    """

    model_name = "gated_mlp"

    def widest_dense_macs(self):
        """Dense MACs per example of 3 gated layers of 512 units and the logits.

        Returns:
            int, `512 * (features + 2 * 512 + num_classes)`.

        Examples:
            >>> GatedMLPHyperModel((64,), 10).widest_dense_macs()
            562176
        """
        width, depth = max(UNITS), max(LAYERS)
        features = math.prod(self.input_shape)
        return width * (features + (depth - 1) * width + self.num_classes)

    def architecture(self, hp):
        """Registers `layers`, `units` and `blocks` in `hp`.

        Args:
            hp: a `keras_tuner.HyperParameters`.

        Returns:
            `(layers, units, blocks)`.

        Raises:
            ValueError: `blocks` (as fixed in `hp`) not a positive int, or
                not dividing `units`.

        Examples:
            >>> import keras_tuner
            >>> GatedMLPHyperModel((64,), 10).architecture(keras_tuner.HyperParameters())
            (2, 256, 8)
        """
        layers = hp.Int("layers", *LAYERS, default=2)
        units = hp.Choice("units", list(UNITS), default=256)
        blocks = hp.Choice("blocks", list(BLOCKS), default=8)
        if not is_integer(blocks) or blocks <= 0:
            raise ValueError(f"`blocks` must be a positive int. Received: blocks={blocks!r}")
        if units % blocks:
            raise ValueError(
                f"`blocks` must divide `units`. Received: units={units}, blocks={blocks}. "
                "When narrowing `units` with `hyperparameters=`, narrow `blocks` to values "
                "that divide every `units` choice (KerasTuner builds the first choices "
                "once when the tuner is made)."
            )
        return layers, units, blocks

    def hidden(self, inputs, architecture, gate_kwargs):
        """`layers` ReLU `GatedDense(units, blocks=blocks)` layers, `gated_1`, ...

        Inputs of more than one dimension are flattened first.

        Args:
            inputs: the model's `keras.Input`.
            architecture: `(layers, units, blocks)`.
            gate_kwargs: gating arguments for every `GatedDense`.

        Returns:
            The last gated layer's output.

        Examples:
            >>> import keras
            >>> hypermodel = GatedMLPHyperModel((64,), 10)
            >>> hidden = hypermodel.hidden(keras.Input((64,)), (2, 32, 4), {})
            >>> tuple(hidden.shape)
            (None, 32)
        """
        layers, units, blocks = architecture
        hidden = keras.layers.Flatten()(inputs) if len(self.input_shape) > 1 else inputs
        for index in range(layers):
            hidden = GatedDense(
                units, blocks=blocks, activation="relu", name=f"gated_{index + 1}",
                seed=self.layer_seed(index), **gate_kwargs,
            )(hidden)
        return hidden
