r"""Vector quantisation (VQ-VAE, van den Oord et al., 2017): discrete codes for an autoencoder.

A deterministic encoder gives :math:`z_e(x)`; the posterior is a point mass on the nearest
codebook vector :math:`e_k`, :math:`k = \arg\min_j \|z_e - e_j\|^2`. With a uniform prior over
the m codes the KL term of the ELBO is the constant :math:`\log m`, so training reduces to
reconstruction plus two terms that keep encoder outputs and codes close:

.. math::
    \mathcal{L} = -\log p(x | z_q) + \|\mathrm{sg}[z_e] - e\|^2 + \beta \|z_e - \mathrm{sg}[e]\|^2.

Seen from EM: the nearest-code assignment is a *hard E-step*, and moving each code to the
mean of the encoder outputs assigned to it is the *M-step* of k-means. :func:`ema_update`
does exactly that with exponential moving averages (online k-means).

The VQ-VAE itself (:class:`VQVAE`: an encoder whose output is cut into ``groups`` vectors,
each quantised with a shared codebook, and any decoder with ``log_prob(z, x)``), its loss
(:func:`vqvae_loss`), its training loop with dead-code restarts (:func:`fit_vqvae`) and its
held-out numbers (:func:`evaluate_vqvae`) close the module.

Shape letters: ``n`` encoder outputs (vectors to quantise), ``l`` code dimension, ``m``
codebook size, ``g`` codes per data point.

Example:
  >>> codebook = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  >>> z_q, idx, _ = quantize(jnp.array([[0.9, 0.8], [0.1, -0.2]]), codebook)
  >>> idx.tolist()
  [1, 0]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from emvi import _checks
from emvi.mmd import _pairwise_sq_distances


def _check_codebook(codebook, z_e=None) -> None:
    _checks.as_array(codebook, name="codebook")
    if z_e is not None:
        _checks.as_array(z_e, name="z_e", min_ndim=1)
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be 2-D (num_codes, code_dim); got shape {codebook.shape}.")
    if codebook.shape[0] < 1:
        raise ValueError("The codebook needs at least one code; got an empty codebook.")
    if z_e is not None and z_e.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"Encoder outputs have dimension {z_e.shape[-1]} but codes have dimension "
            f"{codebook.shape[1]}."
        )


def quantize(
    z_e: Float[Array, "n l"], codebook: Float[Array, "m l"]
) -> tuple[Float[Array, "n l"], Int[Array, " n"], Float[Array, "n m"]]:
    r"""Nearest-code quantisation (the hard E-step).

    Distances use :math:`\|z\|^2 - 2 z \cdot e + \|e\|^2` (one matrix product, clipped at 0)
    after centring both on their pooled mean (:func:`emvi.mmd.pairwise_sq_distances`; without
    it the expanded form picks a non-nearest code once the data sit 1e8 from the origin in
    float64, or a few hundred in float32), then argmin; ties go to the lowest index.

    Args:
      z_e: encoder outputs, shape (n, l).
      codebook: the codes, shape (m, l), m >= 1.

    Returns:
      ``(z_q, indices, distances)``: the chosen codes (n, l), their indices (n,) and all
      squared distances (n, m).

    Raises:
      ValueError: for a ``z_e`` or codebook that is not 2-D, an empty codebook, mismatched
        code dimension, complex or half-precision input (shapes and dtypes are static, so
        this is checked under ``jit`` too), and NaN or inf in concrete (untraced) input.
    """
    z_e = _checks.as_array(z_e, name="z_e", ndim=2)
    _check_codebook(codebook, z_e)
    codebook = _checks.as_array(codebook, name="codebook", ndim=2)
    distances = _pairwise_sq_distances(z_e, codebook)
    indices = jnp.argmin(distances, axis=-1)
    z_q = jnp.take(codebook, indices, axis=0)
    return z_q, indices, distances


def straight_through(z_e: Float[Array, "*b l"], z_q: Float[Array, "*b l"]) -> Float[Array, "*b l"]:
    r"""Straight-through estimator :math:`z_e + \mathrm{sg}[z_q - z_e]`.

    The value is :math:`z_q`; the Jacobian with respect to :math:`z_e` is the identity, so the
    decoder's gradient is copied through the non-differentiable argmin to the encoder.
    """
    chex.assert_equal_shape([z_e, z_q])
    return z_e + jax.lax.stop_gradient(z_q - z_e)


class VQLossTerms(NamedTuple):
    """The two auxiliary VQ-VAE losses (scalars) and their weighted sum."""

    codebook: Array  # ||sg[z_e] - e||^2: moves the codes only
    commitment: Array  # ||z_e - sg[e]||^2: moves the encoder only
    total: Array  # codebook + beta * commitment


def vq_loss_terms(
    z_e: Float[Array, "n l"], codebook: Float[Array, "m l"], *, beta: float = 0.25
) -> VQLossTerms:
    r"""Codebook and commitment losses of VQ-VAE.

    .. math::
        \mathcal{L}_{\mathrm{code}} = \frac{1}{n} \sum_i \|\mathrm{sg}[z_{e,i}] - e_{k_i}\|^2,
        \qquad
        \mathcal{L}_{\mathrm{commit}} = \frac{1}{n} \sum_i \|z_{e,i} - \mathrm{sg}[e_{k_i}]\|^2,

    with :math:`k_i` the nearest code. Reduction: the squared distance is **summed** over
    the l code dimensions and **averaged** over the n vectors, so the terms are on the scale
    of one vector's squared error (the reference implementations average over all n*l
    entries instead, which is this divided by l). Both terms have the same value; they
    differ only in where the gradient goes.

    Args:
      z_e: encoder outputs, shape (n, l).
      codebook: the codes, shape (m, l).
      beta: commitment weight (0.25 in the paper), >= 0.

    Returns:
      :class:`VQLossTerms` with ``total = codebook + beta * commitment``.
    """
    if _checks.is_concrete(beta):
        _checks.check_nonnegative(beta, name="beta")
    z_e = _checks.as_array(z_e, name="z_e", ndim=2)
    z_q, _, _ = quantize(z_e, codebook)
    codebook_term = jnp.mean(jnp.sum((jax.lax.stop_gradient(z_e) - z_q) ** 2, axis=-1))
    commitment = jnp.mean(jnp.sum((z_e - jax.lax.stop_gradient(z_q)) ** 2, axis=-1))
    return VQLossTerms(codebook_term, commitment, codebook_term + beta * commitment)


class EMAState(NamedTuple):
    """Running statistics of the EMA codebook (the "vq_stats" collection)."""

    cluster_size: Float[Array, " m"]  # EMA of how many vectors each code received
    embed_sum: Float[Array, "m l"]  # EMA of the sum of those vectors
    codebook: Float[Array, "m l"]  # embed_sum / smoothed cluster_size


def ema_init(codebook: Float[Array, "m l"]) -> EMAState:
    """EMA state consistent with ``codebook``: each code counts as one vector equal to itself."""
    _check_codebook(codebook)
    return EMAState(jnp.ones(codebook.shape[:1], codebook.dtype), codebook, codebook)


def ema_update(
    state: EMAState,
    z_e: Float[Array, "n l"],
    indices: Int[Array, " n"],
    *,
    decay: float,
    eps: float,
) -> EMAState:
    r"""One online k-means step on the codebook: hard EM with exponential moving averages.

    Given hard assignments (the hard E-step: each vector goes to its nearest code, e.g.
    ``indices`` from :func:`quantize`), the M-step moves every code to the mean of the
    vectors assigned to it. Here counts and sums are exponential moving averages over
    batches,

    .. math::
        N_j \leftarrow \gamma N_j + (1 - \gamma) n_j, \quad
        S_j \leftarrow \gamma S_j + (1 - \gamma) \textstyle\sum_{i: k_i = j} z_{e,i}, \quad
        e_j = S_j / \tilde N_j,

    with Laplace-smoothed counts :math:`\tilde N_j = (N_j + \epsilon) N / (N + m \epsilon)`,
    :math:`N = \sum_j N_j`, which keep rarely used codes from dividing by zero. With
    ``decay=0`` and ``eps=0`` this is exactly one Lloyd (k-means) update. A code whose
    smoothed count is zero (possible only with ``eps=0``) keeps its old value, the usual
    k-means convention for an empty cluster.

    Args:
      state: the current :class:`EMAState`.
      z_e: the batch of encoder outputs, shape (n, l).
      indices: their code assignments, shape (n,), in [0, m).
      decay: gamma in [0, 1) (0.99 typical).
      eps: Laplace smoothing constant, >= 0 (1e-5 typical).

    Returns:
      The new :class:`EMAState`.
    """
    if _checks.is_concrete(decay):
        d = _checks.check_nonnegative(decay, name="decay")
        if d >= 1.0:
            raise ValueError(f"decay must be in [0, 1); got {decay!r}.")
    if _checks.is_concrete(eps):
        _checks.check_nonnegative(eps, name="eps")
    _check_codebook(state.codebook, z_e)
    _check_indices(indices, z_e.shape[0], state.codebook.shape[0])
    m = state.codebook.shape[0]
    one_hot = jax.nn.one_hot(indices, m, dtype=z_e.dtype)  # (n, m)
    counts = jnp.sum(one_hot, axis=0)
    sums = one_hot.T @ z_e
    cluster_size = decay * state.cluster_size + (1.0 - decay) * counts
    embed_sum = decay * state.embed_sum + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + m * eps) * total
    safe = jnp.where(smoothed > 0, smoothed, 1.0)
    codebook = jnp.where((smoothed > 0)[:, None], embed_sum / safe[:, None], state.codebook)
    return EMAState(cluster_size, embed_sum, codebook)


def _check_indices(indices, n: int | None, m: int) -> None:
    """Code indices: integers of shape (n,), and in [0, m) when concrete."""
    shape, dtype = tuple(jnp.shape(indices)), jnp.result_type(indices)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"indices must be integers (code numbers); got dtype {dtype}.")
    if len(shape) != 1 or (n is not None and shape[0] != n):
        want = "(n,)" if n is None else f"({n},), one per vector"
        raise ValueError(f"indices must have shape {want}; got {shape}.")
    if _checks.is_concrete(indices):
        values = np.asarray(indices)
        if values.size and (values.min() < 0 or values.max() >= m):
            raise ValueError(
                f"indices must lie in [0, {m}); got values from {values.min()} to {values.max()}."
            )


def code_usage(indices: Int[Array, " n"], m: int) -> Float[Array, " m"]:
    """How many of the n vectors each of the m codes received (as floats)."""
    _checks.check_positive_int(m, name="codebook size m")
    _check_indices(indices, None, m)
    return jnp.sum(jax.nn.one_hot(indices, m), axis=0)


def codebook_perplexity(indices: Int[Array, " n"], m: int) -> Float[Array, ""]:
    r"""Perplexity of code usage, :math:`\exp(-\sum_j p_j \log p_j)`, p the usage frequencies.

    m when all codes are used equally, 1 when a single code is used.
    """
    counts = code_usage(indices, m)
    p = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)


def dead_codes(indices: Int[Array, " n"], m: int) -> Int[Array, ""]:
    """Number of codes that none of the vectors was assigned to."""
    return jnp.sum(code_usage(indices, m) == 0).astype(jnp.int32)


def restart_dead_codes(
    key: Array,
    codebook: Float[Array, "m l"],
    usage_counts: Float[Array, " m"],
    z_e: Float[Array, "n l"],
    *,
    threshold: float = 1.0,
) -> Float[Array, "m l"]:
    """Replaces codes used fewer than ``threshold`` times by randomly chosen encoder outputs.

    A dead code gets no gradient from the codebook loss and no EMA update, so it stays dead;
    moving it onto the data (as in Jukebox / many VQ-VAE codebases) gives it a chance.
    Encoder outputs are drawn without replacement when n >= m.

    Args:
      key: a PRNG key.
      codebook: shape (m, l).
      usage_counts: per-code usage (counts, or EMA cluster sizes), shape (m,).
      z_e: encoder outputs to draw from, shape (n, l).
      threshold: codes with ``usage_counts < threshold`` are restarted (1.0: unused codes).

    Returns:
      The new codebook, shape (m, l); live codes are unchanged.
    """
    key = _checks.as_key(key)
    _check_codebook(codebook, z_e)
    usage_counts = _checks.as_array(usage_counts, name="usage_counts", ndim=1)
    if usage_counts.shape != codebook.shape[:1]:
        raise ValueError(
            f"usage_counts must have shape ({codebook.shape[0]},), one per code; got "
            f"{tuple(usage_counts.shape)}."
        )
    n, m = z_e.shape[0], codebook.shape[0]
    picks = jax.random.choice(key, n, (m,), replace=n < m)
    dead = usage_counts < threshold
    return jnp.where(dead[:, None], z_e[picks].astype(codebook.dtype), codebook)


class VectorQuantizer(nn.Module):
    """A VQ layer: quantise, straight-through, and report losses and usage.

    With ``ema=False`` the codebook is the parameter ``"codebook"`` trained by the codebook
    loss; the returned ``loss`` is ``codebook + beta * commitment``. With ``ema=True`` the
    codebook lives in the mutable collection ``"vq_stats"`` (an :class:`EMAState`, updated by
    :func:`ema_update` when ``train=True`` and the collection is mutable) and ``loss`` is
    ``beta * commitment`` only.

    Attributes:
      num_codes: m >= 1.
      code_dim: l.
      beta: commitment weight.
      ema: use the EMA (online k-means) codebook.
      decay, eps: EMA decay and Laplace smoothing.
      codebook_init: initializer for the (m, l) codebook.

    Example:
      >>> vq = VectorQuantizer(num_codes=8, code_dim=2)
      >>> z = jnp.ones((5, 2))
      >>> variables = vq.init(jax.random.key(0), z)
      >>> z_q, aux = vq.apply(variables, z)
      >>> sorted(aux)
      ['codebook_loss', 'commitment', 'dead_codes', 'indices', 'loss', 'perplexity']
    """

    num_codes: int
    code_dim: int
    beta: float = 0.25
    ema: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    codebook_init: Callable[..., Any] = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

    @nn.compact
    def __call__(
        self, z_e: Float[Array, "n l"], *, train: bool = True
    ) -> tuple[Float[Array, "n l"], dict]:
        _checks.check_positive_int(self.num_codes, name="num_codes (codebook size)")
        _checks.check_positive_int(self.code_dim, name="code_dim")
        shape = (self.num_codes, self.code_dim)
        if self.ema:
            stats = self.variable(
                "vq_stats",
                "ema",
                lambda: ema_init(self.codebook_init(self.make_rng("params"), shape, z_e.dtype)),
            )
            codebook = stats.value.codebook
        else:
            codebook = self.param("codebook", self.codebook_init, shape, z_e.dtype)
        z_q, indices, _ = quantize(z_e, codebook)
        terms = vq_loss_terms(z_e, codebook, beta=self.beta)
        if self.ema:
            loss = self.beta * terms.commitment
            if train and self.is_mutable_collection("vq_stats") and not self.is_initializing():
                stats.value = ema_update(
                    stats.value,
                    jax.lax.stop_gradient(z_e),
                    indices,
                    decay=self.decay,
                    eps=self.eps,
                )
        else:
            loss = terms.total
        aux = {
            "indices": indices,
            "loss": loss,
            "codebook_loss": terms.codebook,
            "commitment": terms.commitment,
            "perplexity": codebook_perplexity(indices, self.num_codes),
            "dead_codes": dead_codes(indices, self.num_codes),
        }
        return straight_through(z_e, z_q), aux


# ---------------------------------------------------------------------------------------
# The VQ-VAE


class VQVAEParams(NamedTuple):
    """Parameters of a :class:`VQVAE`: encoder, quantizer (the codebook) and decoder."""

    encoder: Any
    vq: Any
    decoder: Any


@dataclasses.dataclass(frozen=True)
class VQVAE:
    r"""A VQ-VAE with ``groups`` codes per data point from one shared codebook.

    The encoder maps x (n, d) to (n, g * l); its output is cut into g vectors of size l,
    each is replaced by its nearest code, and the decoder reads the (n, g * l) quantised
    vector. With a uniform prior over the :math:`m^g` code tuples and the point-mass
    posterior, :math:`\mathrm{ELBO}(x) = \log p(x \mid z_q) - g \log m`
    (:func:`vqvae_elbo`).

    Attributes:
      encoder: a flax Module with (g * l) outputs (e.g. ``emvi.nn.MLP``).
      quantizer: a :class:`VectorQuantizer` (its ``code_dim`` is l; ``ema=False``).
      decoder: a decoder with ``data_dim``, ``log_prob(z, x)`` and ``sample(key, z)``
        (``emvi.nn.BernoulliDecoder``, ``MADEDecoder``, ...).
      groups: g >= 1.
    """

    encoder: nn.Module
    quantizer: VectorQuantizer
    decoder: nn.Module
    groups: int

    def __post_init__(self):
        _checks.check_positive_int(self.groups, name="groups")
        if self.quantizer.ema:
            raise ValueError(
                "VQVAE trains the codebook by its loss; use a quantizer with ema=False."
            )

    @property
    def data_dim(self) -> int:
        return int(self.decoder.data_dim)

    def init(self, key: Array) -> VQVAEParams:
        """Float32 parameters; the decoder is initialised through ``log_prob(z, x)``."""
        k_enc, k_vq, k_dec = jax.random.split(key, 3)
        x0 = jnp.zeros((1, self.data_dim), jnp.float32)
        code_dim = self.quantizer.code_dim
        z0 = jnp.zeros((1, self.groups * code_dim), jnp.float32)
        return VQVAEParams(
            self.encoder.init(k_enc, x0),
            self.quantizer.init(k_vq, jnp.zeros((1, code_dim), jnp.float32)),
            self.decoder.init(k_dec, z0, x0, method="log_prob"),
        )


def vqvae_encode(params: VQVAEParams, x: Float[Array, "n d"], *, model: VQVAE) -> Array:
    """Encoder outputs as (n * g, l) vectors, the rows of data point i being i*g .. i*g+g-1."""
    z_e = model.encoder.apply(params.encoder, x)
    return z_e.reshape(x.shape[0] * model.groups, -1)


def vqvae_assign(
    params: VQVAEParams, x: Float[Array, "n d"], *, model: VQVAE
) -> tuple[Float[Array, "ng l"], Int[Array, " ng"]]:
    """The encoder outputs (n * g, l) and the index of each one's nearest code (hard E-step)."""
    z_e = vqvae_encode(params, x, model=model)
    _, idx, _ = quantize(z_e, params.vq["params"]["codebook"])
    return z_e, idx


def vqvae_log_likelihood(
    params: VQVAEParams, x: Float[Array, "n d"], *, model: VQVAE
) -> Float[Array, " n"]:
    r""":math:`\log p(x \mid z_q(x))` per data point, with the nearest codes."""
    z_e = vqvae_encode(params, x, model=model)
    z_q, _, _ = quantize(z_e, params.vq["params"]["codebook"])
    return model.decoder.apply(params.decoder, z_q.reshape(x.shape[0], -1), x, method="log_prob")


def vqvae_elbo(log_likelihood: Array | float, *, groups: int, num_codes: int) -> Array | float:
    r""":math:`\log p(x \mid z_q) - g \log m`: the ELBO under a uniform prior on code tuples."""
    return log_likelihood - groups * math.log(num_codes)


def vqvae_loss(
    params: VQVAEParams,
    key: Array | None,
    batch: Float[Array, "b d"],
    step: Int[Array, ""] | int = 0,
    *,
    model: VQVAE,
) -> tuple[Array, dict]:
    r"""The VQ-VAE loss, :math:`-\overline{\log p(x \mid z_q)} + \|\mathrm{sg}[z_e] - e\|^2 +
    \beta \|z_e - \mathrm{sg}[e]\|^2` (``key`` and ``step`` unused: nothing is sampled).

    Returns:
      ``(loss, aux)`` in the ``emvi.train.fit`` form; aux has the batch means ``recon`` and
      ``vq_loss``, the batch's code ``perplexity`` and ``dead_codes`` (as a float).
    """
    del key, step
    z_e = vqvae_encode(params, batch, model=model)
    z_q, aux = model.quantizer.apply(params.vq, z_e)
    recon = model.decoder.apply(
        params.decoder, z_q.reshape(batch.shape[0], -1), batch, method="log_prob"
    )
    loss = -jnp.mean(recon) + aux["loss"]
    return loss, {
        "recon": jnp.mean(recon),
        "vq_loss": aux["loss"],
        "perplexity": aux["perplexity"],
        "dead_codes": aux["dead_codes"].astype(recon.dtype),
    }


def vqvae_sample(key: Array, params: VQVAEParams, *, model: VQVAE, num: int) -> Array:
    """Draws ``num`` code tuples uniformly and x ~ p(x | z_q) for each, shape (num, d)."""
    num = _checks.check_positive_int(num, name="num")
    k_idx, k_x = jax.random.split(_checks.as_key(key))
    codebook = params.vq["params"]["codebook"]
    idx = jax.random.randint(k_idx, (num, model.groups), 0, codebook.shape[0])
    z = codebook[idx].reshape(num, -1)
    return model.decoder.apply(params.decoder, k_x, z, method="sample")


_assign_jit = jax.jit(vqvae_assign, static_argnames="model")
_log_likelihood_jit = jax.jit(vqvae_log_likelihood, static_argnames="model")


@functools.cache
def _train_epoch(model: VQVAE, optimizer, batch_size: int):
    """One jitted epoch per (model, optimizer, batch size), shared by every run that passes
    the same three objects."""
    from emvi import train

    loss = functools.partial(vqvae_loss, model=model)
    return train.make_train_epoch(loss, optimizer, batch_size=batch_size)


class VQFitResult(NamedTuple):
    """What :func:`fit_vqvae` returns.

    Attributes:
      params: the trained :class:`VQVAEParams`.
      history: one row per epoch: the epoch, the means of the loss and of
        :func:`vqvae_loss`'s aux over its steps, and ``train_dead_codes``, the codes no
        training vector was assigned to after the epoch (before any restart).
      codes_restarted: how many codes were restarted in all.
    """

    params: VQVAEParams
    history: list[dict]
    codes_restarted: int


def fit_vqvae(
    key: Array,
    model: VQVAE,
    params: VQVAEParams,
    train_x,
    *,
    optimizer,
    batch_size: int,
    num_epochs: int,
    restart_epochs: int = 0,
    workdir=None,
) -> VQFitResult:
    """Trains a VQ-VAE on :func:`vqvae_loss`, restarting dead codes between epochs.

    Each epoch is one jitted ``emvi.train.make_train_epoch`` pass over shuffled minibatches.
    After each of the first ``restart_epochs`` epochs, every code that none of the
    training set's encoder outputs is assigned to (usage counted on the whole set, a hard
    E-step) is moved onto a randomly drawn encoder output (:func:`restart_dead_codes`).

    Args:
      key: a typed PRNG key, split in two (or two keys, used as given): [0] the minibatch
        order (``make_train_epoch``'s run key), [1] the restarts (folded with the epoch).
      model, params: the VQ-VAE and its starting parameters (``model.init(key)``).
      train_x: training data (n, d).
      optimizer: an optax transformation (pass the same object to share compilation).
      batch_size, num_epochs: minibatch size and passes over the data.
      restart_epochs: epochs after which dead codes are restarted (0: never).
      workdir: if given, each epoch's history row is appended to its ``metrics.jsonl``.

    Returns:
      A :class:`VQFitResult`.

    Raises:
      ValueError: on bad arguments; ``emvi.train.TrainingDivergedError`` when an epoch's
        mean loss is not finite.
    """
    key = _checks.as_key(key)
    from emvi import runs, train

    num_epochs = _checks.check_positive_int(num_epochs, name="num_epochs")
    batch_size = _checks.check_positive_int(batch_size, name="batch_size")
    _checks.check_positive_int(restart_epochs, name="restart_epochs", minimum=0)
    x = _checks.as_data_matrix(train_x, name="train_x")
    if x.shape[1] != model.data_dim:
        raise ValueError(f"train_x has {x.shape[1]} columns; the model expects {model.data_dim}.")
    k_train, k_restart = key if jnp.shape(key) == (2,) else jax.random.split(key)
    m = model.quantizer.num_codes
    train_epoch = _train_epoch(model, optimizer, batch_size)
    state = train.init_state(params, optimizer)
    x = jnp.asarray(x, jnp.float32)
    history, restarts = [], 0
    log = runs.MetricsLog(workdir) if workdir is not None else None
    try:
        for epoch in range(num_epochs):
            state, step_metrics = train_epoch(state, k_train, epoch, x)
            row = {"epoch": epoch, **{k: float(np.mean(v)) for k, v in step_metrics.items()}}
            if not np.isfinite(row["loss"]):
                raise train.TrainingDivergedError(
                    f"VQ-VAE training diverged in epoch {epoch}.", step=-1, epoch=epoch
                )
            z_e, idx = _assign_jit(state.params, x, model=model)
            usage = code_usage(idx, m)
            row["train_dead_codes"] = int(jnp.sum(usage == 0))
            if epoch < restart_epochs and row["train_dead_codes"] > 0:
                codebook = state.params.vq["params"]["codebook"]
                new = restart_dead_codes(jax.random.fold_in(k_restart, epoch), codebook, usage, z_e)
                restarts += row["train_dead_codes"]
                vq_params = {"params": {"codebook": new}}
                state = state._replace(params=state.params._replace(vq=vq_params))
            history.append(row)
            if log is not None:
                log.write(**row)
    finally:
        if log is not None:
            log.close()
    return VQFitResult(state.params, history, restarts)


def evaluate_vqvae(params: VQVAEParams, test_x, train_x, *, model: VQVAE) -> dict:
    r"""Held-out numbers of a VQ-VAE with the nearest codes (nothing is sampled).

    Returns:
      ``recon``: mean :math:`\log p(x \mid z_q)` on ``test_x``; ``elbo``: it minus
      :math:`g \log m` (:func:`vqvae_elbo`); ``perplexity`` of the test set's code usage;
      ``dead_codes``: codes no training vector is assigned to; and
      ``distinct_code_tuples_test``: how many different g-tuples of codes the test set uses.
    """
    m, groups = model.quantizer.num_codes, model.groups
    test = jnp.asarray(_checks.as_data_matrix(test_x, name="test_x"), jnp.float32)
    train = jnp.asarray(_checks.as_data_matrix(train_x, name="train_x"), jnp.float32)
    recon = float(jnp.mean(_log_likelihood_jit(params, test, model=model)))
    _, test_idx = _assign_jit(params, test, model=model)
    _, train_idx = _assign_jit(params, train, model=model)
    tuples = np.asarray(test_idx).reshape(-1, groups)
    return {
        "recon": recon,
        "elbo": vqvae_elbo(recon, groups=groups, num_codes=m),
        "perplexity": float(codebook_perplexity(test_idx, m)),
        "dead_codes": int(dead_codes(train_idx, m)),
        "distinct_code_tuples_test": len({tuple(t) for t in tuples.tolist()}),
    }
