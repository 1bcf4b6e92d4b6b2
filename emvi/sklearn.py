r"""scikit-learn estimators over emvi's functional core: swap one import, keep the numbers.

:class:`GaussianMixture` takes scikit-learn's ``GaussianMixture`` parameters and exposes its
attributes (``weights_``, ``means_``, ``covariances_``, ``precisions_``,
``precisions_cholesky_``, ``converged_``, ``n_iter_``, ``lower_bound_``, ``n_features_in_``)
and methods (``fit``, ``fit_predict``, ``predict``, ``predict_proba``, ``score``,
``score_samples``, ``sample``, ``bic``, ``aic``), including ``warm_start`` and the partial
initialisation by ``weights_init`` / ``means_init`` / ``precisions_init``; the fit itself is
:func:`emvi.gmm.fit` (the one EM driver, restarts vmapped, on any JAX device).
:class:`BernoulliMixture` does the same for :mod:`emvi.bernoulli_mixture` (scikit-learn has
no such estimator; it follows the same conventions). :class:`BayesianGaussianMixture` is
scikit-learn's variational Bayes mixture over :mod:`emvi.bayesian_mixture` (the same
parameters, priors, attributes and warm start; ``"k-means++"`` initialisation included).
:class:`FactorAnalysis` and :class:`ProbabilisticPCA` are scikit-learn's ``FactorAnalysis``
face over :mod:`emvi.linear_gaussian` (diagonal and isotropic noise), fitted by EM:
``components_``, ``noise_variance_``, ``mean_``, ``loglike_``, ``n_iter_``, ``transform``
(the posterior mean), ``score``/``score_samples``, ``get_covariance``, ``get_precision``.

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

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    DensityMixin,
    TransformerMixin,
)
from sklearn.utils.validation import check_is_fitted, validate_data

from emvi import bayesian_mixture as vbgmm
from emvi import bernoulli_mixture as bm
from emvi import gmm
from emvi import kmeans as km
from emvi import linear_gaussian as lg
from emvi._checks import check_choice

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
        cov_shape = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[ct]
        # The user's arrays are checked first; the init runs only for what they leave out.
        weights = means = cov = None
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
        # Without precisions_init, scikit-learn re-estimates the covariances around the given
        # means from the initial responsibilities; here the init's own covariances are kept
        # (the means are what the user fixed), which is also a valid start.
        if weights is None or means is None or cov is None:
            base = gmm.init_params(
                key,
                jnp.asarray(x),
                k,
                covariance_type=ct,
                method=_SK_INITS[self.init_params],
                reg_covar=self.reg_covar,
            )
            weights, means, cov = (
                np.asarray(b, np.float64) if g is None else g
                for g, b in zip((weights, means, cov), base, strict=True)
            )
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


# ---------------------------------------------------------------------------------------
# Variational Bayes: BayesianGaussianMixture over emvi.bayesian_mixture
# ---------------------------------------------------------------------------------------

# The estimator's prior parameters are the fields of gmm.GMMPrior with sklearn's names.
_PRIOR_NAMES = {
    "prior.weight_concentration": "weight_concentration_prior",
    "prior.mean_precision": "mean_precision_prior",
    "prior.degrees_of_freedom": "degrees_of_freedom_prior",
    "prior.mean_prior": "mean_prior",
    "prior.covariance_prior": "covariance_prior",
}


@functools.partial(jax.jit, static_argnames=("covariance_type", "weight_prior_type"))
def _vb_logits(post, x, *, covariance_type, weight_prior_type):
    """The local step's logits (n, k) for new data, about a fixed centre (the mean of the
    posterior means): the prepared second moments stay centred, the numbers do not change."""
    c = jnp.mean(post.means, axis=0)
    data = gmm.prepare(x - c[None, :], covariance_type=covariance_type)
    post = post._replace(means=post.means - c[None, :])
    return vbgmm.expected_log_joint(
        post, data, covariance_type=covariance_type, weight_prior_type=weight_prior_type
    )


@functools.partial(jax.jit, static_argnames=("covariance_type", "weight_prior_type", "max_iter"))
def _vb_continue(post, x, prior, tol, reg_covar, *, covariance_type, weight_prior_type, max_iter):
    """CAVI from a posterior (a warm start: scikit-learn's loop without ``_initialize``)."""
    data, hyper, shift = vbgmm._centred_problem(x, prior, reg_covar, covariance_type)
    post = post._replace(means=post.means - shift[None, :])
    res = vbgmm.run_vb(
        post,
        data,
        hyper,
        max_iter=max_iter,
        tol=tol,
        covariance_type=covariance_type,
        weight_prior_type=weight_prior_type,
    )
    return vbgmm._shift(res, shift)


class BayesianGaussianMixture(DensityMixin, BaseEstimator):
    """scikit-learn's ``BayesianGaussianMixture``, fitted by :mod:`emvi.bayesian_mixture`.

    Parameters are scikit-learn's (``n_components``, ``covariance_type``, ``tol``,
    ``reg_covar``, ``max_iter``, ``n_init``, ``init_params``,
    ``weight_concentration_prior_type``, ``weight_concentration_prior``,
    ``mean_precision_prior``, ``mean_prior``, ``degrees_of_freedom_prior``,
    ``covariance_prior``, ``random_state``, ``warm_start``; ``verbose`` and
    ``verbose_interval`` are accepted and ignored), with scikit-learn's defaults (a prior
    left None is :func:`emvi.bayesian_mixture.default_prior`'s). The attributes are
    scikit-learn's: ``weights_``, ``means_``, ``covariances_``, ``precisions_``,
    ``precisions_cholesky_``, ``weight_concentration_`` (a pair of arrays for the Dirichlet
    process), ``mean_precision_``, ``degrees_of_freedom_``, the priors with a trailing
    underscore, ``lower_bound_`` (scikit-learn's bound, summed over points), ``lower_bounds_``,
    ``n_iter_``, ``converged_``, ``n_features_in_``. ``score_samples`` is, as in scikit-learn,
    the logsumexp over components of the local step's logits
    :math:`E_q[\\log \\pi_j] + E_q[\\log \\mathcal N(x \\mid \\mu_j, \\Lambda_j^{-1})]`.
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
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=None,
        mean_precision_prior=None,
        mean_prior=None,
        degrees_of_freedom_prior=None,
        covariance_prior=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _prior(self, x: np.ndarray, k: int) -> gmm.GMMPrior:
        """The prior: scikit-learn's defaults for every field left None."""
        ct = self.covariance_type
        base = vbgmm.default_prior(x, covariance_type=ct, num_components=k)
        given = (
            self.weight_concentration_prior,
            self.mean_prior,
            self.mean_precision_prior,
            self.covariance_prior,
            self.degrees_of_freedom_prior,
        )
        fields = [
            b if g is None else np.asarray(g, np.float64) for b, g in zip(base, given, strict=True)
        ]
        try:
            return vbgmm._check_vb_prior(gmm.GMMPrior(*fields), x.shape[1], ct, x.dtype)
        except ValueError as err:  # name the estimator's parameter, not the GMMPrior field
            msg = str(err)
            for field, name in _PRIOR_NAMES.items():
                msg = msg.replace(field, name)
            raise ValueError(msg) from None

    def _initial_resp(self, key, x: jax.Array, k: int) -> jax.Array:
        """Initial responsibilities (n, k) by ``init_params``, as scikit-learn draws them."""
        if self.init_params == "k-means++":
            n = x.shape[0]
            idx = km.kmeans_plusplus_indices(key, x, k, jnp.ones(n, x.dtype))
            return jnp.zeros((n, k), x.dtype).at[idx, jnp.arange(k)].set(1.0)
        return vbgmm._initial_resp(key, x, k=k, init=self.init_params)

    def fit(self, X, y=None):
        """Fits the mixture by CAVI; returns ``self``."""
        self.fit_predict(X, y)
        return self

    def fit_predict(self, X, y=None):
        """Fits, then returns the most probable component of every point (n,)."""
        dtype = _dtype()
        x = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        x = np.asarray(x, dtype)
        k = _check_positive_int(self.n_components, "n_components")
        ct, wpt = self.covariance_type, self.weight_concentration_prior_type
        check_choice(ct, name="covariance_type", choices=vbgmm.COVARIANCE_TYPES)
        check_choice(wpt, name="weight_concentration_prior_type", choices=vbgmm.WEIGHT_PRIOR_TYPES)
        check_choice(self.init_params, name="init_params", choices=(*vbgmm.INITS, "k-means++"))
        max_iter = _check_positive_int(self.max_iter, "max_iter")
        n_init = _check_positive_int(self.n_init, "n_init")
        tol = jnp.asarray(_check_nonnegative(self.tol, "tol"), dtype)
        reg = jnp.asarray(_check_nonnegative(self.reg_covar, "reg_covar"), dtype)
        if x.shape[0] < k:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = {k}, "
                f"n_samples = {x.shape[0]}"
            )
        prior = self._prior(x, k)
        xj = jnp.asarray(x)
        kw = dict(covariance_type=ct, weight_prior_type=wpt, max_iter=max_iter)
        if self.warm_start and hasattr(self, "converged_"):
            if self.means_.shape != (k, x.shape[1]):
                raise ValueError(
                    f"warm_start needs the previous fit's shape (n_components, n_features) = "
                    f"{self.means_.shape}; got ({k}, {x.shape[1]})."
                )
            post = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), self._posterior())
            fits = [_vb_continue(post, xj, prior, tol, reg, **kw)]
        else:
            keys = jax.random.split(_key(self.random_state), n_init)
            fits = [
                vbgmm.fit_from_resp(
                    self._initial_resp(key, xj, k), xj, prior, tol=tol, reg_covar=reg, **kw
                )
                for key in keys
            ]
        # scikit-learn keeps the first restart with the largest bound.
        best = fits[int(np.argmax([float(f.lower_bound) for f in fits]))]
        self._set_attributes(best, prior)
        return self.predict(x)

    def _set_attributes(self, res: vbgmm.VBGMMFit, prior: gmm.GMMPrior) -> None:
        ct, wpt = self.covariance_type, self.weight_concentration_prior_type
        post = jax.tree_util.tree_map(np.asarray, res.posterior)
        wc = post.weight_concentration
        self.weight_concentration_ = (wc[0], wc[1]) if wpt == "dirichlet_process" else wc
        self.mean_precision_ = post.mean_precision
        self.means_ = post.means
        nu = post.degrees_of_freedom
        self.degrees_of_freedom_ = nu[()] if ct == "tied" else nu
        cov = post.covariances
        self.covariances_ = cov
        cov64 = cov.astype(np.float64)
        self.precisions_cholesky_ = _precision_cholesky(cov64, ct).astype(cov.dtype)
        self.precisions_ = _precisions(cov64, ct).astype(cov.dtype)
        self.weights_ = np.asarray(vbgmm.mixture_weights(res.posterior, weight_prior_type=wpt))
        alpha, m0, beta0, psi0, nu0 = (np.asarray(a) for a in prior)
        self.weight_concentration_prior_ = float(alpha)
        self.mean_precision_prior_ = float(beta0)
        self.mean_prior_ = m0
        self.degrees_of_freedom_prior_ = float(nu0)
        self.covariance_prior_ = float(psi0) if ct == "spherical" else psi0
        self.n_iter_ = int(res.num_iter)
        self.converged_ = bool(res.converged)
        self.lower_bound_ = float(res.lower_bound)
        self.lower_bounds_ = np.asarray(res.history)[: self.n_iter_].tolist()

    def _posterior(self) -> vbgmm.VBGMMPosterior:
        check_is_fitted(self)
        wc = self.weight_concentration_
        wc = np.stack(wc) if isinstance(wc, tuple) else wc
        return vbgmm.VBGMMPosterior(
            *(
                jnp.asarray(a)
                for a in (
                    wc,
                    self.mean_precision_,
                    self.means_,
                    self.degrees_of_freedom_,
                    self.covariances_,
                )
            )
        )

    def _logits(self, X) -> jax.Array:
        check_is_fitted(self)
        x = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        x = jnp.asarray(np.asarray(x, self.means_.dtype))
        return _vb_logits(
            self._posterior(),
            x,
            covariance_type=self.covariance_type,
            weight_prior_type=self.weight_concentration_prior_type,
        )

    def score_samples(self, X):
        """scikit-learn's ``score_samples``: logsumexp of the local step's logits, (n,)."""
        return np.asarray(jax.nn.logsumexp(self._logits(X), axis=1))

    def score(self, X, y=None):
        """Mean of :meth:`score_samples`."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X):
        """The local step's responsibilities (the variational q(z)), shape (n, k)."""
        return np.asarray(jax.nn.softmax(self._logits(X), axis=1))

    def predict(self, X):
        """The most responsible component of every point, shape (n,)."""
        return np.asarray(jnp.argmax(self._logits(X), axis=1))

    def sample(self, n_samples=1):
        """Draws ``(X, labels)`` from the plug-in mixture (``weights_``, ``means_``,
        ``covariances_``), labels sorted, as scikit-learn does."""
        check_is_fitted(self)
        n_samples = _check_positive_int(n_samples, "n_samples")
        params = gmm.GMMParams(
            *(jnp.asarray(a) for a in (self.weights_, self.means_, self.covariances_))
        )
        x, z = gmm.sample(
            _key(self.random_state), params, n_samples, covariance_type=self.covariance_type
        )
        order = np.argsort(np.asarray(z), kind="stable")
        return np.asarray(x)[order], np.asarray(z)[order]


# ---------------------------------------------------------------------------------------
# Linear-Gaussian models: FactorAnalysis and ProbabilisticPCA over emvi.linear_gaussian
# ---------------------------------------------------------------------------------------


class _LinearGaussian(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """The shared face of :class:`FactorAnalysis` and :class:`ProbabilisticPCA`."""

    _noise = "diagonal"

    def _latent_dim(self, d: int) -> int:
        l_ = d - 1 if self.n_components is None else self.n_components
        if isinstance(l_, bool) or not isinstance(l_, numbers.Integral) or not 1 <= l_ < d:
            raise ValueError(
                f"n_components must be None or an integer in [1, n_features); got "
                f"n_components = {self.n_components!r}, n_features = {d}."
            )
        return int(l_)

    def _start(self, x: np.ndarray, l_: int):
        check_choice(self.init_params, name="init_params", choices=lg.INITS)
        return self.init_params

    def fit(self, X, y=None):
        """Fits the model by EM; returns ``self``."""
        dtype = _dtype()
        x = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        x = np.asarray(x, dtype)
        n, d = x.shape
        l_ = self._latent_dim(d)
        max_iter = _check_positive_int(self.max_iter, "max_iter")
        # scikit-learn's tol is on the summed log-likelihood, emvi's on the mean.
        tol = _check_nonnegative(self.tol, "tol") / n
        res = lg.fit(
            _key(self.random_state),
            x,
            l_,
            noise=self._noise,
            init=self._start(x, l_),
            max_iter=max_iter,
            tol=tol,
            noise_floor=_check_nonnegative(self.noise_floor, "noise_floor"),
        )
        p = res.params
        self.components_ = np.asarray(p.loadings).T
        self.mean_ = np.asarray(p.mean)
        noise = np.asarray(p.noise_variance)
        self.noise_variance_ = float(noise) if self._noise == "isotropic" else noise
        self.n_iter_ = int(res.num_iter)
        # The summed log-likelihood after each M-step (scikit-learn's loglike_): the
        # driver's history holds it at the start of every later iteration.
        after = np.append(np.asarray(res.history)[1 : self.n_iter_], float(res.log_likelihood))
        self.loglike_ = (n * after.astype(np.float64)).tolist()
        return self

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def _params(self) -> lg.LinearGaussianParams:
        check_is_fitted(self)
        return lg.LinearGaussianParams(
            jnp.asarray(self.components_.T),
            jnp.asarray(self.mean_),
            jnp.asarray(self.noise_variance_, self.components_.dtype),
        )

    def _data(self, X) -> jax.Array:
        check_is_fitted(self)
        x = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return jnp.asarray(np.asarray(x, self.components_.dtype))

    def transform(self, X):
        """The posterior mean :math:`E[z \\mid x_i] = K^{-1} W^\\top \\Psi^{-1}(x_i - \\mu)`,
        shape (n, n_components)."""
        return np.asarray(lg.posterior(self._params(), self._data(X)).mean)

    def score_samples(self, X):
        """:math:`\\log \\mathcal N(x_i \\mid \\mu, W W^\\top + \\Psi)` per point, (n,)."""
        return np.asarray(lg.log_prob(self._params(), self._data(X)))

    def score(self, X, y=None):
        """Mean log-likelihood of the points."""
        return float(np.mean(self.score_samples(X)))

    def get_covariance(self):
        """The model covariance :math:`W W^\\top + \\Psi`, (d, d)."""
        check_is_fitted(self)
        w = self.components_.T.astype(np.float64)
        psi = np.broadcast_to(np.asarray(self.noise_variance_, np.float64), self.mean_.shape)
        return (w @ w.T + np.diag(psi)).astype(self.components_.dtype)

    def get_precision(self):
        """The inverse of :meth:`get_covariance` by the Woodbury identity:
        :math:`\\Psi^{-1} - \\Psi^{-1} W K^{-1} W^\\top \\Psi^{-1}`, :math:`K = I + W^\\top
        \\Psi^{-1} W` (an (l, l) Cholesky solve; no d x d inverse)."""
        check_is_fitted(self)
        w = self.components_.T.astype(np.float64)
        psi = np.broadcast_to(np.asarray(self.noise_variance_, np.float64), self.mean_.shape)
        u = w / psi[:, None]
        k_mat = np.eye(w.shape[1]) + w.T @ u
        chol = np.linalg.cholesky(k_mat)
        v = np.linalg.solve(chol, u.T)  # L^{-1} W^T Psi^{-1}
        return (np.diag(1.0 / psi) - v.T @ v).astype(self.components_.dtype)


class FactorAnalysis(_LinearGaussian):
    """scikit-learn's ``FactorAnalysis``, fitted by EM (:func:`emvi.linear_gaussian.fit`
    with ``noise="diagonal"``).

    Parameters: ``n_components`` (None: n_features - 1, the most the model takes),
    ``tol`` (on the summed log-likelihood, as scikit-learn's), ``max_iter``,
    ``noise_variance_init`` (the starting :math:`\\psi`, (n_features,)), ``random_state``,
    and emvi's ``init_params`` (``"pca"``: principal components, deterministic; ``"random"``)
    and ``noise_floor`` (each :math:`\\psi_j` kept >= that times the feature's variance).
    scikit-learn's ``copy``, ``svd_method``, ``iterated_power`` and ``rotation`` are not
    taken (EM needs no SVD). Attributes: ``components_`` (n_components, n_features),
    ``noise_variance_`` (n_features,), ``mean_``, ``loglike_``, ``n_iter_``,
    ``n_features_in_``. ``transform`` is the posterior mean.
    """

    _noise = "diagonal"

    def __init__(
        self,
        n_components=None,
        *,
        tol=1e-2,
        max_iter=1000,
        noise_variance_init=None,
        init_params="pca",
        noise_floor=lg.DEFAULT_NOISE_FLOOR,
        random_state=0,
    ):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.noise_variance_init = noise_variance_init
        self.init_params = init_params
        self.noise_floor = noise_floor
        self.random_state = random_state

    def _start(self, x: np.ndarray, l_: int):
        method = super()._start(x, l_)
        if self.noise_variance_init is None:
            return method
        psi = np.asarray(self.noise_variance_init, np.float64)
        if psi.shape != (x.shape[1],) or not np.all(np.isfinite(psi)) or np.any(psi <= 0):
            raise ValueError(
                f"noise_variance_init must be positive with shape ({x.shape[1]},); got "
                f"{self.noise_variance_init!r}."
            )
        p = lg.init_params(
            _key(self.random_state), jnp.asarray(x), l_, noise="diagonal", method=method
        )
        return p._replace(noise_variance=jnp.asarray(psi, x.dtype))


class ProbabilisticPCA(_LinearGaussian):
    """Probabilistic PCA (Tipping & Bishop 1999) with scikit-learn's ``FactorAnalysis`` face,
    fitted by EM (:func:`emvi.linear_gaussian.fit` with ``noise="isotropic"``).

    The same parameters and attributes as :class:`FactorAnalysis` except
    ``noise_variance_init``; ``noise_variance_`` is the one :math:`\\sigma^2` (a float, as
    scikit-learn's ``PCA.noise_variance_``), and ``components_`` are the loadings
    :math:`W^\\top` (orthogonal rows scaled by :math:`(\\lambda_j - \\sigma^2)^{1/2}`, not
    ``PCA``'s unit rows). At the maximum, ``score`` equals ``PCA(n_components).score`` up to
    PCA's n - 1 normalisation of the covariance. ``init_params="pca"`` (the default) starts
    at that maximum, so EM only confirms it.
    """

    _noise = "isotropic"

    def __init__(
        self,
        n_components=None,
        *,
        tol=1e-2,
        max_iter=1000,
        init_params="pca",
        noise_floor=lg.DEFAULT_NOISE_FLOOR,
        random_state=0,
    ):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.init_params = init_params
        self.noise_floor = noise_floor
        self.random_state = random_state
