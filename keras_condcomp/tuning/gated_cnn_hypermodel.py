"""GatedCNNHyperModel: a KerasTuner search space over gated convolutional nets."""

import keras

from keras_condcomp.layers.gated_conv2d import GatedConv2D
from keras_condcomp.models.cnn import default_policy_grid
from keras_condcomp.profiling.profiler import profile_macs
from keras_condcomp.tuning._gated_hypermodel import GatedHyperModel

__all__ = ["GatedCNNHyperModel"]

CONV_LAYERS = (1, 3)
FILTERS = (16, 32, 64)
BLOCKS = (4, 8)


class GatedCNNHyperModel(GatedHyperModel):
    """Searches gated CNNs `image -> conv_layers x (GatedConv2D, pool) -> logits`.

    Each gated layer is a 3x3 `GatedConv2D` with `padding="same"` and ReLU,
    followed by a 2x2 max pooling while the feature map is at least 2x2;
    global average pooling and a Dense layer give the logits. The search
    space (hyperparameter names):

    - `conv_layers`: 1 to 3 gated convolutions;
    - `filters` in (16, 32, 64) and `blocks` (filter groups) in (4, 8), the
      same for every layer;
    - the gating hyperparameters of `GatedMLPHyperModel`: `target_density`,
      `sparsity_weight`, `variance_weight`, `policy_learning_rate`.

    Each policy reads its input's channel means over a grid of cells
    (`policy_grid`, from `keras_condcomp.models.default_policy_grid`: 4 x 4,
    fewer on smaller inputs), as in `build_gated_cnn`.

    Compiled, scored and fitted as `GatedMLPHyperModel` (Adam for network and
    policies, a `ComputeAwareScore` added to `fit`'s callbacks).

    Args:
        input_shape: `(height, width, channels)` of one image (channels last).
        num_classes: number of classes.
        learning_rate: the network's Adam learning rate.
        reference_macs: MACs per example that the score compares against;
            default: the dense MACs of the widest network of the space
            (3 convolutions of 64 filters).
        macs_weight: accuracy a halving of compute is worth in the score.
        seed: seed of the gated layers' mask sampling (None: random).
        name: as `keras_tuner.HyperModel`.
        tunable: as `keras_tuner.HyperModel`.

    Examples:
        >>> import keras_tuner
        >>> hypermodel = GatedCNNHyperModel((8, 8, 1), 10)
        >>> hp = keras_tuner.HyperParameters()
        >>> hp.Fixed("conv_layers", 2)
        2
        >>> model = hypermodel.build(hp)
        >>> print(*(layer.name for layer in model.layers[1:]))
        gated_conv_1 pool_1 gated_conv_2 pool_2 global_pool logits
    """

    model_name = "gated_cnn"
    input_rank = 3

    def widest_dense_macs(self):
        """Dense MACs per example of 3 convolutions of 64 filters and the logits.

        The widest network of the space with plain `Conv2D` layers, counted
        by `keras_condcomp.profiling.profile_macs`.

        Returns:
            int.

        Examples:
            >>> GatedCNNHyperModel((8, 8, 1), 10).widest_dense_macs()
            774784
        """
        inputs = keras.Input(self.input_shape)
        hidden = self._convolutions(
            inputs, max(CONV_LAYERS),
            lambda index, grid: keras.layers.Conv2D(max(FILTERS), 3, padding="same"),
        )
        widest = keras.Model(inputs, keras.layers.Dense(self.num_classes)(hidden))
        return profile_macs(widest).dense_macs

    def architecture(self, hp):
        """Registers `conv_layers`, `filters` and `blocks` in `hp`.

        Args:
            hp: a `keras_tuner.HyperParameters`.

        Returns:
            `(conv_layers, filters, blocks)`.

        Examples:
            >>> import keras_tuner
            >>> GatedCNNHyperModel((8, 8, 1), 10).architecture(keras_tuner.HyperParameters())
            (2, 32, 8)
        """
        return (
            hp.Int("conv_layers", *CONV_LAYERS, default=2),
            hp.Choice("filters", list(FILTERS), default=32),
            hp.Choice("blocks", list(BLOCKS), default=8),
        )

    def hidden(self, inputs, architecture, gate_kwargs):
        """`conv_layers` gated 3x3 convolutions with pooling, then global pooling.

        Layer `i` (from 1) is `gated_conv_i`, a ReLU `GatedConv2D(filters,
        3, blocks=blocks, padding="same")` with the default policy grid of its
        input, followed by `pool_i` (2x2 max pooling) while the feature map
        is at least 2x2; `global_pool` averages the last one.

        Args:
            inputs: the model's `keras.Input`.
            architecture: `(conv_layers, filters, blocks)`.
            gate_kwargs: gating arguments for every `GatedConv2D`.

        Returns:
            The `(batch, filters)` output of the global pooling.

        Examples:
            >>> import keras
            >>> hypermodel = GatedCNNHyperModel((8, 8, 1), 10)
            >>> hidden = hypermodel.hidden(keras.Input((8, 8, 1)), (1, 16, 4), {})
            >>> tuple(hidden.shape)
            (None, 16)
        """
        conv_layers, filters, blocks = architecture
        return self._convolutions(
            inputs, conv_layers,
            lambda index, grid: GatedConv2D(
                filters, 3, blocks=blocks, padding="same", activation="relu",
                policy_grid=grid, name=f"gated_conv_{index + 1}",
                seed=self.layer_seed(index), **gate_kwargs,
            ),
        )

    def _convolutions(self, inputs, count, convolution):
        hidden = inputs
        height, width = self.input_shape[:2]
        for index in range(count):
            hidden = convolution(index, default_policy_grid(height, width))(hidden)
            if min(height, width) >= 2:
                hidden = keras.layers.MaxPooling2D(2, name=f"pool_{index + 1}")(hidden)
                height, width = height // 2, width // 2
        return keras.layers.GlobalAveragePooling2D(name="global_pool")(hidden)
