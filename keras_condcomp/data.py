"""Datasets: the embedded digits, MNIST-style IDX files, and TensorFlow Datasets.

Every loader returns a `Dataset` of flattened float32 images in [0, 1] and
integer labels.

Examples:
    >>> from keras_condcomp import data
    >>> digits = data.load_digits()
    >>> digits.x_train.shape[1], digits.num_classes
    (64, 10)
"""

import dataclasses
import gzip
import math
import os
import warnings
import zlib

import numpy as np

from keras_condcomp._arguments import is_integer, is_number

__all__ = ["Dataset", "load_dataset", "load_digits", "load_mnist", "load_tfds", "read_idx"]

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass
class Dataset:
    """A train/test split of flattened images.

    The loaders of this module make it (float32 images scaled to [0, 1],
    int64 labels 0 to `num_classes - 1`); the constructor itself stores its
    arguments as given, unchecked.

    Args:
        name: a human-readable name, used in reports.
        x_train: float32 `(n, features)` training images in [0, 1].
        y_train: int64 `(n,)` training labels.
        x_test: float32 `(n, features)` test images in [0, 1].
        y_test: int64 `(n,)` test labels.
        num_classes: number of classes.
        image_shape: `(rows, cols, channels)` of the images before they
            were flattened, or None (not images, or not known).

    Examples:
        >>> import numpy as np
        >>> x, y = np.zeros((4, 3), "float32"), np.array([0, 1, 0, 1])
        >>> toy = Dataset("toy", x, y, x[:2], y[:2], num_classes=2)
        >>> toy.x_train.shape, toy.num_classes
        ((4, 3), 2)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    image_shape: tuple = None


def _as_dataset(name, x_train, y_train, x_test, y_test, scale, image_shape=None):
    """A `Dataset` of the images flattened and divided by `scale`; labels,
    one non-negative integer per example, run from 0 to `num_classes - 1` (a
    warning names the classes with no training example; more classes than
    training examples is an error: a stray label)."""
    def images(x):
        return (np.asarray(x, "float32").reshape(len(x), -1) / scale).astype("float32")

    if image_shape is None and np.ndim(x_train) >= 3:
        image_shape = tuple(np.shape(x_train)[1:])
        image_shape = image_shape if len(image_shape) == 3 else (*image_shape, 1)
    for split, labels, x in (("train", y_train, x_train), ("test", y_test, x_test)):
        labels = np.asarray(labels)
        if labels.size != len(x) or (labels.size and labels.min() < 0):
            raise ValueError(
                f"Dataset {name!r}: the {split} labels must be one non-negative integer per "
                f"example ({len(x)}; not one-hot). Received: labels of shape {labels.shape}"
                + (f" from {labels.min()} to {labels.max()}" if labels.size else "")
            )
    y_train = np.asarray(y_train, "int64").reshape(-1)
    y_test = np.asarray(y_test, "int64").reshape(-1)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise ValueError(
            f"Dataset {name!r} has labels of one class only (0): a classifier needs two or more."
        )
    # A stray label (200 among digits) would otherwise make a 201-way classifier.
    present = np.unique(y_train)
    missing = num_classes - len(present)
    if missing:
        absent = np.setdiff1d(np.arange(min(num_classes, len(present) + 6)), present)[:5]
        message = (
            f"Dataset {name!r} has labels up to {num_classes - 1}, but no training example "
            f"of class {', '.join(map(str, absent))}{' ...' if missing > 5 else ''} "
            f"({missing} of {num_classes} classes missing)"
        )
        if num_classes > len(y_train):
            raise ValueError(
                f"{message}: more classes than the {len(y_train)} training examples "
                "(a stray label?); labels must be 0 to k - 1."
            )
        warnings.warn(message, stacklevel=3)
    return Dataset(
        name, images(x_train), y_train, images(x_test), y_test, num_classes, image_shape
    )


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's embedded 8x8 digits (1,797 images), split at random.

    The split is stratified by class; pixels (0 to 16) are scaled to [0, 1].
    No download: the images ship with scikit-learn.

    Args:
        test_fraction: fraction of the images held out for test, a number
            in (0, 1) (default 0.2).
        seed: seed of the split, a non-negative integer (scikit-learn's
            `random_state`, default 0), or None for another split each call.

    Returns:
        A `Dataset` named `"digits (scikit-learn, 8x8)"`: 64 features,
        10 classes.

    Raises:
        ValueError: `test_fraction` not in (0, 1), or a bad `seed`.

    Examples:
        >>> digits = load_digits(test_fraction=0.25, seed=1)
        >>> len(digits.x_train), len(digits.x_test), digits.x_train.shape[1]
        (1347, 450, 64)
        >>> float(digits.x_train.min()), float(digits.x_train.max())
        (0.0, 1.0)
    """
    if not is_number(test_fraction) or not 0 < test_fraction < 1:
        raise ValueError(
            f"`test_fraction` must be in (0, 1). Received: test_fraction={test_fraction!r}"
        )
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise ValueError(f"`seed` must be a non-negative integer or None. Received: seed={seed!r}")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data,
        digits.target,
        test_size=float(test_fraction),
        random_state=None if seed is None else int(seed),
        stratify=digits.target,
    )
    return _as_dataset(
        "digits (scikit-learn, 8x8)", x_train, y_train, x_test, y_test, 16.0, (8, 8, 1)
    )


def read_idx(path):
    """Reads an IDX file (gzipped or not) into a NumPy array.

    IDX is the format of the MNIST files: a magic number giving the element
    type and the number of dimensions, the big-endian dimension sizes, then
    the data. Element types read: unsigned and signed bytes, 16- and 32-bit
    integers, 32- and 64-bit floats; the array comes back in native byte
    order.

    Args:
        path: the file's path (str or `os.PathLike`); a file starting with
            the gzip magic bytes is decompressed first.

    Returns:
        A NumPy array of the shape and type the file's header gives.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a path, or the file is not a well-formed
            IDX file (bad magic number, truncated header, or a size that
            does not match the header's shape).

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> array = np.arange(6, dtype="uint8").reshape(2, 3)
        >>> header = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "tiny-idx2-ubyte")
        ...     with open(path, "wb") as handle:
        ...         _ = handle.write(header + array.tobytes())
        ...     read_idx(path).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    _check_path("path", path)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"IDX file {path} is not a regular file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise ValueError(f"Cannot read IDX file {path}: {error.strerror or error}") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"Corrupt IDX file {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        found = raw[:4].hex() or "none (empty file)"
        raise ValueError(f"Corrupt IDX file {path}: bad magic number {found}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"Corrupt IDX file {path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize  # exact: no int64 overflow
    if len(raw) != expected:
        raise ValueError(
            f"Corrupt IDX file {path}: {len(raw)} bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _check_path(name, value):
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"`{name}` must be a path. Received: {name}={value!r}")


def _find_idx(data_dir, stem):
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(data_dir, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {data_dir}")


# The sizes of the official MNIST training and test sets.
MNIST_SIZES = (60_000, 10_000)


def load_mnist(data_dir, name=None):
    """MNIST from a directory of the four standard IDX files (gzipped or not).

    No download: the files must be there. Images are flattened and scaled
    by 1/255 (`image_shape` keeps their size); labels run from 0 to
    `num_classes - 1` (a warning names classes with no training example;
    more classes than training examples is an error). Any such files load
    (Fashion-MNIST's, for one), whatever their image size.

    Args:
        data_dir: directory holding `train-images-idx3-ubyte[.gz]`,
            `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`,
            `t10k-labels-idx1-ubyte[.gz]` (the uncompressed file is read
            when both are there).
        name: the name to report the data under. None (default):
            `"MNIST"` for the official 60,000/10,000 images, else
            `"MNIST (<train>/<test> images from <folder>)"`, so that a
            subset is not reported as MNIST.

    Returns:
        A `Dataset`.

    Raises:
        FileNotFoundError: `data_dir` is not a directory, or a file is
            missing.
        ValueError: `data_dir` is not a path; a file is not well-formed IDX
            (see `read_idx`); a split's images are not uint8 `(n, rows,
            cols)` with `n > 0` non-negative integer labels; train and test
            images differ in size; or every label is 0.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> def write_idx(path, array):
        ...     sizes = b"".join(size.to_bytes(4, "big") for size in array.shape)
        ...     with open(path, "wb") as handle:
        ...         handle.write(bytes([0, 0, 0x08, array.ndim]) + sizes + array.tobytes())
        >>> rng = np.random.default_rng(0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for split, n in (("train", 6), ("t10k", 4)):
        ...         images = rng.integers(0, 256, (n, 4, 4)).astype("uint8")
        ...         write_idx(os.path.join(tmp, f"{split}-images-idx3-ubyte"), images)
        ...         labels = (np.arange(n) % 3).astype("uint8")
        ...         write_idx(os.path.join(tmp, f"{split}-labels-idx1-ubyte"), labels)
        ...     tiny = load_mnist(tmp, name="tiny")
        >>> tiny.x_train.shape, tiny.x_test.shape, tiny.num_classes
        ((6, 16), (4, 16), 3)
    """
    _check_path("data_dir", data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"`data_dir` is not a directory. Received: data_dir={os.fspath(data_dir)!r}"
        )
    arrays = {
        stem: read_idx(_find_idx(data_dir, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    for split in ("train", "t10k"):
        images = arrays[f"{split}-images-idx3-ubyte"]
        labels = arrays[f"{split}-labels-idx1-ubyte"]
        # Pixels are bytes (scaled by 1/255 below), labels non-negative integers.
        problem = (
            images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels)
            or len(labels) == 0 or 0 in images.shape or images.dtype != np.uint8
            or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
        )
        if problem:
            raise ValueError(
                f"Corrupt MNIST split {split!r} in {data_dir}: expected uint8 images "
                "(n, rows, cols) and n non-negative integer labels, n, rows and cols > 0. "
                "Received: "
                f"images {images.dtype} {images.shape}, labels {labels.dtype} {labels.shape}"
                + (f" from {labels.min()} to {labels.max()}" if len(labels) else "")
            )
    train_shape = arrays["train-images-idx3-ubyte"].shape[1:]
    test_shape = arrays["t10k-images-idx3-ubyte"].shape[1:]
    if train_shape != test_shape:
        raise ValueError(
            f"Corrupt MNIST files in {data_dir}: train images are {train_shape}, "
            f"test images {test_shape}"
        )
    sizes = (len(arrays["train-labels-idx1-ubyte"]), len(arrays["t10k-labels-idx1-ubyte"]))
    if name is None:
        folder = os.path.basename(os.path.normpath(os.fspath(data_dir)))
        name = "MNIST" if sizes == MNIST_SIZES else (
            f"MNIST ({sizes[0]:,}/{sizes[1]:,} images from {folder})"
        )
    return _as_dataset(
        name,
        arrays["train-images-idx3-ubyte"],
        arrays["train-labels-idx1-ubyte"],
        arrays["t10k-images-idx3-ubyte"],
        arrays["t10k-labels-idx1-ubyte"],
        255.0,
    )


def load_tfds(name, data_dir=None):
    """An image-classification dataset from TensorFlow Datasets (downloads it).

    Downloads and prepares the dataset on first use (then reads TFDS's
    copy in `data_dir`); images are flattened and scaled by 1/255.

    Args:
        name: a TFDS name with `train` and `test` splits and `(image, label)`
            supervised keys, e.g. `"mnist"`, `"fashion_mnist"`, `"cifar10"`.
        data_dir: TFDS data directory (None: its default).

    Returns:
        A `Dataset` named `"<name> (TFDS)"`.

    Raises:
        ImportError: `tensorflow_datasets` is not installed.
        ValueError: TFDS could not load the dataset (an unknown name, no
            network, no `test` split, ...: the message gives TFDS's error).

    Examples:
        >>> mnist = load_tfds("mnist")  # doctest: +SKIP
        >>> mnist.x_train.shape, mnist.num_classes  # doctest: +SKIP
        ((60000, 784), 10)
    """
    import tensorflow_datasets as tfds

    def to_numpy(split):
        images, labels = [], []
        for x, y in tfds.as_numpy(split.batch(4096)):
            images.append(x)
            labels.append(y)
        return np.concatenate(images), np.concatenate(labels)

    try:
        train, test = tfds.load(
            name, split=["train", "test"], as_supervised=True, data_dir=data_dir
        )
        (x_train, y_train), (x_test, y_test) = to_numpy(train), to_numpy(test)
    except Exception as error:  # tfds raises many types; report them plainly.
        raise ValueError(f"Could not load TFDS dataset {name!r}: {error}") from None
    return _as_dataset(f"{name} (TFDS)", x_train, y_train, x_test, y_test, 255.0)


def load_dataset(dataset, data_dir=None):
    """Loads a dataset by the name the command line uses.

    Args:
        dataset: `"digits"` (`load_digits()`), `"mnist"` (`load_mnist(data_dir)`,
            or `load_tfds("mnist")`, a download, when `data_dir` is None) or
            `"tfds:NAME"` (`load_tfds(NAME, data_dir)`).
        data_dir: None (default), or for `"mnist"` the directory of its IDX
            files, for `"tfds:NAME"` the TFDS data directory. Must be None
            for `"digits"`.

    Returns:
        A `Dataset`.

    Raises:
        ValueError: an unknown `dataset`, or a `data_dir` with `"digits"`;
            and what the loader raises.

    Examples:
        >>> load_dataset("digits").name
        'digits (scikit-learn, 8x8)'
    """
    if not isinstance(dataset, str):
        raise ValueError(
            f"`dataset` must be 'digits', 'mnist' or 'tfds:NAME'. Received: dataset={dataset!r}"
        )
    if dataset == "digits":
        if data_dir is not None:
            raise ValueError(
                "`data_dir` is not used by dataset='digits' (embedded in scikit-learn). "
                f"Received: data_dir={data_dir!r}"
            )
        return load_digits()
    if dataset == "mnist":
        if data_dir is None:
            return load_tfds("mnist")
        return load_mnist(data_dir)
    if dataset.startswith("tfds:") and len(dataset) > 5:
        return load_tfds(dataset[5:], data_dir=data_dir)
    raise ValueError(
        "`dataset` must be 'digits', 'mnist' or 'tfds:NAME'. "
        f"Received: dataset={dataset!r}"
    )
