import numpy as np
import pytest

from keras_condcomp.models import build_dense_mlp, build_gated_mlp, equal_macs_width


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": 0}, "layers=0"),
    ({"units": 2.5}, "units=2.5"),
    ({"input_dim": -1}, "input_dim=-1"),
    ({"num_classes": 2.7}, "num_classes=2.7"),
    ({"name": "mine"}, r"sets \['name'\].*name='mine'"),
    ({"seed": "0"}, "seed='0'"),
])
def test_builder_arguments_are_checked_by_name(kwargs, message):
    arguments = {"input_dim": 8, "num_classes": 3, "units": 8, "blocks": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_gated_mlp(**arguments)


def test_numpy_sizes_are_taken_and_seeds_count_up():
    model = build_gated_mlp(np.int64(8), np.int64(3), units=np.int64(8), blocks=2, layers=2, seed=5)
    assert [layer.seed for layer in model.layers[1:3]] == [5, 6]
    assert build_dense_mlp(np.int64(8), np.int64(3), units=8).output.shape == (None, 3)
    with pytest.raises(ValueError, match="layers=-1"):
        build_dense_mlp(8, 3, layers=-1)


def test_equal_macs_width_solves_for_the_width_and_checks_its_arguments():
    width = equal_macs_width(64, 10, 2, 20_000)
    assert abs(64 * width + width**2 + 10 * width - 20_000) < 2 * width + 75
    with pytest.raises(ValueError, match="layers=0"):
        equal_macs_width(64, 10, 0, 1000)
    with pytest.raises(ValueError, match="macs=0"):
        equal_macs_width(64, 10, 1, 0)
