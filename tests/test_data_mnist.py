"""load_mnist on tiny IDX and npz files written by the tests themselves."""

import gzip
import struct

import numpy as np
import pytest

from emvi import data


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.tobytes()


def _tiny(rng):
    train_x = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    test_x = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    train_y = rng.integers(0, 10, 5, dtype=np.uint8)
    test_y = rng.integers(0, 10, 3, dtype=np.uint8)
    return train_x, train_y, test_x, test_y


def _write_idx(folder, arrays, *, compress):
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for name, array, gz in zip(names, arrays, compress, strict=True):
        raw = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


def _check(split, arrays, binarize=False):
    train_x, train_y, test_x, test_y = arrays
    want_train = train_x.reshape(5, 16) / 255.0
    want_test = test_x.reshape(3, 16) / 255.0
    if binarize:
        want_train, want_test = (want_train > 0.5), (want_test > 0.5)
    assert isinstance(split, data.Split)
    assert split.train_x.shape == (5, 16) and split.test_x.shape == (3, 16)
    assert split.train_x.dtype == np.float32
    np.testing.assert_allclose(split.train_x, want_train, rtol=1e-6)
    np.testing.assert_allclose(split.test_x, want_test, rtol=1e-6)
    np.testing.assert_array_equal(split.train_y, train_y)
    np.testing.assert_array_equal(split.test_y, test_y)
    assert split.train_y.dtype == np.int32


def test_reads_plain_and_gzipped_idx(tmp_path, rng):
    arrays = _tiny(rng)
    _write_idx(tmp_path, arrays, compress=(True, False, True, False))
    _check(data.load_mnist(tmp_path), arrays)
    _check(data.load_mnist(tmp_path, binarize=True), arrays, binarize=True)


def test_reads_npz(tmp_path, rng):
    arrays = _tiny(rng)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=arrays[0], y_train=arrays[1], x_test=arrays[2], y_test=arrays[3])
    _check(data.load_mnist(path), arrays)


def test_missing_files_and_bad_headers_raise(tmp_path, rng):
    arrays = _tiny(rng)
    with pytest.raises(ValueError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\[.gz\] not found"):
        data.load_mnist(tmp_path)
    _write_idx(tmp_path, arrays, compress=(False,) * 4)
    bad = bytearray((tmp_path / "t10k-labels-idx1-ubyte").read_bytes())
    bad[2] = 0x42  # not an IDX type code
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="bad magic number"):
        data.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(arrays[3])[:-1])
    with pytest.raises(ValueError, match="implies"):
        data.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4)))
    with pytest.raises(ValueError, match="3 test images but 4 labels"):
        data.load_mnist(tmp_path)
    npz = tmp_path / "partial.npz"
    np.savez(npz, x_train=arrays[0], y_train=arrays[1])
    with pytest.raises(ValueError, match=r"lacks the array\(s\) \['x_test', 'y_test'\]"):
        data.load_mnist(npz)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"could not be read as an MNIST \.npz"):
        data.load_mnist(junk)
