r"""Amortized objectives: VAEs as ELBO maximisation with a Flax encoder as the E-step.

Two models share one interface (a frozen dataclass holding an encoder and a decoder from
``emvi.nn``, with ``init(key) -> VAEParams``):

* ``GaussianVAE``: z in R^l with prior N(0, I) and q(z | x) = N(mean(x), diag(scale(x)^2)).
  Trained on the reparameterised Monte Carlo ELBO (``elbo_loss``) or the importance-weighted
  bound IWAE_k (``iwae_loss``); its log-likelihood is estimated by importance sampling
  (``log_likelihood``, IWAE with k = 5000 by default).
* ``CategoricalVAE``: z in {1..m} with a uniform prior. The ELBO is computed *exactly* by
  enumerating the m classes,

  .. math::
      \mathrm{ELBO}(x) = \sum_{k=1}^m q(k \mid x) \big[\log p(x \mid k) - \log m
                         - \log q(k \mid x)\big],

  with no sampling and no relaxation, and so is the log-likelihood,
  :math:`\log p(x) = \mathrm{logsumexp}_k [\log p(x \mid k)] - \log m`
  (``categorical_log_likelihood``). The gap between the two is KL(q(.|x) || p(.|x)).

Loss functions have the ``emvi.train.fit`` signature ``loss(params, key, batch, step) ->
(loss, aux)`` once the static model is bound with ``functools.partial`` (``loss_fn`` does
the binding); they do no validation so they can be jitted. Beside the ELBO and IWAE, the
objectives used against posterior collapse (KL annealing, free bits, InfoVAE/MMD) are one
:class:`Objective` away (``objective_loss``), with the schedule a function of the step.
The thin public wrappers (``fit_vae``, ``encode``, ``reconstruct``,
``generate``, ``log_likelihood``, ``categorical_log_likelihood``) validate their inputs
eagerly and raise ``ValueError``.

Shape letters: ``n`` data points, ``d`` data dimension, ``l`` latent dimension, ``m``
classes, ``s`` Monte Carlo samples.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = gaussian_vae(data_dim=64, latent_dim=2, hidden=(32,))
  >>> params = model.init(jax.random.key(0))
  >>> x = jnp.zeros((8, 64), jnp.float32)
  >>> loss, aux = elbo_loss(params, jax.random.key(1), x, model=model)
  >>> sorted(aux)
  ['elbo', 'kl', 'recon']
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple

import distrax
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from emvi import _checks, elbo, mmd
from emvi import nn as enn

Decoder = Any  # a flax Module with data_dim, log_prob(z, x) and sample(key, z); see emvi.nn


class VAEParams(NamedTuple):
    """Parameters of a VAE: the encoder's (phi) and the decoder's (theta) Flax variables."""

    encoder: Any
    decoder: Any


def _check_decoder(decoder) -> None:
    if not (
        isinstance(decoder, flax.linen.Module)
        and callable(getattr(decoder, "log_prob", None))
        and hasattr(decoder, "data_dim")
    ):
        raise ValueError(
            "decoder must be a flax Module with a data_dim attribute and a log_prob(z, x) "
            f"method (e.g. emvi.nn.BernoulliDecoder, GaussianDecoder, MADEDecoder); got "
            f"{decoder!r}."
        )


class _EncoderDecoder:
    """What both VAEs share: the decoder's data size and likelihood, and ``init``."""

    decoder: Decoder

    @property
    def data_dim(self) -> int:
        return int(self.decoder.data_dim)

    @property
    def likelihood(self) -> str:
        """The decoder's ``likelihood`` ("bernoulli", "gaussian"; "unknown" if it has none)."""
        return str(getattr(self.decoder, "likelihood", "unknown"))

    def init(self, key: Array) -> VAEParams:
        """Initialises encoder and decoder parameters (float32); the decoder is initialised
        through its ``log_prob(z, x)`` on a ``latent_dim``-vector (the one-hot code, for the
        categorical VAE), so decoders that read x too (MADE) are initialised alike."""
        return _init_params(key, self)


def _init_params(key: Array, model) -> VAEParams:
    k_enc, k_dec = jax.random.split(key)
    x = jnp.zeros((1, model.data_dim), jnp.float32)
    z = jnp.zeros((1, model.latent_dim), jnp.float32)
    return VAEParams(
        model.encoder.init(k_enc, x), model.decoder.init(k_dec, z, x, method="log_prob")
    )


@dataclasses.dataclass(frozen=True)
class GaussianVAE(_EncoderDecoder):
    """A VAE with Gaussian latents z in R^l and a standard normal prior.

    Attributes:
      encoder: an ``emvi.nn.GaussianEncoder`` (the amortized E-step).
      decoder: the model p(x|z): any decoder of :mod:`emvi.nn` (``BernoulliDecoder``,
        ``GaussianDecoder``, ``MADEDecoder``) or a flax Module with ``data_dim`` and
        ``log_prob(z, x)``.
    """

    encoder: enn.GaussianEncoder
    decoder: Decoder

    def __post_init__(self):
        if not isinstance(self.encoder, enn.GaussianEncoder):
            raise ValueError(f"encoder must be an emvi.nn.GaussianEncoder; got {self.encoder!r}.")
        _check_decoder(self.decoder)
        _checks.check_positive_int(self.encoder.latent_dim, name="latent_dim")
        _checks.check_positive_int(self.decoder.data_dim, name="data_dim")

    @property
    def latent_dim(self) -> int:
        return int(self.encoder.latent_dim)


@dataclasses.dataclass(frozen=True)
class CategoricalVAE(_EncoderDecoder):
    """A VAE with a categorical latent over m classes and a uniform prior 1/m.

    The decoder reads the one-hot code of a class, so p(x | k) = decoder(e_k): with a
    Bernoulli decoder this is a mixture of m product-Bernoulli distributions whose
    component parameters are produced by a network, and the encoder amortizes the
    E-step of that mixture.

    Attributes:
      encoder: an ``emvi.nn.CategoricalEncoder`` (logits of q(k | x)).
      decoder: a decoder (as for ``GaussianVAE``) over one-hot codes.
    """

    encoder: enn.CategoricalEncoder
    decoder: Decoder

    def __post_init__(self):
        if not isinstance(self.encoder, enn.CategoricalEncoder):
            raise ValueError(
                f"encoder must be an emvi.nn.CategoricalEncoder; got {self.encoder!r}."
            )
        _check_decoder(self.decoder)
        _checks.check_positive_int(self.encoder.num_classes, name="num_classes")
        _checks.check_positive_int(self.decoder.data_dim, name="data_dim")

    @property
    def num_classes(self) -> int:
        return int(self.encoder.num_classes)

    @property
    def latent_dim(self) -> int:
        return self.num_classes


Model = GaussianVAE | CategoricalVAE


def _make_decoder(data_dim, hidden, activation, likelihood, variance):
    _checks.check_choice(likelihood, name="likelihood", choices=("bernoulli", "gaussian"))
    if likelihood == "bernoulli":
        return enn.BernoulliDecoder(tuple(hidden), data_dim, activation)
    return enn.GaussianDecoder(tuple(hidden), data_dim, variance, activation)


def gaussian_vae(
    data_dim: int,
    latent_dim: int,
    hidden: tuple[int, ...] = (256, 256),
    *,
    decoder_hidden: tuple[int, ...] | None = None,
    likelihood: str = "bernoulli",
    variance: str = "per_dim",
    activation: str = "relu",
) -> GaussianVAE:
    """Builds a ``GaussianVAE`` from sizes (the decoder mirrors the encoder by default).

    Raises:
      ValueError: if a size is < 1 or a name is unknown.
    """
    latent_dim = _checks.check_positive_int(latent_dim, name="latent_dim")
    data_dim = _checks.check_positive_int(data_dim, name="data_dim")
    dec_hidden = tuple(reversed(hidden)) if decoder_hidden is None else tuple(decoder_hidden)
    enc = enn.GaussianEncoder(tuple(hidden), latent_dim, activation)
    return GaussianVAE(enc, _make_decoder(data_dim, dec_hidden, activation, likelihood, variance))


def categorical_vae(
    data_dim: int,
    num_classes: int,
    hidden: tuple[int, ...] = (256, 256),
    *,
    decoder_hidden: tuple[int, ...] | None = None,
    likelihood: str = "bernoulli",
    variance: str = "per_dim",
    activation: str = "relu",
) -> CategoricalVAE:
    """Builds a ``CategoricalVAE`` from sizes (the decoder mirrors the encoder by default)."""
    num_classes = _checks.check_positive_int(num_classes, name="num_classes")
    data_dim = _checks.check_positive_int(data_dim, name="data_dim")
    dec_hidden = tuple(reversed(hidden)) if decoder_hidden is None else tuple(decoder_hidden)
    enc = enn.CategoricalEncoder(tuple(hidden), num_classes, activation)
    return CategoricalVAE(
        enc, _make_decoder(data_dim, dec_hidden, activation, likelihood, variance)
    )


# ---------------------------------------------------------------------------------------
# Pure pieces (jit-friendly, no validation).


def _posterior_params(params: VAEParams, x: Array, model: GaussianVAE) -> tuple[Array, Array]:
    return model.encoder.apply(params.encoder, x)


def _decoder_log_prob(params: VAEParams, z: Array, x: Array, model: Model) -> Array:
    """log p(x | z) for z of shape (s, n, l) and x of shape (n, d): returns (s, n)."""
    return model.decoder.apply(params.decoder, z, x[None], method="log_prob")


def gaussian_elbo_terms(
    params: VAEParams,
    key: Array,
    x: Float[Array, "n d"],
    *,
    model: GaussianVAE,
    num_samples: int = 1,
    analytic_kl: bool = True,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    r"""Per-example reconstruction term and KL term of the Gaussian-latent ELBO.

    .. math::
        \mathrm{recon}_i = \frac1S \sum_s \log p(x_i \mid z_{is}),\quad
        z_{is} = \mu(x_i) + \sigma(x_i) \odot \varepsilon_{is},

    and :math:`\mathrm{kl}_i = \mathrm{KL}(q(z|x_i) \,\|\, N(0, I))` in closed form, or its
    one-sample-per-draw Monte Carlo estimate :math:`\frac1S\sum_s \log q(z_{is}) - \log
    p(z_{is})` when ``analytic_kl`` is False. ELBO = recon - kl. This is
    :func:`emvi.elbo.gaussian_elbo_terms` with the encoder's q and the decoder's likelihood.
    """
    mean, scale = _posterior_params(params, x, model)
    return elbo.gaussian_elbo_terms(
        key,
        lambda z: _decoder_log_prob(params, z, x, model),
        mean,
        scale,
        num_samples=num_samples,
        analytic_kl=analytic_kl,
    )


def elbo_loss(
    params: VAEParams,
    key: Array,
    x: Float[Array, "n d"],
    step: Int[Array, ""] | int = 0,
    *,
    model: GaussianVAE,
    num_samples: int = 1,
    beta: float | Array = 1.0,
    analytic_kl: bool = True,
) -> tuple[Array, dict]:
    r"""Negative mean per-example (beta-)ELBO of a ``GaussianVAE`` (``step`` is unused).

    .. math:: \mathcal{L} = -\frac1n \sum_i \big(\mathrm{recon}_i - \beta\,\mathrm{kl}_i\big).

    Returns:
      ``(loss, aux)`` with ``aux`` holding the mean ``elbo`` (always with beta = 1),
      ``recon`` and ``kl``, all in nats per example.
    """
    del step
    recon, kl = gaussian_elbo_terms(
        params, key, x, model=model, num_samples=num_samples, analytic_kl=analytic_kl
    )
    loss = -jnp.mean(recon - beta * kl)
    return loss, {"elbo": jnp.mean(recon - kl), "recon": jnp.mean(recon), "kl": jnp.mean(kl)}


def _gaussian_log_joint_fn(params: VAEParams, model: GaussianVAE):
    def log_joint(x_batch, z):
        return _decoder_log_prob(params, z, x_batch, model) + elbo.std_normal_log_prob(z)

    return log_joint


def _gaussian_posterior_fn(params: VAEParams, model: GaussianVAE):
    def posterior(x_batch):
        mean, scale = _posterior_params(params, x_batch, model)
        return distrax.MultivariateNormalDiag(mean, scale)

    return posterior


def iwae_bound(
    params: VAEParams,
    key: Array,
    x: Float[Array, "n d"],
    *,
    model: GaussianVAE,
    num_samples: int,
    chunk_size: int | None = None,
) -> Float[Array, " n"]:
    r"""Per-example importance-weighted bound with k = ``num_samples`` draws from q(z|x).

    .. math:: \mathcal{L}_k(x) = E\Big[\log \frac1k \sum_{j=1}^k
              \frac{p(x, z_j)}{q(z_j \mid x)}\Big] \le \log p(x),

    :func:`emvi.elbo.iwae_bound` (the one IWAE estimator) with the encoder's q and the
    decoder's joint; ``chunk_size`` bounds the samples alive at once.
    """
    log_joint = _gaussian_log_joint_fn(params, model)
    return elbo.iwae_bound(
        key,
        _gaussian_posterior_fn(params, model)(x),
        lambda z: log_joint(x, z),
        num_samples=num_samples,
        chunk_size=chunk_size,
    )


def iwae_loss(
    params: VAEParams,
    key: Array,
    x: Float[Array, "n d"],
    step: Int[Array, ""] | int = 0,
    *,
    model: GaussianVAE,
    num_samples: int = 5,
) -> tuple[Array, dict]:
    """Negative mean IWAE_k bound (k = ``num_samples``), for IWAE training (``step`` unused).

    Returns:
      ``(loss, aux)`` with ``aux["iwae"]`` the mean bound in nats per example.
    """
    del step
    bound = iwae_bound(params, key, x, model=model, num_samples=num_samples)
    return -jnp.mean(bound), {"iwae": jnp.mean(bound)}


# ---------------------------------------------------------------------------------------
# Objectives against posterior collapse (Gaussian latents), as functions of the step.

OBJECTIVES = ("elbo", "kl_anneal", "free_bits", "infovae")


class Objective(NamedTuple):
    r"""A training objective of a ``GaussianVAE`` other than the plain ELBO's weighting.

    With :math:`\mathrm{recon}_i`, :math:`\mathrm{kl}_i = \sum_j \mathrm{kl}_{ij}` the terms of
    the one-sample ELBO and t the global step, the loss per batch is

    * ``"elbo"``: :math:`-\overline{\mathrm{recon}} + \overline{\mathrm{kl}}`;
    * ``"kl_anneal"``: :math:`-\overline{\mathrm{recon}} + w_t\, \overline{\mathrm{kl}}`,
      :math:`w_t = \min(1, t / T)` with T = ``anneal_steps`` (Bowman et al. 2016);
    * ``"free_bits"``: :math:`-\overline{\mathrm{recon}} + \sum_j \max(\lambda,
      \overline{\mathrm{kl}}_{\cdot j})`, the KL of each dimension averaged over the batch and
      floored at :math:`\lambda` = ``free_bits`` nats (Kingma et al. 2016);
    * ``"infovae"``: :func:`emvi.mmd.info_vae_objective` with (alpha, lambda) =
      (``info_alpha``, ``info_lambda``): the MMD (``mmd_kernel``; IMQ with scale 2 l as in
      WAE, or RBF with bandwidth 1) between the batch's z ~ q(z|x) and as many prior
      draws (Zhao, Song & Ermon 2017).

    Overlines are batch means.
    """

    kind: str = "elbo"
    anneal_steps: int = 1
    free_bits: float = 0.0
    info_alpha: float = 1.0
    info_lambda: float = 1.0
    mmd_kernel: str = "imq"


def check_objective(objective: Objective) -> Objective:
    """Validates an :class:`Objective` eagerly.

    Raises:
      ValueError: on an unknown kind or kernel, ``anneal_steps < 1``, ``free_bits < 0`` or
        InfoVAE weights that make a KL or MMD weight negative.
    """
    _checks.check_choice(objective.kind, name="kind", choices=OBJECTIVES)
    _checks.check_positive_int(objective.anneal_steps, name="anneal_steps")
    _checks.check_nonnegative(objective.free_bits, name="free_bits")
    _checks.check_choice(objective.mmd_kernel, name="mmd_kernel", choices=("rbf", "imq"))
    mmd.info_vae_weights(alpha=objective.info_alpha, lam=objective.info_lambda)
    return objective


def objective_loss(
    params: VAEParams,
    key: Array,
    x: Float[Array, "n d"],
    step: Int[Array, ""] | int = 0,
    *,
    model: GaussianVAE,
    objective: Objective,
) -> tuple[Array, dict]:
    """The loss of ``objective`` at global step ``step`` (see :class:`Objective`).

    ``key`` is split in two, the first half for the one draw z ~ q(z|x) per example
    (:func:`emvi.elbo.reparameterize`), the second for InfoVAE's prior draws, so every kind
    sees the same z for the same key (common random numbers across objectives). The KL is
    taken per dimension (free bits needs it so) and summed.

    Returns:
      ``(loss, aux)``; ``aux`` holds the batch means ``elbo``, ``recon`` and ``kl`` (with KL
      weight 1, whatever the objective), plus ``kl_weight`` (kl_anneal) or ``mmd``
      (infovae).
    """
    k_z, k_prior = jax.random.split(key)
    mean, scale = _posterior_params(params, x, model)
    z, _ = elbo.reparameterize(k_z, mean, scale, None)  # one draw per example, (n, l)
    recon = model.decoder.apply(params.decoder, z, x, method="log_prob")
    kl_dims = elbo.standard_normal_kl(mean[..., None], scale[..., None])  # (n, l)
    kl = jnp.sum(kl_dims, axis=-1)
    aux = {"elbo": jnp.mean(recon - kl), "recon": jnp.mean(recon), "kl": jnp.mean(kl)}
    kind = objective.kind
    if kind == "elbo":
        loss = -jnp.mean(recon - kl)
    elif kind == "kl_anneal":
        t = jnp.asarray(step).astype(recon.dtype)
        weight = jnp.minimum(1.0, t / objective.anneal_steps)
        loss = -jnp.mean(recon) + weight * jnp.mean(kl)
        aux["kl_weight"] = weight
    elif kind == "free_bits":
        floored = jnp.maximum(objective.free_bits, jnp.mean(kl_dims, axis=0))
        loss = -jnp.mean(recon) + jnp.sum(floored)
    elif kind == "infovae":
        prior = jax.random.normal(k_prior, z.shape, z.dtype)
        bandwidth = 2.0 * z.shape[-1] if objective.mmd_kernel == "imq" else 1.0
        d = mmd.mmd_unbiased(z, prior, kernel=objective.mmd_kernel, bandwidth=bandwidth)
        loss = mmd.info_vae_objective(
            recon, kl, d, alpha=objective.info_alpha, lam=objective.info_lambda
        )
        aux["mmd"] = d
    else:
        raise ValueError(f"objective.kind must be one of {OBJECTIVES}; got {kind!r}.")
    return loss, aux


def _one_hot_codes(model: CategoricalVAE, dtype) -> Array:
    return jnp.eye(model.num_classes, dtype=dtype)


def categorical_log_joint(
    params: VAEParams, x: Float[Array, "n d"], *, model: CategoricalVAE
) -> Float[Array, "n m"]:
    """log p(x_i, z = k) = log p(x_i | k) - log m for every example and class."""
    codes = _one_hot_codes(model, x.dtype)
    log_lik = model.decoder.apply(params.decoder, codes[None], x[:, None], method="log_prob")
    return log_lik - math.log(model.num_classes)


def categorical_posterior_logits(
    params: VAEParams, x: Float[Array, "n d"], *, model: CategoricalVAE
) -> Float[Array, "n m"]:
    """Logits of the encoder's q(k | x)."""
    return model.encoder.apply(params.encoder, x)


def categorical_elbo_terms(
    params: VAEParams, x: Float[Array, "n d"], *, model: CategoricalVAE
) -> dict:
    """Exact per-example ELBO, E_q log p(x | k) and KL(q || uniform), by enumeration."""
    log_joint = categorical_log_joint(params, x, model=model)
    probs = jax.nn.softmax(categorical_posterior_logits(params, x, model=model), axis=-1)
    bound = elbo.discrete_elbo(log_joint, probs)
    log_prior = jnp.full_like(probs, -math.log(model.num_classes))
    kl = elbo.categorical_kl(probs, log_prior)
    return {"elbo": bound, "recon": bound + kl, "kl": kl, "probs": probs}


def categorical_elbo_loss(
    params: VAEParams,
    key: Array | None,
    x: Float[Array, "n d"],
    step: Int[Array, ""] | int = 0,
    *,
    model: CategoricalVAE,
    beta: float | Array = 1.0,
) -> tuple[Array, dict]:
    r"""Negative mean exact ELBO of a ``CategoricalVAE`` (``key`` and ``step`` are unused).

    .. math:: \mathcal{L} = -\frac1n \sum_i \Big(\sum_k q(k|x_i)\log p(x_i|k)
              - \beta\,\mathrm{KL}(q(\cdot|x_i) \,\|\, \mathrm{U}\{1..m\})\Big).
    """
    del key, step
    terms = categorical_elbo_terms(params, x, model=model)
    loss = -jnp.mean(terms["recon"] - beta * terms["kl"])
    return loss, {k: jnp.mean(v) for k, v in terms.items() if k != "probs"}


def categorical_exact_log_likelihood(
    params: VAEParams, x: Float[Array, "n d"], *, model: CategoricalVAE
) -> Float[Array, " n"]:
    r"""Exact :math:`\log p(x_i) = \mathrm{logsumexp}_k \log p(x_i \mid k) - \log m`."""
    return jax.nn.logsumexp(categorical_log_joint(params, x, model=model), axis=-1)


def loss_fn(
    model: Model,
    *,
    objective: str | Objective = "elbo",
    num_samples: int = 1,
    beta: float = 1.0,
    analytic_kl: bool = True,
):
    """Binds a model and objective into ``loss(params, key, batch, step) -> (loss, aux)``.

    Args:
      model: a ``GaussianVAE`` or ``CategoricalVAE``.
      objective: ``"elbo"`` (Monte Carlo beta-ELBO with ``num_samples`` draws for Gaussian
        latents, the exact enumerated ELBO for categorical ones), ``"iwae"`` (Gaussian
        latents only, k = num_samples), or an :class:`Objective` (KL annealing, free bits,
        InfoVAE; Gaussian latents only).

    Raises:
      ValueError: on an unknown objective or one the model cannot take.
    """
    num_samples = _checks.check_positive_int(num_samples, name="num_samples")
    beta = _checks.check_nonnegative(beta, name="beta")
    if isinstance(objective, Objective):
        if not isinstance(model, GaussianVAE):
            raise ValueError("an Objective needs a GaussianVAE; a CategoricalVAE takes 'elbo'.")
        return functools.partial(objective_loss, model=model, objective=check_objective(objective))
    _checks.check_choice(objective, name="objective", choices=("elbo", "iwae"))
    if isinstance(model, CategoricalVAE):
        if objective != "elbo":
            raise ValueError("a CategoricalVAE is trained on its exact ELBO; use objective='elbo'.")
        return functools.partial(categorical_elbo_loss, model=model, beta=beta)
    if objective == "iwae":
        return functools.partial(iwae_loss, model=model, num_samples=num_samples)
    return functools.partial(
        elbo_loss, model=model, num_samples=num_samples, beta=beta, analytic_kl=analytic_kl
    )


# ---------------------------------------------------------------------------------------
# Thin public wrappers: eager validation, then jitted work.


def _params_dtype(params: VAEParams):
    """The floating dtype of the parameters (float32 from ``init``; float64 if cast): data
    and latents are cast to it, so strict dtype promotion never sees a mix."""
    leaves = jax.tree.leaves(params)
    return jnp.result_type(leaves[0]) if leaves else jnp.float32


def check_data(x, *, model: Model, name: str = "x") -> np.ndarray:
    """Validates a data matrix for ``model`` and returns it as a NumPy array.

    Raises:
      ValueError: if ``x`` is not a finite 2-D array with ``model.data_dim`` columns, or,
        for a Bernoulli decoder, has values outside [0, 1].
    """
    arr = _checks.as_data_matrix(x, name=name)
    if arr.shape[1] != model.data_dim:
        raise ValueError(
            f"{name} has {arr.shape[1]} columns but the model expects data_dim={model.data_dim}."
        )
    if model.likelihood == "bernoulli" and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(
            f"{name} has values in [{arr.min():g}, {arr.max():g}], but a Bernoulli decoder"
            " needs data in [0, 1]; binarise or rescale it first."
        )
    return arr


def fit_vae(
    key: Array,
    model: Model,
    train_x,
    *,
    optimizer,
    batch_size: int,
    num_epochs: int,
    params: VAEParams | None = None,
    objective: str | Objective = "elbo",
    num_samples: int = 1,
    beta: float = 1.0,
    analytic_kl: bool = True,
    **fit_kwargs,
):
    """Validates the data and trains ``model`` with ``emvi.train.fit``.

    Args:
      key: run key (initialises params when ``params`` is None, then drives training).
      model: the VAE.
      train_x: training data (n, d).
      optimizer: an optax ``GradientTransformation``.
      batch_size: examples per step (must be <= n).
      num_epochs: passes over the data.
      params: starting parameters (default: ``model.init``).
      objective, num_samples, beta, analytic_kl: see ``loss_fn``.
      **fit_kwargs: passed to ``emvi.train.fit`` (workdir, eval_fn, progress, ...).

    Returns:
      ``emvi.train.fit``'s ``TrainResult``.

    Raises:
      ValueError: on bad data or a batch larger than the data set.
    """
    key = _checks.as_key(key)
    from emvi import train

    x = check_data(train_x, model=model, name="train_x")
    batch_size = _checks.check_positive_int(batch_size, name="batch_size")
    _checks.check_positive_int(num_epochs, name="num_epochs")
    if batch_size > x.shape[0]:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {x.shape[0]} training examples;"
            " use a smaller batch."
        )
    loss = loss_fn(
        model, objective=objective, num_samples=num_samples, beta=beta, analytic_kl=analytic_kl
    )
    k_init, k_run = jax.random.split(key)
    if params is None:
        params = model.init(k_init)
    return train.fit(
        k_run,
        loss,
        params,
        optimizer,
        jnp.asarray(x, _params_dtype(params)),
        batch_size=batch_size,
        num_epochs=num_epochs,
        **fit_kwargs,
    )


@functools.partial(jax.jit, static_argnames=("model",))
def _encode_jit(params, x, model):
    if isinstance(model, CategoricalVAE):
        return jax.nn.softmax(categorical_posterior_logits(params, x, model=model), axis=-1)
    return _posterior_params(params, x, model)


def encode(params: VAEParams, x, *, model: Model):
    """Encodes data: ``(mean, scale)`` of q(z|x) for a ``GaussianVAE``, q(k|x) (n, m) for a
    ``CategoricalVAE``."""
    arr = check_data(x, model=model)
    return _encode_jit(params, jnp.asarray(arr, _params_dtype(params)), model)


def _decode(params, key, z, model, sample):
    if sample:
        return model.decoder.apply(params.decoder, key, z, method="sample")
    return model.decoder.apply(params.decoder, z, method="mean")


@functools.partial(jax.jit, static_argnames=("model", "sample"))
def _reconstruct_jit(key, params, x, model, sample):
    k_z, k_x = jax.random.split(key)
    if isinstance(model, CategoricalVAE):
        logits = categorical_posterior_logits(params, x, model=model)
        k = jax.random.categorical(k_z, logits, axis=-1)
        z = jax.nn.one_hot(k, model.num_classes, dtype=x.dtype)
    else:
        mean, scale = _posterior_params(params, x, model)
        z = elbo.reparameterize(k_z, mean, scale, 1)[0][0]
    return _decode(params, k_x, z, model, sample)


def reconstruct(key: Array, params: VAEParams, x, *, model: Model, sample: bool = False):
    """Encode, sample z ~ q(z|x), decode: a reconstruction of x.

    Returns:
      (n, d): the decoder mean E[x|z] (Bernoulli probabilities in [0, 1]) or, with
      ``sample=True``, a draw x ~ p(x|z).
    """
    key = _checks.as_key(key)
    arr = check_data(x, model=model)
    x = jnp.asarray(arr, _params_dtype(params))
    return _reconstruct_jit(key, params, x, model, bool(sample))


@functools.partial(jax.jit, static_argnames=("model", "num", "sample"))
def _generate_jit(key, params, model, num, sample):
    k_z, k_x = jax.random.split(key)
    dtype = _params_dtype(params)
    if isinstance(model, CategoricalVAE):
        k = jax.random.randint(k_z, (num,), 0, model.num_classes)
        z = jax.nn.one_hot(k, model.num_classes, dtype=dtype)
    else:
        z = jax.random.normal(k_z, (num, model.latent_dim), dtype)
    return _decode(params, k_x, z, model, sample)


def generate(key: Array, params: VAEParams, num: int, *, model: Model, sample: bool = False):
    """Sample z from the prior and decode it: a sample of the model.

    Returns:
      (num, d): decoder means, or draws x ~ p(x|z) with ``sample=True``.
    """
    key = _checks.as_key(key)
    num = _checks.check_positive_int(num, name="num")
    return _generate_jit(key, params, model, num, bool(sample))


@functools.partial(jax.jit, static_argnames=("model",))
def _decode_mean_jit(params, z, model):
    return model.decoder.apply(params.decoder, z, method="mean")


def decode(params: VAEParams, z, *, model: Model):
    """Decoder mean E[x | z] for latents z (n, l) (one-hot codes for a categorical VAE)."""
    z = jnp.asarray(z, _params_dtype(params))
    if z.ndim != 2 or z.shape[1] != model.latent_dim:
        raise ValueError(f"z must have shape (n, {model.latent_dim}); got {z.shape}.")
    if not bool(jnp.all(jnp.isfinite(z))):
        raise ValueError("z contains NaN or inf.")
    return _decode_mean_jit(params, z, model)


def categorical_log_likelihood(params: VAEParams, x, *, model: CategoricalVAE):
    """Exact per-example log p(x) of a ``CategoricalVAE`` (validated wrapper)."""
    if not isinstance(model, CategoricalVAE):
        raise ValueError("categorical_log_likelihood needs a CategoricalVAE.")
    arr = check_data(x, model=model)
    return jax.jit(categorical_exact_log_likelihood, static_argnames=("model",))(
        params, jnp.asarray(arr, _params_dtype(params)), model=model
    )


def log_likelihood(
    key: Array | None,
    params: VAEParams,
    x,
    *,
    model: Model,
    num_samples: int = 5000,
    sample_chunk: int = 500,
    data_chunk: int = 256,
):
    r"""Per-example log p(x): exact for a ``CategoricalVAE`` (``key`` unused), and for a
    ``GaussianVAE`` the importance-sampling estimate with q(z|x) as proposal,

    .. math:: \log p(x) \approx \log \frac1K \sum_{j=1}^K \frac{p(x \mid z_j) p(z_j)}
              {q(z_j \mid x)},\quad K = \texttt{num\_samples},

    via ``emvi.elbo.estimate_log_likelihood`` (a lower bound in expectation that tightens
    as K grows).
    """
    key = _checks.as_key(key)
    if isinstance(model, CategoricalVAE):
        return categorical_log_likelihood(params, x, model=model)
    arr = check_data(x, model=model)
    num_samples = _checks.check_positive_int(num_samples, name="num_samples")
    return elbo.estimate_log_likelihood(
        key,
        jnp.asarray(arr, _params_dtype(params)),
        _gaussian_posterior_fn(params, model),
        _gaussian_log_joint_fn(params, model),
        num_samples=num_samples,
        sample_chunk=min(sample_chunk, num_samples),
        data_chunk=data_chunk,
    )


# ---------------------------------------------------------------------------------------
# Evaluation: the numbers an experiment reports for a trained VAE.


def elbo_eval_fn(model: Model, x, key: Array, *, num_samples: int = 10):
    """``eval_fn(params) -> {"test_elbo", "test_kl"}`` for ``emvi.train.fit``'s ``eval_fn``:
    the mean ELBO and KL on ``x`` (exact for a ``CategoricalVAE``; ``num_samples`` draws
    from ``key`` for a ``GaussianVAE``), jitted once."""
    x = jnp.asarray(check_data(x, model=model))

    @jax.jit
    def aux(params):
        xx = x.astype(_params_dtype(params))
        if isinstance(model, CategoricalVAE):
            return categorical_elbo_loss(params, key, xx, model=model)[1]
        return elbo_loss(params, key, xx, model=model, num_samples=num_samples)[1]

    def eval_fn(params):
        out = aux(params)
        return {"test_elbo": out["elbo"], "test_kl": out["kl"]}

    return eval_fn


def _sem(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def _reconstruction_error(key: Array, params: VAEParams, x, model: Model) -> float:
    """Mean over examples of sum_j (x_j - E[x_j | z])^2 with one z ~ q(z | x)."""
    recon = reconstruct(key, params, x, model=model)
    return float(jnp.mean(jnp.sum(jnp.square(recon - jnp.asarray(x)), axis=-1)))


def evaluate_gaussian(
    key: Array, params: VAEParams, test_x, train_x, *, model: GaussianVAE, num_samples: int = 5000
) -> dict:
    """Test and train ELBO, test log-likelihood and latent usage of a ``GaussianVAE``.

    ``key`` is split in five: [0] the Monte Carlo ELBO (100 draws on ``test_x``, 10 on
    ``train_x``), [1] the IWAE estimate of log p(x) with ``num_samples`` importance
    samples (:func:`log_likelihood`), [2] the mutual information, [3] the reconstruction
    error (``emvi.metrics``).

    Returns:
      A dict of floats (and ``kl_per_dim``, a list): ``test_elbo``, ``test_recon_log_lik``,
      ``test_kl``, ``train_elbo``, ``test_log_likelihood`` and its standard error
      ``test_log_likelihood_sem``, ``active_units``, ``kl_per_dim``,
      ``mutual_information``, ``reconstruction_error`` and how each was computed.
    """
    key = _checks.as_key(key)
    from emvi import metrics

    keys = jax.random.split(key, 5)
    dtype = _params_dtype(params)
    test = jnp.asarray(check_data(test_x, model=model), dtype)
    train = jnp.asarray(check_data(train_x, model=model, name="train_x"), dtype)
    elbo_aux = jax.jit(
        lambda p, k, x, s: elbo_loss(p, k, x, model=model, num_samples=s)[1], static_argnums=3
    )
    aux_test = elbo_aux(params, keys[0], test, 100)
    aux_train = elbo_aux(params, keys[0], train, 10)
    tic = time.perf_counter()
    log_lik = np.asarray(
        log_likelihood(keys[1], params, test_x, model=model, num_samples=num_samples)
    )
    ll_time = time.perf_counter() - tic
    means, scales = encode(params, test_x, model=model)
    return {
        "test_elbo": float(aux_test["elbo"]),
        "test_recon_log_lik": float(aux_test["recon"]),
        "test_kl": float(aux_test["kl"]),
        "train_elbo": float(aux_train["elbo"]),
        "test_log_likelihood": float(np.mean(log_lik)),
        "test_log_likelihood_sem": _sem(log_lik),
        "log_likelihood_method": f"IWAE importance sampling, k={num_samples}",
        "log_likelihood_time_s": ll_time,
        "active_units": int(metrics.active_units(means)),
        "latent_dim": model.latent_dim,
        "kl_per_dim": np.asarray(metrics.kl_per_dim(means, scales)).tolist(),
        "mutual_information": float(metrics.mutual_information(keys[2], means, scales)),
        "mutual_information_num_points": int(means.shape[0]),
        "reconstruction_error": _reconstruction_error(keys[3], params, test_x, model),
    }


def evaluate_categorical(
    key: Array, params: VAEParams, test_x, train_x, *, model: CategoricalVAE
) -> dict:
    """Exact test/train ELBO and log-likelihood, class usage and exact I(x; k) under q.

    ``key`` is split in two: [1] drives the reconstruction error (nothing else is sampled).

    Returns:
      The keys of :func:`evaluate_gaussian`, with ``active_units`` the classes whose mean
      q(k|x) over the test set exceeds 0.01 and the exact mutual information
      :math:`H(\\bar q) - \\overline{H(q)}`.
    """
    key = _checks.as_key(key)
    keys = jax.random.split(key, 2)
    dtype = _params_dtype(params)
    test = jnp.asarray(check_data(test_x, model=model), dtype)
    train = jnp.asarray(check_data(train_x, model=model, name="train_x"), dtype)
    elbo_terms = jax.jit(lambda p, x: categorical_elbo_terms(p, x, model=model))
    terms = elbo_terms(params, test)
    train_elbo = float(jnp.mean(elbo_terms(params, train)["elbo"]))
    log_lik = np.asarray(log_likelihood(keys[0], params, test_x, model=model))
    probs = np.asarray(terms["probs"], np.float64)
    mean_q = probs.mean(axis=0)

    def entropy(p):
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)

    return {
        "test_elbo": float(jnp.mean(terms["elbo"])),
        "test_recon_log_lik": float(jnp.mean(terms["recon"])),
        "test_kl": float(jnp.mean(terms["kl"])),
        "train_elbo": train_elbo,
        "test_log_likelihood": float(np.mean(log_lik)),
        "test_log_likelihood_sem": _sem(log_lik),
        "log_likelihood_method": "exact: logsumexp over the m classes",
        "active_units": int(np.sum(mean_q > 0.01)),
        "active_units_definition": "classes with average q(k|x) > 0.01 over the test set",
        "num_classes": model.num_classes,
        "kl_per_dim": [float(jnp.mean(terms["kl"]))],
        "mutual_information": float(entropy(mean_q) - np.mean(entropy(probs))),
        "mutual_information_definition": "exact H(mean_x q(k|x)) - mean_x H(q(k|x))",
        "mutual_information_num_points": int(probs.shape[0]),
        "reconstruction_error": _reconstruction_error(keys[1], params, test_x, model),
    }


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def _elbo_terms_and_q(params, key, x, *, model, num_samples):
    mean, scale = _posterior_params(params, x, model)
    log_lik = lambda z: _decoder_log_prob(params, z, x, model)
    recon, kl = elbo.gaussian_elbo_terms(key, log_lik, mean, scale, num_samples=num_samples)
    return recon, kl, mean, scale


_iwae_jit = jax.jit(iwae_bound, static_argnames=("model", "num_samples", "chunk_size"))


def evaluate_latent_usage(
    key: Array,
    params: VAEParams,
    x,
    *,
    model: GaussianVAE,
    elbo_samples: int = 16,
    ll_samples: int = 1000,
    au_threshold: float = 0.01,
    kl_threshold: float = 0.1,
) -> dict:
    r"""Held-out ELBO, IWAE log-likelihood and how much of the latent space is used.

    For studies of uninformative latents ("posterior collapse"): with :math:`\mu(x),
    \sigma(x)` the encoder's q on the n rows of ``x``,

    * ``elbo`` = ``recon`` - ``kl`` (``elbo_samples`` reparameterised draws for the
      reconstruction term, the KL in closed form; :func:`gaussian_elbo_terms`);
    * ``log_likelihood``: the mean IWAE bound with k = ``ll_samples`` (:func:`iwae_bound`,
      100 draws alive at a time);
    * ``active_units``: dimensions with :math:`\mathrm{Var}_x E_q[z_j] >` ``au_threshold``
      (Burda et al., 2016), ``dims_kl_above``: dimensions whose mean KL exceeds
      ``kl_threshold`` nats, ``kl_per_dim`` (``emvi.metrics.kl_per_dim``);
    * ``mutual_information``: the estimate of I(x; z) under q of
      ``emvi.metrics.mutual_information`` (at most log n).

    ``key`` is split in three: [0] the ELBO draws, [1] the mutual information, [2] IWAE.

    Returns:
      A dict of floats (``active_units`` and ``dims_kl_above`` ints, ``kl_per_dim`` a list).
    """
    key = _checks.as_key(key)
    from emvi import metrics

    ll_samples = _checks.check_positive_int(ll_samples, name="ll_samples")
    elbo_samples = _checks.check_positive_int(elbo_samples, name="elbo_samples")
    k_elbo, k_mi, k_ll = jax.random.split(key, 3)
    x = jnp.asarray(check_data(x, model=model), _params_dtype(params))
    recon, kl, mean, scale = _elbo_terms_and_q(
        params, k_elbo, x, model=model, num_samples=elbo_samples
    )
    chunk = min(100, ll_samples)
    ll = _iwae_jit(params, k_ll, x, model=model, num_samples=ll_samples, chunk_size=chunk)
    kl_dims = metrics.kl_per_dim(mean, scale)
    return {
        "log_likelihood": float(jnp.mean(ll)),
        "elbo": float(jnp.mean(recon - kl)),
        "recon": float(jnp.mean(recon)),
        "kl": float(jnp.mean(kl)),
        "active_units": int(metrics.active_units(mean, threshold=au_threshold)),
        "dims_kl_above": int(jnp.sum(kl_dims > kl_threshold)),
        "mutual_information": float(metrics.mutual_information(k_mi, mean, scale)),
        "kl_per_dim": np.asarray(kl_dims).tolist(),
    }


@functools.partial(
    jax.jit, static_argnames=("model", "optimizer", "num_steps", "num_samples", "elbo_samples")
)
def _local_gap_elbos(
    k_elbo, k_local, params, x, *, model, optimizer, num_steps, num_samples, elbo_samples
):
    from emvi.optim import run_steps

    mean, scale = _posterior_params(params, x, model)

    def log_joint(z):  # (s, n, l) -> (s, n)
        xb = jnp.broadcast_to(x[None], (z.shape[0], *x.shape))
        log_lik = model.decoder.apply(params.decoder, z, xb, method="log_prob")
        return log_lik + elbo.std_normal_log_prob(z)

    def loss(q, t):
        k = jax.random.fold_in(k_local, t)
        return -jnp.sum(elbo.gaussian_mc_elbo(k, log_joint, *q, num_samples=num_samples))

    q0 = (mean, jnp.log(scale))
    best, _, _ = run_steps(loss, optimizer, q0, optimizer.init(q0), num_steps)
    e_phi = elbo.gaussian_mc_elbo(k_elbo, log_joint, *q0, num_samples=elbo_samples)
    e_best = elbo.gaussian_mc_elbo(k_elbo, log_joint, *best, num_samples=elbo_samples)
    return jnp.mean(e_phi), jnp.mean(e_best)


def gap_decomposition(
    key: Array,
    params: VAEParams,
    x,
    *,
    model: Model,
    optimizer=None,
    num_steps: int = 500,
    num_samples: int = 8,
    elbo_samples: int = 1000,
    ll_samples: int = 5000,
):
    r"""Cremer, Li & Duvenaud's (2018) split of a Gaussian VAE's inference gap on ``x``.

    .. math::
        \log p(x) - \mathrm{ELBO}(q_\phi)
          = \underbrace{\log p(x) - \mathrm{ELBO}(q^*)}_{\text{approximation}}
          + \underbrace{\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\phi)}_{\text{amortization}},

    :math:`q^*` the per-example diagonal Gaussian found by ``num_steps`` optax steps (Adam
    at 1e-2 by default) on the reparameterised ELBO (``num_samples`` fresh draws per step,
    :func:`emvi.elbo.gaussian_mc_elbo`), started from the encoder's mean and log-scale.
    Both ELBOs use the same ``elbo_samples`` draws (common random numbers); log p(x) is
    the IWAE estimate of :func:`log_likelihood` with ``ll_samples`` samples. The
    counterpart of :func:`emvi.grid.gap_decomposition` for a model without an exact
    posterior.

    Args:
      key: a typed PRNG key, split in three (or three keys, used as given): [0] log p(x),
        [1] the ELBO draws, [2] the local optimisation.
      params, model: the trained VAE.
      x: data (n, d).

    Returns:
      An ``emvi.grid.GapReport`` of means over the rows of ``x``, nats per example.
    """
    key = _checks.as_key(key)
    import optax

    from emvi.grid import GapReport

    if not isinstance(model, GaussianVAE):
        raise ValueError("gap_decomposition needs a GaussianVAE.")
    num_steps = _checks.check_positive_int(num_steps, name="num_steps")
    keys = key if jnp.shape(key) == (3,) else jax.random.split(key, 3)
    arr = check_data(x, model=model)
    ll = float(jnp.mean(log_likelihood(keys[0], params, arr, model=model, num_samples=ll_samples)))
    e_phi, e_best = _local_gap_elbos(
        keys[1],
        keys[2],
        params,
        jnp.asarray(arr, _params_dtype(params)),
        model=model,
        optimizer=optax.adam(1e-2) if optimizer is None else optimizer,
        num_steps=num_steps,
        num_samples=_checks.check_positive_int(num_samples, name="num_samples"),
        elbo_samples=_checks.check_positive_int(elbo_samples, name="elbo_samples"),
    )
    e_phi, e_best = float(e_phi), float(e_best)
    return GapReport(ll, e_best, e_phi, ll - e_best, e_best - e_phi)


class Traversal(NamedTuple):
    """Decoder means along single latent axes (:func:`latent_traversal`).

    Attributes:
      images: (r, c, d): row i moves dimension ``dims[i]`` through ``values``, others 0.
      dims: (r,) the dimensions, by decreasing KL.
      kl: (r,) their mean KL(q(z_j | x) || N(0, 1)) on the data.
      values: (c,) the values of the moved dimension.
    """

    images: np.ndarray
    dims: np.ndarray
    kl: np.ndarray
    values: np.ndarray


def latent_traversal(
    params: VAEParams, x, *, model: GaussianVAE, num_dims: int = 8, values=None
) -> Traversal:
    """Decodes z = v e_j for the ``num_dims`` dimensions j with the largest mean KL on ``x``
    and every v in ``values`` (default: 9 points from -2.5 to 2.5)."""
    from emvi import metrics

    values = np.linspace(-2.5, 2.5, 9) if values is None else np.asarray(values)
    means, scales = encode(params, x, model=model)
    kl = np.asarray(metrics.kl_per_dim(means, scales))
    dims = np.argsort(-kl)[: min(num_dims, model.latent_dim)]
    z = np.zeros((dims.size, values.size, model.latent_dim), np.float32)
    z[np.arange(dims.size)[:, None], np.arange(values.size)[None, :], dims[:, None]] = values
    images = decode(params, z.reshape(-1, model.latent_dim), model=model)
    return Traversal(np.asarray(images).reshape(dims.size, values.size, -1), dims, kl[dims], values)
