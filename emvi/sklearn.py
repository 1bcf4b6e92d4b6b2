r"""scikit-learn estimators over emvi's functional core: swap one import, keep the numbers.

:class:`GaussianMixture` takes scikit-learn's ``GaussianMixture`` parameters and exposes its
attributes (``weights_``, ``means_``, ``covariances_``, ``precisions_``,
``precisions_cholesky_``, ``converged_``, ``n_iter_``, ``lower_bound_``, ``n_features_in_``)
and methods (``fit``, ``fit_predict``, ``predict``, ``predict_proba``, ``score``,
``score_samples``, ``sample``, ``bic``, ``aic``), including ``warm_start`` and the partial
initialisation by ``weights_init`` / ``means_init`` / ``precisions_init``; the fit itself is
:func:`emvi.gmm.fit` (the one EM driver, restarts vmapped, on any JAX device).
:class:`BernoulliMixture` does the same for :mod:`emvi.bernoulli_mixture` (scikit-learn has
no such estimator; it follows the same conventions).

From the same initial parameters the two ``GaussianMixture`` classes run the same iterations
(scikit-learn's stopping rule included) and agree to about 1e-13 in float64 (enable JAX's
x64 mode for float64; without it JAX computes in float32). The estimators pass scikit-learn's
``check_estimator``, pickle (fitted attributes are NumPy arrays), and work inside a
``Pipeline`` and ``GridSearchCV``.

Randomness: ``random_state`` (None, an int, or a ``numpy.random.RandomState``) is turned
into one JAX key per ``fit``, so an int gives the same fit every time.

Example:
  >>> import numpy as np
  >>> from emvi.sklearn import GaussianMixture
  >>> x = np.concatenate([np.zeros((20, 2)), np.full((20, 2), 5.0)])
  >>> x = x + np.random.default_rng(0).normal(size=x.shape)
  >>> gm = GaussianMixture(n_components=2, covariance_type="diag", random_state=0).fit(x)
  >>> np.round(np.sort(gm.means_[:, 0])).astype(int).tolist()
  [0, 5]
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from emvi import bernoulli_mixture as bm
from emvi import gmm

_SK_INITS = {
    "kmeans": "kmeans",
    "k-means++": "kmeans++",
    "random": "random",
    "random_from_data": "random_from_data",
}


def _dtype() -> type:
    return np.float64 if jax.config.read("jax_enable_x64") else np.float32


def _key(random_state) -> jax.Array:
    """One JAX key from scikit-learn's ``random_state`` convention."""
    if random_state is None or random_state is np.random:
        seed = int(np.random.mtrand._rand.randint(0, 2**31 - 1))
    elif isinstance(random_state, numbers.Integral):
        seed = int(random_state)
    elif isinstance(random_state, np.random.RandomState):
        seed = int(random_state.randint(0, 2**31 - 1))
    elif isinstance(random_state, np.random.Generator):
        seed = int(random_state.integers(0, 2**31 - 1))
    else:
        raise ValueError(
            f"random_state must be None, an int or a numpy RandomState; got {random_state!r}."
        )
    return jax.random.key(seed)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
    return int(value)


def _check_nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}.")
    return float(value)


def _precisions_to_covariances(precisions: np.ndarray, covariance_type: str) -> np.ndarray:
    if covariance_type == "full":
        return np.linalg.inv(precisions)
    if covariance_type == "tied":
        return np.linalg.inv(precisions)
    return 1.0 / precisions


def _precision_cholesky(cov: np.ndarray, covariance_type: str) -> np.ndarray:
    """scikit-learn's ``precisions_cholesky_``: an upper factor U with U U^T = Sigma^-1."""
    if covariance_type in ("full", "tied"):
        mats = cov.reshape(-1, *cov.shape[-2:])
        out = []
        for c in mats:
            chol = np.linalg.cholesky(c)
            out.append(np.linalg.solve(chol, np.eye(c.shape[0])).T)
        out = np.stack(out)
        return out if covariance_type == "full" else out[0]
    return 1.0 / np.sqrt(cov)


def _precisions(cov: np.ndarray, covariance_type: str) -> np.ndarray:
    if covariance_type in ("full", "tied"):
        u = _precision_cholesky(cov, covariance_type)
        return u @ np.swapaxes(u, -1, -2)
    return 1.0 / cov


class GaussianMixture(DensityMixin, BaseEstimator):
    """scikit-learn's ``GaussianMixture``, fitted by :func:`emvi.gmm.fit`.

    Parameters are scikit-learn's (``n_components``, ``covariance_type``, ``tol``,
    ``reg_covar``, ``max_iter``, ``n_init``, ``init_params``, ``weights_init``,
    ``means_init``, ``precisions_init``, ``random_state``, ``warm_start``), plus
    ``chunk_size`` (run the E-step over chunks of that many points, bounding memory).
    ``verbose`` and ``verbose_interval`` are accepted for compatibility and ignored: the
    loop runs on device.
    """

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        chunk_size=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.chunk_size = chunk_size

    # -- fitting ----------------------------------------------------------------------

    def _validate(self, x) -> tuple[int, str]:
        k = _check_positive_int(self.n_components, "n_components")
        if self.covariance_type not in gmm.COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {list(gmm.COVARIANCE_TYPES)}; got "
                f"{self.covariance_type!r}."
            )
        if self.init_params not in _SK_INITS:
            raise ValueError(
                f"init_params must be one of {sorted(_SK_INITS)}; got {self.init_params!r}."
            )
        _check_positive_int(self.max_iter, "max_iter")
        _check_positive_int(self.n_init, "n_init")
        _check_nonnegative(self.tol, "tol")
        _check_nonnegative(self.reg_covar, "reg_covar")
        if x.shape[0] < k:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = {k}, "
                f"n_samples = {x.shape[0]}"
            )
        return k, self.covariance_type

    def _initial(self, key, x, k, ct, dtype):
        """The start: the previous fit (warm start), or init + the user's partial init."""
        if self.warm_start and hasattr(self, "weights_"):
            return gmm.GMMParams(
                jnp.asarray(self.weights_, dtype),
                jnp.asarray(self.means_, dtype),
                jnp.asarray(self.covariances_, dtype),
            ), 1
        given = (self.weights_init, self.means_init, self.precisions_init)
        if all(g is None for g in given):
            return _SK_INITS[self.init_params], _check_positive_int(self.n_init, "n_init")
        d = x.shape[1]
        base = gmm.init_params(
            key,
            jnp.asarray(x),
            k,
            covariance_type=ct,
            method=_SK_INITS[self.init_params],
            reg_covar=self.reg_covar,
        )
        weights, means, cov = (np.asarray(a, np.float64) for a in base)
        cov_shape = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[ct]
        if self.weights_init is not None:
            weights = np.asarray(self.weights_init, np.float64)
            if weights.shape != (k,) or np.any(weights < 0) or not np.isclose(weights.sum(), 1):
                raise ValueError(
                    f"weights_init must be non-negative, of shape ({k},), summing to 1."
                )
        if self.means_init is not None:
            means = np.asarray(self.means_init, np.float64)
            if means.shape != (k, d):
                raise ValueError(f"means_init must have shape ({k}, {d}); got {means.shape}.")
        if self.precisions_init is not None:
            prec = np.asarray(self.precisions_init, np.float64)
            if prec.shape != cov_shape:
                raise ValueError(
                    f"precisions_init must have shape {cov_shape} for covariance_type="
                    f"{ct!r}; got {prec.shape}."
                )
            cov = _precisions_to_covariances(prec, ct)
        elif self.means_init is not None:
            # scikit-learn re-estimates the covariances around the given means, from the
            # initial responsibilities; here the init's own covariances are kept (the means
            # are what the user fixed), which is also a valid start.
            pass
        return gmm.GMMParams(
            jnp.asarray(weights, dtype), jnp.asarray(means, dtype), jnp.asarray(cov, dtype)
        ), 1

    def fit(self, X, y=None):
        """Fits the mixture by EM; returns ``self``."""
        self.fit_predict(X, y)
        return self

    def fit_predict(self, X, y=None):
        """Fits, then returns the most probable component of every point (n,)."""
        dtype = _dtype()
        x = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        x = np.asarray(x, dtype)
        k, ct = self._validate(x)
        key = _key(self.random_state)
        init, num_init = self._initial(key, x, k, ct, dtype)
        res = gmm.fit(
            key,
            x,
            k,
            covariance_type=ct,
            init=init,
            max_iter=self.max_iter,
            tol=self.tol,
            reg_covar=self.reg_covar,
            num_init=num_init,
            chunk_size=self.chunk_size,
        )
        cov = np.asarray(res.params.covariances)
        self.weights_ = np.asarray(res.params.weights)
        self.means_ = np.asarray(res.params.means)
        self.covariances_ = cov
        self.precisions_cholesky_ = _precision_cholesky(cov.astype(np.float64), ct).astype(
            cov.dtype
        )
        self.precisions_ = _precisions(cov.astype(np.float64), ct).astype(cov.dtype)
        self.n_iter_ = int(res.num_iter)
        self.converged_ = bool(res.converged)
        # scikit-learn's lower_bound_ is the mean log-likelihood at the parameters before
        # the last M-step, i.e. the last entry of the driver's history.
        self.lower_bound_ = float(np.asarray(res.history)[self.n_iter_ - 1])
        self.lower_bounds_ = np.asarray(res.history)[: self.n_iter_].tolist()
        return self.predict(x)

    # -- scoring ----------------------------------------------------------------------

    def _params(self) -> gmm.GMMParams:
        check_is_fitted(self)
        return gmm.GMMParams(
            jnp.asarray(self.weights_), jnp.asarray(self.means_), jnp.asarray(self.covariances_)
        )

    def _data(self, X) -> jax.Array:
        check_is_fitted(self)
        x = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return jnp.asarray(np.asarray(x, self.means_.dtype))

    def score_samples(self, X):
        """:math:`\\log p(x_i)` per point, shape (n,)."""
        x = self._data(X)
        return np.asarray(gmm.log_prob(self._params(), x, covariance_type=self.covariance_type))

    def score(self, X, y=None):
        """Mean :math:`\\log p(x_i)` over the points."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X):
        """The exact posterior :math:`p(z = k \\mid x_i)`, shape (n, k)."""
        x = self._data(X)
        return np.asarray(gmm.posterior(self._params(), x, covariance_type=self.covariance_type))

    def predict(self, X):
        """The most probable component of every point, shape (n,)."""
        return np.argmax(self.predict_proba(X), axis=1)

    def sample(self, n_samples=1):
        """Draws ``(X, labels)``; like scikit-learn, the labels come sorted."""
        check_is_fitted(self)
        n_samples = _check_positive_int(n_samples, "n_samples")
        key = _key(self.random_state)
        x, z = gmm.sample(key, self._params(), n_samples, covariance_type=self.covariance_type)
        order = np.argsort(np.asarray(z), kind="stable")
        return np.asarray(x)[order], np.asarray(z)[order]

    def _n_parameters(self) -> int:
        return gmm.num_parameters(self.n_components, self.means_.shape[1], self.covariance_type)

    def bic(self, X):
        """Bayesian information criterion (lower is better)."""
        x = np.asarray(self._data(X))
        return float(-2 * self.score(x) * x.shape[0] + self._n_parameters() * np.log(x.shape[0]))

    def aic(self, X):
        """Akaike information criterion (lower is better)."""
        x = np.asarray(self._data(X))
        return float(-2 * self.score(x) * x.shape[0] + 2 * self._n_parameters())


class BernoulliMixture(DensityMixin, BaseEstimator):
    """A mixture of independent Bernoullis, fitted by :func:`emvi.bernoulli_mixture.fit`.

    Parameters follow scikit-learn's conventions: ``n_components``, ``tol``, ``max_iter``,
    ``n_init``, ``init_params`` (``"points"`` or ``"responsibilities"``), ``random_state``,
    ``warm_start``, and the Beta/Dirichlet prior as ``alpha`` (Dirichlet on the weights),
    ``a`` and ``b`` (Beta on every pixel probability; ``a = b = 1`` is maximum likelihood).
    Data must lie in [0, 1], unless ``binarize`` is a threshold (then ``x > binarize`` is
    modelled, as in scikit-learn's ``BernoulliNB``). Attributes: ``weights_``, ``probs_``,
    ``n_iter_``, ``converged_``, ``lower_bound_``, ``n_features_in_``.
    """

    def __init__(
        self,
        n_components=1,
        *,
        tol=1e-3,
        max_iter=100,
        n_init=1,
        init_params="points",
        alpha=1.0,
        a=1.2,
        b=1.2,
        binarize=None,
        random_state=None,
        warm_start=False,
        chunk_size=None,
    ):
        self.n_components = n_components
        self.binarize = binarize
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.alpha = alpha
        self.a = a
        self.b = b
        self.random_state = random_state
        self.warm_start = warm_start
        self.chunk_size = chunk_size

    def fit(self, X, y=None):
        """Fits the mixture; returns ``self``."""
        dtype = _dtype()
        x = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        x = self._binary(np.asarray(x, dtype))
        k = _check_positive_int(self.n_components, "n_components")
        if x.shape[0] < k:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = {k}, "
                f"n_samples = {x.shape[0]}"
            )
        init, num_init = self.init_params, _check_positive_int(self.n_init, "n_init")
        if self.warm_start and hasattr(self, "weights_"):
            init = bm.BernoulliMixtureParams(
                jnp.asarray(self.weights_, dtype), jnp.asarray(self.probs_, dtype)
            )
            num_init = 1
        res = bm.fit(
            _key(self.random_state),
            x,
            k,
            init=init,
            prior=bm.BernoulliMixturePrior(self.alpha, self.a, self.b),
            max_iter=_check_positive_int(self.max_iter, "max_iter"),
            tol=_check_nonnegative(self.tol, "tol"),
            num_init=num_init,
            chunk_size=self.chunk_size,
        )
        self.weights_ = np.asarray(res.params.weights)
        self.probs_ = np.asarray(res.params.probs)
        self.n_iter_ = int(res.num_iter)
        self.converged_ = bool(res.converged)
        self.lower_bound_ = float(np.asarray(res.history)[self.n_iter_ - 1])
        return self

    def fit_predict(self, X, y=None):
        """Fits, then returns the most probable component of every point."""
        return self.fit(X).predict(X)

    def _params(self):
        check_is_fitted(self)
        return bm.BernoulliMixtureParams(jnp.asarray(self.weights_), jnp.asarray(self.probs_))

    def _data(self, X):
        check_is_fitted(self)
        x = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return jnp.asarray(self._binary(np.asarray(x, self.probs_.dtype)))

    def _binary(self, x: np.ndarray) -> np.ndarray:
        if self.binarize is not None:
            return (x > self.binarize).astype(x.dtype)
        if np.any(x < 0) or np.any(x > 1):
            raise ValueError(
                "BernoulliMixture needs data in [0, 1] (binary, or probabilities); pass "
                "binarize=THRESHOLD to model x > THRESHOLD instead."
            )
        return x

    def score_samples(self, X):
        """:math:`\\log p(x_i)` per point, shape (n,)."""
        return np.asarray(bm.log_prob(self._params(), self._data(X)))

    def score(self, X, y=None):
        """Mean :math:`\\log p(x_i)`."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X):
        """The exact posterior over components, shape (n, k)."""
        return np.asarray(bm.posterior(self._params(), self._data(X)))

    def predict(self, X):
        """The most probable component of every point."""
        return np.argmax(self.predict_proba(X), axis=1)

    def sample(self, n_samples=1):
        """Draws ``(X, labels)`` by ancestral sampling."""
        check_is_fitted(self)
        x, z = bm.sample(
            _key(self.random_state), self._params(), _check_positive_int(n_samples, "n_samples")
        )
        return np.asarray(x), np.asarray(z)
