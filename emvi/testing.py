r"""Oracles and assertions that the tests need, kept out of the library's model files.

* :func:`assert_trees_close`: the one tree comparison (on :func:`chex.assert_trees_all_close`),
  with an optional per-leaf scale for entries near zero.
* :func:`gmm_two_pass_step` / :func:`gmm_two_pass_em`: textbook Gaussian-mixture EM
  (whitening E-step, scatter about the new means computed from explicitly centred
  differences), the oracle for the packed half-steps of :mod:`emvi.gmm`.

Shape letters: ``n`` data points, ``k`` components, ``d`` data dim, ``t`` iterations.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from emvi import gmm

PyTree = Any


def assert_trees_close(
    actual: PyTree,
    expected: PyTree,
    *,
    rtol: float,
    atol: float = 0.0,
    scaled: bool = False,
) -> None:
    r"""Asserts two pytrees have the same structure and entrywise close leaves.

    Each entry must satisfy :math:`|a - e| \le \mathrm{atol} + \mathrm{rtol}\,|e|`
    (:func:`chex.assert_trees_all_close`). With ``scaled=True`` the absolute tolerance of
    each leaf is raised to ``rtol * max|e|`` of that leaf, so entries near zero are judged
    against the leaf's scale (a relative error is meaningless for an entry that is zero up
    to rounding of its neighbours).

    Example:
      >>> assert_trees_close({"a": jnp.ones(2)}, {"a": jnp.ones(2) + 1e-9}, rtol=1e-6)
      >>> assert_trees_close((jnp.array([1.0, 1e-12]),), (jnp.array([1.0, 0.0]),), rtol=1e-9,
      ...                    scaled=True)
    """
    chex.assert_trees_all_equal_structs(actual, expected)
    if not scaled:
        chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)
        return

    def one(a, e):
        scale = float(np.max(np.abs(np.asarray(e)))) if np.size(e) else 0.0
        chex.assert_trees_all_close(a, e, rtol=rtol, atol=max(atol, rtol * scale))

    jax.tree_util.tree_map(one, actual, expected)


def assert_same_runs(actual: PyTree, expected: PyTree) -> None:
    """Asserts two fits that sum the same terms in another order agree: integer and boolean
    leaves identical, float leaves to 1e-12 relative (of each entry, or of the leaf's largest
    finite entry for entries that cancel near 0, such as off-diagonal covariances), NaN where
    NaN, shapes and dtypes equal. Reordered sums differ by rounding (~1e-15, grown to ~1e-14
    over tens of EM iterations, measured); a restart frozen one iteration early or late
    differs by a whole EM step.

    Example:
      >>> ints, floats = jnp.arange(2), jnp.array([1.0, 1e-17])
      >>> assert_same_runs((ints, floats), (ints, jnp.array([1.0, 0.0])))
    """
    leaves_a, leaves_e = jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)
    for u, v in zip(leaves_a, leaves_e, strict=True):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape and u.dtype == v.dtype
        if v.dtype.kind != "f":
            np.testing.assert_array_equal(u, v)
            continue
        scale = np.max(np.abs(v[np.isfinite(v)]), initial=0.0)
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12 * scale)


def gmm_two_pass_step(
    params: gmm.GMMParams,
    x: Float[Array, "n d"],
    w: Float[Array, " n"],
    hyper: gmm.GMMHyper,
    covariance_type: str,
) -> tuple[gmm.GMMParams, Float[Array, ""]]:
    """One textbook EM iteration: whitening E-step, centred-scatter M-step (no packing).

    Returns the new parameters and the weighted mean log-likelihood at ``params``.
    """
    lj = gmm.log_joint(params, x, covariance_type=covariance_type)
    ll = jnp.sum(w * jax.nn.logsumexp(lj, axis=1)) / jnp.sum(w)
    resp = jax.nn.softmax(lj, axis=1) * w[:, None]
    counts = jnp.sum(resp, axis=0)
    sums = resp.T @ x
    nk = counts + 10.0 * jnp.finfo(x.dtype).eps
    diff = x[None, :, :] - (sums / nk[:, None])[:, None, :]  # (k, n, d)
    if covariance_type in ("full", "tied"):
        scatter = jnp.einsum("nk,kni,knj->kij", resp, diff, diff)
        if covariance_type == "tied":
            scatter = jnp.sum(scatter, axis=0)
    elif covariance_type == "diag":
        scatter = jnp.einsum("nk,kni->ki", resp, diff * diff)
    else:
        scatter = jnp.einsum("nk,kn->k", resp, jnp.sum(diff * diff, axis=2))
    return gmm._finish_m_step(counts, sums, scatter, hyper, covariance_type, None), ll


def gmm_two_pass_em(
    params: gmm.GMMParams,
    x: Float[Array, "n d"],
    w: Float[Array, " n"],
    hyper: gmm.GMMHyper,
    *,
    covariance_type: str,
    num_iter: int,
) -> tuple[gmm.GMMParams, Float[Array, " t"]]:
    """``num_iter`` textbook iterations; returns (params, history (num_iter,))."""

    def body(p, _):
        return gmm_two_pass_step(p, x, w, hyper, covariance_type)

    return lax.scan(body, params, None, length=num_iter)


JIT_VARIANTS = ("jit", "no_jit")
"""Names for a jit/no-jit parametrisation of a test (chex's ``variants`` for pytest
functions): ``@pytest.mark.parametrize("variant", JIT_VARIANTS)`` with :func:`variant`."""


def variant(name: str, fn, *, static_argnames: tuple[str, ...] = ()):
    """``jax.jit(fn)`` for ``name="jit"``, ``fn`` itself (op-by-op) for ``"no_jit"``.

    Example:
      >>> f = variant("jit", lambda x, *, p: x**p, static_argnames=("p",))
      >>> float(f(jnp.asarray(3.0), p=2))
      9.0
    """
    if name == "jit":
        return jax.jit(fn, static_argnames=static_argnames)
    if name == "no_jit":
        return fn
    raise ValueError(f"variant must be one of {JIT_VARIANTS}; got {name!r}.")


def sklearn_precisions(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Inverse covariances in scikit-learn's ``precisions_init`` layout (float64 NumPy)."""
    cov = np.asarray(covariances, np.float64)
    return np.linalg.inv(cov) if covariance_type in ("full", "tied") else 1.0 / cov


def sklearn_gmm(
    x: np.ndarray,
    init: gmm.GMMParams,
    *,
    covariance_type: str,
    max_iter: int,
    tol: float,
    reg_covar: float,
    random_state: int = 0,
):
    """scikit-learn's ``GaussianMixture`` fitted from the initial parameters ``init``.

    The oracle for :func:`emvi.gmm.fit` from the same start: ``weights_init``,
    ``means_init`` and ``precisions_init`` (:func:`sklearn_precisions`) are set from
    ``init``, the stopping rule (``tol`` on the mean log-likelihood, ``max_iter``) and
    ``reg_covar`` are shared; its ``ConvergenceWarning`` is silenced.

    Returns:
      The fitted ``sklearn.mixture.GaussianMixture``.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    weights, means, cov = (np.asarray(a, np.float64) for a in init)
    est = GaussianMixture(
        n_components=len(weights),
        covariance_type=covariance_type,
        tol=tol,
        reg_covar=reg_covar,
        max_iter=max_iter,
        weights_init=weights,
        means_init=means,
        precisions_init=sklearn_precisions(cov, covariance_type),
        random_state=random_state,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(np.asarray(x))
