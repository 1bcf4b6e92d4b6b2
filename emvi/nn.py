r"""Flax (linen) encoders and decoders for amortized inference.

An encoder is the amortized E-step: it maps a data point to the parameters of q(z | x).
A decoder is the model p(x | z): it maps a latent to the parameters of a distribution over
the data, and its ``log_prob(z, x)`` method returns :math:`\log p(x \mid z)` summed over
data dimensions (``x`` may have size-1 leading axes, broadcast against z's batch axes).
That method, a ``data_dim`` attribute and ``sample(key, z)`` are all the VAEs of
:mod:`emvi.vae` ask of a decoder; ``likelihood`` ("bernoulli" or "gaussian") says which data
it can score. Three decoders are here: the factorised :class:`BernoulliDecoder` and
:class:`GaussianDecoder`, and the autoregressive :class:`MADEDecoder`, strong enough to
model x without the latent (what makes posterior collapse possible). :class:`Conv1D` is a
convolution over time for sequence encoders (``hmm.ChainEncoder``).

Shape letters: ``n`` data points, ``d`` data dimension, ``l`` latent dimension, ``m``
classes of a categorical latent, ``s`` Monte Carlo samples. ``...`` is any batch shape.

Positive scales. Every scale is :math:`\mathrm{softplus}(a) + \sigma_{\min}` for an
unconstrained network output ``a``. Unlike :math:`\exp(a)`, softplus grows linearly, so a
large pre-activation cannot overflow, and the floor :math:`\sigma_{\min}` (``min_scale``)
keeps :math:`\log \sigma` and :math:`1/\sigma` bounded, so no log-density can become
infinite in float32. The pre-activation is shifted by :math:`\log(e - 1)` so that a zero
output gives scale :math:`1 + \sigma_{\min}`, a neutral starting point.

Parameters are explicit pytrees: ``module.init(key, inputs)`` returns them and
``module.apply(params, inputs)`` uses them, as usual in linen.

Example:
  >>> import jax, jax.numpy as jnp
  >>> enc = GaussianEncoder(hidden=(32,), latent_dim=2)
  >>> x = jnp.zeros((5, 64), jnp.float32)
  >>> params = enc.init(jax.random.key(0), x)
  >>> mean, scale = enc.apply(params, x)
  >>> mean.shape, bool((scale > 0).all())
  ((5, 2), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from emvi import elbo

ACTIVATIONS = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
    "swish": nn.swish,
}

# softplus(_SOFTPLUS_ONE) == 1, so a zero pre-activation maps to unit scale.
_SOFTPLUS_ONE = math.log(math.e - 1.0)


def positive_scale(raw: Array, min_scale: float) -> Array:
    r"""Maps unconstrained ``a`` to :math:`\mathrm{softplus}(a + \log(e-1)) + \sigma_{\min}`."""
    return jax.nn.softplus(raw + _SOFTPLUS_ONE) + min_scale


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}.")
    return ACTIVATIONS[name]


def _check_sizes(hidden: Sequence[int], out: int, out_name: str) -> None:
    if any(int(h) < 1 for h in hidden):
        raise ValueError(f"hidden sizes must all be >= 1; got {tuple(hidden)}.")
    if int(out) < 1:
        raise ValueError(f"{out_name} must be >= 1; got {out}.")


class MLP(nn.Module):
    """A multilayer perceptron: Dense layers with an activation between them.

    Attributes:
      features: output sizes of the layers, the last one being the output size.
      activation: name of the hidden activation (see ``ACTIVATIONS``).
      activate_final: also apply the activation after the last layer.
    """

    features: Sequence[int]
    activation: str = "relu"
    activate_final: bool = False

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... f"]:
        act = _activation(self.activation)
        for i, size in enumerate(self.features):
            x = nn.Dense(size, name=f"dense_{i}")(x)
            if i + 1 < len(self.features) or self.activate_final:
                x = act(x)
        return x


class Conv1D(nn.Module):
    r"""A 'SAME'-padded convolution over time, (n, t, c) -> (n, t, features), computed as one
    matmul of the stacked shifted inputs (im2col):

    .. math::
        y_t = b + \sum_{s=0}^{w-1} h_{t + s - \lfloor w/2 \rfloor} K_s, \qquad h_\tau = 0
        \text{ outside } [1, t],

    the function of ``flax.linen.Conv(features, (w,), padding="SAME")`` with the same
    parameters (``kernel`` (w, c, features), ``bias``) and the same initialisation (LeCun
    normal with fan-in w c, zero bias), so the two give the same numbers from the same key.
    XLA's CPU convolution is slow in float64 and the matmul is not: the gradient of the mean
    ELBO of an ``hmm.ChainEncoder`` (hidden (64, 64), 8 states) over 1500 digit sequences of
    8 steps took 961 ms with ``nn.Conv`` and 241 ms with this module (float64, 2-core CPU).

    Attributes:
      features: output channels.
      kernel_size: w, odd.
      param_dtype: dtype the parameters are created in (flax's default, float32).
    """

    features: int
    kernel_size: int = 3
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Float[Array, "n t c"]) -> Float[Array, "n t f"]:
        w = self.kernel_size
        if w < 1 or w % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer; got {w}.")
        c = h.shape[-1]
        init = nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, (w, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, bias)
        r, t = w // 2, h.shape[1]
        padded = jnp.pad(h, ((0, 0), (r, r), (0, 0)))
        cols = jnp.concatenate([padded[:, s : s + t] for s in range(w)], axis=-1)
        return cols @ kernel.reshape(w * c, self.features) + bias[None, None, :]


class GaussianEncoder(nn.Module):
    r"""Diagonal Gaussian q(z | x) = N(mean(x), diag(scale(x)^2)).

    The scale is ``softplus(a + log(e - 1)) + min_scale`` (see the module docstring), so it
    is always > ``min_scale``.

    Attributes:
      hidden: hidden layer sizes.
      latent_dim: ``l``, the latent dimension.
      activation: hidden activation name.
      min_scale: floor added to every scale.
    """

    hidden: Sequence[int]
    latent_dim: int
    activation: str = "relu"
    min_scale: float = 1e-3

    @nn.compact
    def __call__(
        self, x: Float[Array, "... d"]
    ) -> tuple[Float[Array, "... l"], Float[Array, "... l"]]:
        _check_sizes(self.hidden, self.latent_dim, "latent_dim")
        h = MLP(tuple(self.hidden), self.activation, activate_final=True, name="trunk")(x)
        mean = nn.Dense(self.latent_dim, name="mean")(h)
        raw = nn.Dense(self.latent_dim, name="scale")(h)
        return mean, positive_scale(raw, self.min_scale)


class CategoricalEncoder(nn.Module):
    """Categorical q(z | x) over ``num_classes`` values; returns its logits.

    Attributes:
      hidden: hidden layer sizes.
      num_classes: ``m``, the number of latent classes.
      activation: hidden activation name.
    """

    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... m"]:
        _check_sizes(self.hidden, self.num_classes, "num_classes")
        return MLP((*self.hidden, self.num_classes), self.activation, name="net")(x)


def bernoulli_log_prob(
    logits: Float[Array, "... d"], x: Float[Array, "... d"]
) -> Float[Array, "..."]:
    r"""Bernoulli log-likelihood from logits, summed over the last axis.

    .. math:: \log p(x \mid \ell) = \sum_j x_j \ell_j - \mathrm{softplus}(\ell_j),

    which equals :math:`x \log \sigma(\ell) + (1 - x) \log(1 - \sigma(\ell))`: the exact
    log-probability for binary x, and the negative binary cross-entropy (not a normalised
    density) for grey levels in [0, 1].
    ``logits`` and ``x`` must have the same rank (broadcast explicitly, e.g. ``x[None]``).
    """
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


def gaussian_log_prob(
    mean: Float[Array, "... d"], scale: Float[Array, "... d"], x: Float[Array, "... d"]
) -> Float[Array, "..."]:
    r"""Diagonal Gaussian log-density, summed over the last axis.

    .. math:: \log N(x; \mu, \sigma^2) = \log N\big((x - \mu)/\sigma; 0, I\big)
        - \sum_j \log \sigma_j

    (:func:`emvi.elbo.std_normal_log_prob` of the standardised residual, minus the
    Jacobian).
    """
    return elbo.std_normal_log_prob((x - mean) / scale) - jnp.sum(jnp.log(scale), axis=-1)


class BernoulliDecoder(nn.Module):
    """p(x | z) = prod_j Bernoulli(x_j; sigmoid(logits_j(z))); ``__call__`` returns the logits.

    Attributes:
      hidden: hidden layer sizes.
      data_dim: ``d``, the data dimension.
      activation: hidden activation name.
    """

    hidden: Sequence[int]
    data_dim: int
    activation: str = "relu"
    likelihood: ClassVar[str] = "bernoulli"

    @nn.compact
    def __call__(self, z: Float[Array, "... l"]) -> Float[Array, "... d"]:
        _check_sizes(self.hidden, self.data_dim, "data_dim")
        return MLP((*self.hidden, self.data_dim), self.activation, name="net")(z)

    def log_prob(self, z: Float[Array, "... l"], x: Float[Array, "... d"]) -> Float[Array, "..."]:
        """log p(x | z) summed over data dimensions; ``x`` has the rank of the output."""
        return bernoulli_log_prob(self(z), x)

    def mean(self, z: Float[Array, "... l"]) -> Float[Array, "... d"]:
        """E[x | z] = sigmoid(logits)."""
        return jax.nn.sigmoid(self(z))

    def sample(self, key: Array, z: Float[Array, "... l"]) -> Float[Array, "... d"]:
        """Draws x ~ p(x | z) (binary, in the dtype of the logits)."""
        logits = self(z)
        return jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(logits.dtype)


class GaussianDecoder(nn.Module):
    r"""p(x | z) = N(mean(z), diag(scale^2)) with a learned scale.

    ``variance`` selects how the scale is learned:

    * ``"per_dim"``: one free parameter per data dimension, shared by all z (a vector
      ``log_scale`` of shape (d,), mapped through the softplus of the module docstring);
    * ``"per_output"``: a second head of the network, so the scale depends on z.

    ``__call__`` returns ``(mean, scale)``, both of shape (..., d).

    Attributes:
      hidden: hidden layer sizes.
      data_dim: ``d``.
      variance: ``"per_dim"`` or ``"per_output"`` (static).
      activation: hidden activation name.
      min_scale: floor added to the scale.
    """

    hidden: Sequence[int]
    data_dim: int
    variance: Literal["per_dim", "per_output"] = "per_dim"
    activation: str = "relu"
    min_scale: float = 1e-2
    likelihood: ClassVar[str] = "gaussian"

    @nn.compact
    def __call__(
        self, z: Float[Array, "... l"]
    ) -> tuple[Float[Array, "... d"], Float[Array, "... d"]]:
        _check_sizes(self.hidden, self.data_dim, "data_dim")
        if self.variance not in ("per_dim", "per_output"):
            raise ValueError(f"variance must be 'per_dim' or 'per_output'; got {self.variance!r}.")
        h = MLP(tuple(self.hidden), self.activation, activate_final=True, name="trunk")(z)
        mean = nn.Dense(self.data_dim, name="mean")(h)
        if self.variance == "per_output":
            raw = nn.Dense(self.data_dim, name="scale")(h)
        else:
            free = self.param("raw_scale", nn.initializers.zeros_init(), (self.data_dim,))
            raw = jnp.broadcast_to(free.astype(mean.dtype), mean.shape)
        return mean, positive_scale(raw, self.min_scale)

    def log_prob(self, z: Float[Array, "... l"], x: Float[Array, "... d"]) -> Float[Array, "..."]:
        """log p(x | z) summed over data dimensions; ``x`` has the rank of the output."""
        mean, scale = self(z)
        return gaussian_log_prob(mean, scale, x)

    def mean(self, z: Float[Array, "... l"]) -> Float[Array, "... d"]:
        """E[x | z]."""
        return self(z)[0]

    def sample(self, key: Array, z: Float[Array, "... l"]) -> Float[Array, "... d"]:
        """Draws x ~ p(x | z)."""
        mean, scale = self(z)
        return mean + scale * jax.random.normal(key, mean.shape, mean.dtype)


def _made_degrees(size: int, data_dim: int) -> np.ndarray:
    """Hidden-unit degrees 1..d-1, cycled (Germain et al. 2015, deterministic variant)."""
    return np.arange(size) % max(data_dim - 1, 1) + 1


def _masked_dense(module: nn.Module, x: Array, mask: np.ndarray, name: str, *, bias: bool = True):
    """``x @ (W * mask) + b`` with float32 parameters cast to the dtype of ``x``."""
    kernel = module.param(f"{name}_kernel", nn.initializers.lecun_normal(), mask.shape, jnp.float32)
    out = x @ (kernel * jnp.asarray(mask, kernel.dtype)).astype(x.dtype)
    if bias:
        b = module.param(f"{name}_bias", nn.initializers.zeros_init(), mask.shape[1:])
        out = out + b.astype(x.dtype).reshape((1,) * (out.ndim - 1) + b.shape)
    return out


class MADEDecoder(nn.Module):
    r"""Autoregressive Bernoulli decoder :math:`p(x \mid z) = \prod_i p(x_i \mid x_{<i}, z)`.

    Masked dense layers (MADE, Germain et al. 2015) over the pixels in raster order: hidden
    unit degrees cycle through 1..d-1, a unit of degree k sees pixels 1..k, and logit i
    sees the units of degree < i, so it depends on :math:`x_{<i}` only. z enters every
    hidden layer and the output through unmasked dense layers, and a direct masked
    x -> logits connection is added. ``__call__(z, x)`` returns the d logits.

    Attributes:
      data_dim: ``d``.
      hidden: hidden layer sizes.

    Example:
      >>> dec = MADEDecoder(data_dim=4, hidden=(8,))
      >>> z, x = jnp.zeros((3, 2)), jnp.ones((3, 4))
      >>> params = dec.init(jax.random.key(0), z, x)
      >>> dec.apply(params, z, x, method="log_prob").shape
      (3,)
    """

    data_dim: int
    hidden: tuple[int, ...] = (256,)
    likelihood: ClassVar[str] = "bernoulli"

    @nn.compact
    def __call__(self, z: Float[Array, "... l"], x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        _check_sizes(self.hidden, self.data_dim, "data_dim")
        d = self.data_dim
        in_deg = np.arange(1, d + 1)
        h, prev = x, in_deg
        for i, size in enumerate(self.hidden):
            deg = _made_degrees(size, d)
            h = _masked_dense(self, h, deg[None, :] >= prev[:, None], f"masked_{i}")
            h = nn.relu(h + nn.Dense(size, name=f"cond_{i}")(z))
            prev = deg
        logits = _masked_dense(self, h, in_deg[None, :] > prev[:, None], "masked_out")
        direct = _masked_dense(self, x, in_deg[None, :] > in_deg[:, None], "direct", bias=False)
        return logits + direct + nn.Dense(d, name="cond_out")(z)

    def log_prob(self, z: Float[Array, "... l"], x: Float[Array, "... d"]) -> Float[Array, "..."]:
        """log p(x | z) summed over pixels; ``x`` is broadcast to z's batch shape."""
        x = jnp.broadcast_to(x, (*z.shape[:-1], self.data_dim)).astype(z.dtype)
        return bernoulli_log_prob(self(z, x), x)

    def sample(self, key: Array, z: Float[Array, "... l"]) -> Float[Array, "... d"]:
        """Draws x ~ p(x | z) pixel by pixel (d passes of the network)."""
        keys = jax.random.split(key, self.data_dim)
        x0 = jnp.zeros((*z.shape[:-1], self.data_dim), z.dtype)

        def body(i, x):
            p = jax.nn.sigmoid(self(z, x)[..., i])
            xi = jax.random.bernoulli(keys[i], p).astype(z.dtype)
            return x.at[..., i].set(xi)

        return jax.lax.fori_loop(0, self.data_dim, body, x0)

    def mean(self, z: Float[Array, "... l"]) -> Float[Array, "... d"]:
        """Not available in closed form for an autoregressive decoder."""
        raise NotImplementedError(
            "MADEDecoder has no closed-form E[x | z]; draw samples with sample(key, z)."
        )
