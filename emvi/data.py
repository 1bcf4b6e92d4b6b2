"""Embedded data sets, synthetic generators and local-file loaders.

Shapes: ``n`` data points, ``d`` data dimension, ``k`` mixture components.

* ``load_digits``: scikit-learn's bundled 8x8 digits (1797 images, pixel values 0..16).
* ``digits_bin``: the "digits-bin" benchmark protocol used throughout emvi: a pixel is 1
  when its value is > 8 (of 16); the test set is the 297 images at
  ``np.random.default_rng(0).permutation(1797)[1500:]`` and the train set the other 1500.
* ``synthetic_mixture``: draws from a known 2-D Gaussian mixture, for figures and tests.
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
