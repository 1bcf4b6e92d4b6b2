"""Embedded data sets, synthetic generators and local-file loaders.

Shapes: ``n`` data points, ``d`` data dimension, ``k`` mixture components.

* ``load_digits``: scikit-learn's bundled 8x8 digits (1797 images, pixel values 0..16).
* ``digits_bin``: the "digits-bin" benchmark protocol used throughout emvi: a pixel is 1
  when its value is > 8 (of 16); the test set is the 297 images at
  ``np.random.default_rng(0).permutation(1797)[1500:]`` and the train set the other 1500.
* ``synthetic_mixture``: draws from a known 2-D Gaussian mixture, for figures and tests.
* ``load_mnist``: MNIST from local IDX files (optionally gzipped) or an .npz, as a ``Split``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DIGITS_BIN_NUM_TRAIN = 1500


class Split(NamedTuple):
    """A train/test split of images (flattened) and labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_digits(dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as ``(x, y)`` with ``x`` of shape (1797, 64) in [0, 16]."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    return bunch.data.astype(dtype), bunch.target.astype(np.int32)


def digits_bin(dtype=np.float32) -> Split:
    """The digits-bin protocol: binarised digits (pixel > 8), fixed 1500/297 split."""
    x, y = load_digits(np.float64)
    xb = (x > 8).astype(dtype)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    train, test = perm[:DIGITS_BIN_NUM_TRAIN], perm[DIGITS_BIN_NUM_TRAIN:]
    return Split(xb[train], y[train], xb[test], y[test])


class MixtureSpec(NamedTuple):
    """The true parameters behind ``synthetic_mixture`` (scikit-learn layout, 'full')."""

    weights: np.ndarray  # (k,)
    means: np.ndarray  # (k, d)
    covariances: np.ndarray  # (k, d, d)


def default_mixture_2d() -> MixtureSpec:
    """Three well-separated, differently shaped 2-D Gaussians."""
    weights = np.array([0.5, 0.3, 0.2])
    means = np.array([[-3.0, 0.0], [2.5, 2.0], [2.0, -3.0]])
    covariances = np.array(
        [
            [[1.5, 0.9], [0.9, 1.0]],
            [[0.4, -0.2], [-0.2, 0.8]],
            [[1.0, 0.0], [0.0, 0.15]],
        ]
    )
    return MixtureSpec(weights, means, covariances)


def synthetic_mixture(
    seed: int, num_points: int, spec: MixtureSpec | None = None, dtype=np.float64
) -> tuple[np.ndarray, np.ndarray, MixtureSpec]:
    """Draws ``num_points`` points from a Gaussian mixture with NumPy.

    Returns:
      ``(x, z, spec)``: points (n, d), their true components (n,), and the mixture.
    """
    spec = default_mixture_2d() if spec is None else spec
    rng = np.random.default_rng(seed)
    z = rng.choice(len(spec.weights), size=num_points, p=spec.weights)
    chol = np.linalg.cholesky(spec.covariances)
    eps = rng.standard_normal((num_points, spec.means.shape[1]))
    x = spec.means[z] + np.einsum("nij,nj->ni", chol[z], eps)
    return x.astype(dtype), z.astype(np.int32), spec


# ---------------------------------------------------------------------------------------
# MNIST from local files (no download: pass the folder or .npz you already have).

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_FILES = {
    "train_x": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_y": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_x": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_y": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_MNIST_NPZ_KEYS = {
    "train_x": "x_train",
    "train_y": "y_train",
    "test_x": "x_test",
    "test_y": "y_test",
}


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzip-compressed or not.

    The header is two zero bytes, a type code (0x08 = unsigned byte, ...), the number of
    dimensions, then one big-endian uint32 per dimension, then the data.

    Raises:
      ValueError: on a bad magic number, a truncated file or trailing bytes, a truncated
        or corrupt gzip stream, or a file that cannot be read.
    """
    import gzip
    import zlib
    from pathlib import Path

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {err.strerror or err}.") from err
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            # gzip raises EOFError for a truncated stream, BadGzipFile (an OSError) for a
            # bad header and zlib.error or a CRC/length OSError for damaged data.
            raise ValueError(
                f"{path} is a truncated or corrupt gzip file ({type(err).__name__}: {err}); "
                "download it again."
            ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}"
            " (expected 0000 followed by a type code such as 08 and a dimension count)."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its IDX header needs {header} bytes.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} holds {len(raw)} bytes but its header {shape} implies {expected}."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_mnist_file(folder, names) -> str:
    from pathlib import Path

    for name in names:
        for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
            if candidate.exists():
                return str(candidate)
    raise ValueError(
        f"MNIST file {names[0]}[.gz] not found in {folder}; expected the four standard IDX"
        " files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,"
        " t10k-labels-idx1-ubyte, optionally gzipped) or an .npz with x_train, y_train,"
        " x_test, y_test."
    )


def load_mnist(path, *, binarize: bool = False, threshold: float = 0.5, dtype=np.float32) -> Split:
    """Loads MNIST from local files as a ``Split`` (images flattened to (n, 784), in [0, 1]).

    Args:
      path: a folder with the four IDX files (``train-images-idx3-ubyte`` etc., each
        optionally ``.gz``), or an ``.npz`` with arrays ``x_train``, ``y_train``,
        ``x_test``, ``y_test`` (the Keras layout).
      binarize: if True, a pixel becomes 1 when its scaled value is > ``threshold``.
      threshold: binarisation threshold in [0, 1].
      dtype: dtype of the images.

    Returns:
      ``Split(train_x, train_y, test_x, test_y)``; integer pixels are divided by 255.

    Raises:
      ValueError: if files are missing, unreadable, truncated or corrupt (gzip
        included), not IDX/npz, or inconsistent; if a pixel is NaN, negative or above 255
        (above 1 for float images already in [0, 1] is read as 0..255); if a label is
        NaN, not a whole number, or negative.
    """
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise ValueError(f"MNIST path {path} does not exist.")
    if path.is_dir():
        arrays = {k: read_idx(_find_mnist_file(path, names)) for k, names in _MNIST_FILES.items()}
    else:
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as f:
                files = set(f.files)
                arrays = {k: np.asarray(f[v]) for k, v in _MNIST_NPZ_KEYS.items() if v in files}
        except (
            OSError,
            EOFError,
            ValueError,
            zipfile.BadZipFile,
            AttributeError,
            TypeError,
        ) as err:
            raise ValueError(
                f"{path} could not be read as an MNIST .npz (nor is it a folder of IDX"
                f" files): {err}"
            ) from err
        missing = [v for k, v in _MNIST_NPZ_KEYS.items() if k not in arrays]
        if missing:
            raise ValueError(
                f"{path} lacks the array(s) {missing}; an MNIST .npz needs x_train, y_train,"
                " x_test and y_test."
            )

    def images(x, name):
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"MNIST {name} must have shape (n, ...); got {x.shape}.")
        if x.shape[0] == 0:
            raise ValueError(f"MNIST {name} is empty.")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(
            x.dtype, np.complexfloating
        ):
            raise ValueError(f"MNIST {name} must be real numbers; got dtype {x.dtype}.")
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        bad = ~np.isfinite(flat) | (flat < 0) | (flat > 255)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise ValueError(
                f"MNIST {name} hold {int(bad.sum())} pixel(s) that are NaN, inf, negative or "
                f"above 255 (in image(s) {', '.join(map(str, rows[:5]))}"
                f"{' ...' if rows.size > 5 else ''}); pixels must lie in [0, 255] "
                "(or [0, 1])."
            )
        if np.issubdtype(x.dtype, np.integer) or flat.max() > 1.0:
            flat = flat / 255.0
        if binarize:
            flat = (flat > threshold).astype(np.float64)
        return flat.astype(dtype)

    def labels(y, name):
        y = np.asarray(y).reshape(-1)
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_) or np.issubdtype(
            y.dtype, np.complexfloating
        ):
            raise ValueError(f"MNIST {name} must be integers; got dtype {y.dtype}.")
        values = y.astype(np.float64)
        bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
        if bad.any():
            shown = ", ".join(map(str, np.nonzero(bad)[0][:5]))
            raise ValueError(
                f"MNIST {name} hold {int(bad.sum())} value(s) that are NaN, negative or not "
                f"whole numbers (at {shown}); labels are class numbers 0, 1, ..."
            )
        return y.astype(np.int32)

    split = Split(
        images(arrays["train_x"], "train images"),
        labels(arrays["train_y"], "train labels"),
        images(arrays["test_x"], "test images"),
        labels(arrays["test_y"], "test labels"),
    )
    if split.train_x.shape[0] != split.train_y.shape[0]:
        raise ValueError(
            f"MNIST has {split.train_x.shape[0]} train images but {split.train_y.shape[0]} labels."
        )
    if split.test_x.shape[0] != split.test_y.shape[0]:
        raise ValueError(
            f"MNIST has {split.test_x.shape[0]} test images but {split.test_y.shape[0]} labels."
        )
    if split.train_x.shape[1] != split.test_x.shape[1]:
        raise ValueError("MNIST train and test images have different sizes.")
    return split
