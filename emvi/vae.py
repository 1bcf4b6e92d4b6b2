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

Loss functions have the ``emvi.train.fit`` signature ``loss(params, key, batch) -> (loss,
aux)`` once the static model is bound with ``functools.partial``; they do no validation so
they can be jitted. The thin public wrappers (``fit_vae``, ``encode``, ``reconstruct``,
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
from typing import Any, NamedTuple

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from emvi import _checks, elbo
from emvi import nn as enn

Decoder = enn.BernoulliDecoder | enn.GaussianDecoder


class VAEParams(NamedTuple):
    """Parameters of a VAE: the encoder's (phi) and the decoder's (theta) Flax variables."""

    encoder: Any
    decoder: Any


def _check_decoder(decoder) -> None:
    if not isinstance(decoder, enn.BernoulliDecoder | enn.GaussianDecoder):
        raise ValueError(
            f"decoder must be an emvi.nn.BernoulliDecoder or GaussianDecoder; got {decoder!r}."
        )


class _EncoderDecoder:
    """What both VAEs share: the decoder's data size and likelihood, and ``init``."""

    decoder: Decoder

    @property
    def data_dim(self) -> int:
        return int(self.decoder.data_dim)

    @property
    def likelihood(self) -> str:
        return "bernoulli" if isinstance(self.decoder, enn.BernoulliDecoder) else "gaussian"

    def init(self, key: Array) -> VAEParams:
        """Initialises encoder and decoder parameters (float32); the decoder reads a
        ``latent_dim``-vector (the one-hot code, for the categorical VAE)."""
        k_enc, k_dec = jax.random.split(key)
        x = jnp.zeros((1, self.data_dim), jnp.float32)
        z = jnp.zeros((1, self.latent_dim), jnp.float32)
        return VAEParams(self.encoder.init(k_enc, x), self.decoder.init(k_dec, z))


@dataclasses.dataclass(frozen=True)
class GaussianVAE(_EncoderDecoder):
    """A VAE with Gaussian latents z in R^l and a standard normal prior.

    Attributes:
      encoder: an ``emvi.nn.GaussianEncoder`` (the amortized E-step).
      decoder: an ``emvi.nn.BernoulliDecoder`` or ``GaussianDecoder`` (the model p(x|z)).
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
      decoder: an ``emvi.nn.BernoulliDecoder`` or ``GaussianDecoder`` over one-hot codes.
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
    *,
    model: GaussianVAE,
    num_samples: int = 1,
    beta: float | Array = 1.0,
    analytic_kl: bool = True,
) -> tuple[Array, dict]:
    r"""Negative mean per-example (beta-)ELBO of a ``GaussianVAE``.

    .. math:: \mathcal{L} = -\frac1n \sum_i \big(\mathrm{recon}_i - \beta\,\mathrm{kl}_i\big).

    Returns:
      ``(loss, aux)`` with ``aux`` holding the mean ``elbo`` (always with beta = 1),
      ``recon`` and ``kl``, all in nats per example.
    """
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
    params: VAEParams, key: Array, x: Float[Array, "n d"], *, model: GaussianVAE, num_samples: int
) -> Float[Array, " n"]:
    r"""Per-example importance-weighted bound with k = ``num_samples`` draws from q(z|x).

    .. math:: \mathcal{L}_k(x) = E\Big[\log \frac1k \sum_{j=1}^k
              \frac{p(x, z_j)}{q(z_j \mid x)}\Big] \le \log p(x).
    """
    log_joint = _gaussian_log_joint_fn(params, model)
    return elbo.iwae_bound(
        key,
        _gaussian_posterior_fn(params, model)(x),
        lambda z: log_joint(x, z),
        num_samples=num_samples,
    )


def iwae_loss(
    params: VAEParams,
    key: Array,
    x: Float[Array, "n d"],
    *,
    model: GaussianVAE,
    num_samples: int = 5,
) -> tuple[Array, dict]:
    """Negative mean IWAE_k bound (k = ``num_samples``), for IWAE training.

    Returns:
      ``(loss, aux)`` with ``aux["iwae"]`` the mean bound in nats per example.
    """
    bound = iwae_bound(params, key, x, model=model, num_samples=num_samples)
    return -jnp.mean(bound), {"iwae": jnp.mean(bound)}


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
    *,
    model: CategoricalVAE,
    beta: float | Array = 1.0,
) -> tuple[Array, dict]:
    r"""Negative mean exact ELBO of a ``CategoricalVAE`` (``key`` is unused: no sampling).

    .. math:: \mathcal{L} = -\frac1n \sum_i \Big(\sum_k q(k|x_i)\log p(x_i|k)
              - \beta\,\mathrm{KL}(q(\cdot|x_i) \,\|\, \mathrm{U}\{1..m\})\Big).
    """
    del key
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
    objective: str = "elbo",
    num_samples: int = 1,
    beta: float = 1.0,
    analytic_kl: bool = True,
):
    """Binds a model and objective into ``loss(params, key, batch) -> (loss, aux)``.

    Args:
      model: a ``GaussianVAE`` or ``CategoricalVAE``.
      objective: ``"elbo"`` (Monte Carlo ELBO for Gaussian latents, the exact enumerated
        ELBO for categorical ones) or ``"iwae"`` (Gaussian latents only, k = num_samples).
    """
    _checks.check_choice(objective, name="objective", choices=("elbo", "iwae"))
    num_samples = _checks.check_positive_int(num_samples, name="num_samples")
    beta = _checks.check_nonnegative(beta, name="beta")
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
    objective: str = "elbo",
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
    """Encode, sample z ~ q(z|x), decode (seed 002, section 4.1).

    Returns:
      (n, d): the decoder mean E[x|z] (Bernoulli probabilities in [0, 1]) or, with
      ``sample=True``, a draw x ~ p(x|z).
    """
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
    """Sample z from the prior and decode it (seed 002, section 4.2).

    Returns:
      (num, d): decoder means, or draws x ~ p(x|z) with ``sample=True``.
    """
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
