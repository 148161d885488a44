import numpy as np
import pytest

from keras_condcomp.models import build_dense_cnn, build_gated_cnn, default_policy_grid


def _policy_grids(model):
    return [layer.policy_grid for layer in model.layers if hasattr(layer, "policy")]


def test_default_policy_grid_shrinks_with_the_feature_map():
    # 8x8 digits: gated layers see 8x8, 4x4 and 2x2 inputs.
    model = build_gated_cnn((8, 8, 1), 10, filters=(8, 8, 8), blocks=4)
    assert _policy_grids(model) == [4, 4, 2]
    assert default_policy_grid(3, 28) == 3


def test_given_policy_grid_reaches_every_layer():
    model = build_gated_cnn((8, 8, 1), 10, filters=(8, 8), blocks=4, policy_grid=1)
    assert _policy_grids(model) == [1, 1]


def test_policy_grid_larger_than_an_input_is_refused():
    with pytest.raises(ValueError, match="policy_grid=4"):
        build_gated_cnn((8, 8, 1), 10, filters=(8, 8, 8), blocks=4, policy_grid=4)


@pytest.mark.parametrize("filters", [(), (8, 6), (8, True), (0,)])
def test_filters_not_divisible_by_blocks_are_refused(filters):
    with pytest.raises(ValueError, match="filters"):
        build_gated_cnn((8, 8, 1), 10, filters=filters, blocks=4)
    if filters and all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters):
        build_dense_cnn((8, 8, 1), 10, filters=filters)


def test_the_builders_are_channels_last_whatever_the_keras_setting():
    import keras
    import numpy as np

    before = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        for build in (build_gated_cnn, build_dense_cnn):
            model = build((8, 8, 1), 10, filters=(8, 8))
            assert model.predict(np.zeros((2, 8, 8, 1), "float32"), verbose=0).shape == (2, 10)
    finally:
        keras.config.set_image_data_format(before)


def test_more_convolutions_than_the_image_can_pool_are_refused():
    with pytest.raises(ValueError, match="5 convolutions pool the image 4 times: a 8x8 input"):
        build_gated_cnn((8, 8, 1), 10, filters=(8,) * 5, blocks=4)
    with pytest.raises(ValueError, match="input_shape=\\(8, 8\\)"):
        build_dense_cnn((8, 8), 10)


@pytest.mark.parametrize("kwargs, message", [
    ({"blocks": 0}, "blocks=0"),
    ({"blocks": "8"}, "blocks='8'"),
    ({"filters": 32}, "filters=32"),
    ({"num_classes": 1}, "num_classes=1"),
    ({"padding": "valid"}, r"sets \['padding'\].*padding='valid'"),
])
def test_builder_arguments_are_checked_by_name(kwargs, message):
    arguments = {"input_shape": (8, 8, 1), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_gated_cnn(**arguments)


def test_numpy_class_counts_are_taken():
    model = build_gated_cnn((8, 8, 1), np.int64(10), filters=(8,), blocks=4)
    assert model.output.shape == (None, 10)


def test_compiling_a_model_of_unfixed_image_size_warns_that_its_macs_are_unknown():
    import keras

    from keras_condcomp import PolicyGradientModel
    from keras_condcomp.layers import GatedConv2D

    inputs = keras.Input((None, None, 3))
    hidden = GatedConv2D(8, 3, blocks=4, name="g1")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(hidden)
    model = PolicyGradientModel(inputs, keras.layers.Dense(3)(pooled))
    with pytest.warns(UserWarning, match=r"leave out the gated layers \['g1'\]"):
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
