import gzip
import os

import numpy as np
import pytest

from keras_condcomp import data
from tests.conftest import SHARED_MNIST


IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path, array, compress=False, dtype=np.uint8):
    dtype = np.dtype(dtype)
    header = bytes([0, 0, IDX_CODES[dtype], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(dtype).tobytes()
    with open(path, "wb") as handle:
        handle.write(gzip.compress(payload) if compress else payload)


def fake_mnist(directory, rng, compress):
    for split, n in (("train", 12), ("t10k", 5)):
        suffix = ".gz" if compress else ""
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_from_idx_files(tmp_path, rng, compress):
    fake_mnist(tmp_path, rng, compress)
    dataset = data.load_mnist(tmp_path)
    assert dataset.x_train.shape == (12, 784) and dataset.x_test.shape == (5, 784)
    assert dataset.x_train.dtype == np.float32 and 0 <= dataset.x_train.min()
    assert dataset.x_train.max() <= 1 and dataset.num_classes == 10


def test_corrupt_and_missing_files(tmp_path, rng):
    fake_mnist(tmp_path, rng, False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(ValueError, match="Corrupt IDX file .*t10k-labels"):
        data.load_mnist(tmp_path)
    labels.write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="bad magic number"):
        data.read_idx(labels)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="Corrupt IDX file"):
        data.read_idx(tmp_path / "bad.gz")
    os.remove(labels)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load_mnist(tmp_path / "absent")


def test_a_corrupt_gzip_body_and_an_overflowing_header_are_reported(tmp_path):
    images = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    write_idx(tmp_path / "x.gz", images, compress=True)
    raw = bytearray((tmp_path / "x.gz").read_bytes())
    raw[12:16] = b"\xff\xff\xff\xff"  # inside the deflate stream
    (tmp_path / "x.gz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="Corrupt IDX file .*x.gz"):
        data.read_idx(tmp_path / "x.gz")
    # Dimensions whose product overflows int64: still a size mismatch.
    header = bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 3
    (tmp_path / "big").write_bytes(header)
    with pytest.raises(ValueError, match="Corrupt IDX file .*expected"):
        data.read_idx(tmp_path / "big")
    with pytest.raises(ValueError, match="path=None"):
        data.read_idx(None)


@pytest.mark.parametrize(
    "change, message",
    [
        ("float_images", "expected uint8 images"),
        ("negative_label", "from -1"),
        ("float_labels", "labels float32"),
        ("empty", r"\(0,\)"),
        ("test_shape", r"train images are \(28, 28\), test images \(3, 3\)"),
    ],
)
def test_mnist_files_of_another_kind_are_refused(tmp_path, rng, change, message):
    fake_mnist(tmp_path, rng, compress=False)
    images = rng.integers(0, 256, size=(5, 4, 4))
    labels = np.arange(5) % 3
    if change == "float_images":
        write_idx(tmp_path / "t10k-images-idx3-ubyte", images / 255, dtype=">f4")
    elif change == "negative_label":
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels - 1, dtype=">i4")
    elif change == "float_labels":
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels + 0.5, dtype=">f4")
    elif change == "empty":
        write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:0])
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:0])
    else:
        write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:, :3, :3])
    with pytest.raises(ValueError, match=message):
        data.load_mnist(tmp_path)


def test_loader_arguments_name_argument_and_value(tmp_path):
    with pytest.raises(ValueError, match="data_dir=None"):
        data.load_mnist(None)
    with pytest.raises(ValueError, match="test_fraction='x'"):
        data.load_digits("x")
    with pytest.raises(ValueError, match="dataset=None"):
        data.load_dataset(None)
    with pytest.raises(ValueError, match="data_dir="):
        data.load_dataset("digits", data_dir=tmp_path)


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="shared MNIST split absent")
def test_shared_mnist_split():
    dataset = data.load_mnist(SHARED_MNIST)
    assert dataset.x_train.shape == (8000, 784) and dataset.x_test.shape == (2000, 784)


def test_digits():
    dataset = data.load_digits()
    assert dataset.x_train.shape[1] == 64 and len(dataset.x_test) == 360
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        data.load_digits(test_fraction=1.5)


def test_tfds_loader_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=30):
        dataset = data.load_dataset("tfds:mnist")
    assert dataset.x_train.shape == (30, 784) and dataset.x_test.shape == (30, 784)
    assert dataset.x_train.max() <= 1.0


def test_tfds_builders_can_locate_their_code():
    # What a real download runs first, and what mock_data skips: it imports
    # importlib_resources, which tensorflow-datasets does not declare.
    import tensorflow_datasets as tfds

    assert tfds.builder_cls("mnist").code_path.name == "mnist.py"


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset='cifar'"):
        data.load_dataset("cifar")


def test_a_stray_label_is_refused_and_missing_classes_named(tmp_path, rng):
    fake_mnist(tmp_path, rng, False)
    labels = np.arange(12) % 10
    labels[3] = 200  # one stray label among 12 examples
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=r"no training example of class 3, 10, 11, 12, 13 \.\.\. "
                                         r"\(191 of 201 classes missing\): more classes than"):
        data.load_mnist(tmp_path)
    labels[3] = 0  # class 3 absent from training, 9 of 10 classes present
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.warns(UserWarning, match=r"no training example of class 3 \(1 of 10"):
        assert data.load_mnist(tmp_path).num_classes == 10


def test_labels_must_be_one_non_negative_integer_an_example():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"one non-negative integer per example.*from -1 to 1"):
        data._as_dataset("toy", x, [0, 1, -1, 1], x, [0, 1, 0, 1], 1.0)
    with pytest.raises(ValueError, match=r"not one-hot.*shape \(4, 2\)"):
        data._as_dataset("toy", x, np.eye(2)[[0, 1, 0, 1]], x, [0, 1, 0, 1], 1.0)


def test_a_subset_is_not_named_mnist_and_images_keep_their_shape(tmp_path, rng):
    for split, n in (("train", 10), ("t10k", 4)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 14, 56)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 2)
    dataset = data.load_mnist(tmp_path)
    assert dataset.name == f"MNIST (10/4 images from {tmp_path.name})"
    assert dataset.image_shape == (14, 56, 1) and dataset.x_train.shape == (10, 784)
    assert data.load_mnist(tmp_path, name="mine").name == "mine"
    assert data.load_digits().image_shape == (8, 8, 1)


def test_files_that_cannot_be_read_as_idx_are_named(tmp_path, rng):
    with pytest.raises(ValueError, match="is not a regular file"):
        data.read_idx(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad magic number none \(empty file\)"):
        data.read_idx(tmp_path / "empty")
    fake_mnist(tmp_path, rng, False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 0, 0)))
    with pytest.raises(ValueError, match=r"rows and cols > 0.*\(5, 0, 0\)"):
        data.load_mnist(tmp_path)


def test_digits_seeds_are_checked_and_numpy_numbers_taken():
    split = data.load_digits(test_fraction=np.float32(0.25), seed=np.int64(1))
    assert len(split.x_test) == 450
    for seed in (True, -1, 1.5, "a"):
        with pytest.raises(ValueError, match=f"seed={seed!r}"):
            data.load_digits(seed=seed)
