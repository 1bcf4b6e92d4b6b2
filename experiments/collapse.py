r"""Uninformative latents ("posterior collapse") and discrete codes on digits-bin.

The claim under test (seed 002, section 8; Zhao, Song & Ermon 2017): with a decoder strong
enough to model x on its own, maximising the ELBO leaves latent dimensions unused, because
the KL term pulls every q(z|x) to the prior; an objective that matches only the *aggregate*
posterior to the prior (InfoVAE / MMD) keeps the code informative.

Every model has the same Gaussian encoder (an ``emvi.nn.GaussianEncoder``) and the same
autoregressive decoder p(x|z) = prod_i Bernoulli(x_i | x_<i, z), a MADE-style masked MLP
conditioned on z (defined here; a factorised MLP decoder is available for comparison).
They differ only in the objective, all trained with ``emvi.train.fit`` for the same number
of epochs:

* ``vae``: the ELBO, recon - KL;
* ``kl_anneal``: recon - w_t KL with w_t rising linearly from 0 to 1 over
  ``anneal_epochs`` (the step count lives in the params, see ``_step_counter``);
* ``free_bits``: recon - sum_j max(lambda, KL_j), KL_j the batch-mean KL of dimension j
  (Kingma et al. 2016);
* ``infovae``: ``emvi.mmd.info_vae_objective`` with (alpha, lambda), the MMD (IMQ kernel)
  between one z ~ q(z|x) per batch example and as many prior draws.

Beside them, a VQ-VAE (``emvi.vq.VectorQuantizer``; deterministic encoder, ``vq_groups``
codes per image from a shared codebook, the same MADE decoder), with and without dead-code
restarts; its ELBO under a uniform prior over code tuples is recon - groups * log m.

Test-set metrics (digits-bin protocol, 297 test images): log-likelihood by importance
sampling (IWAE with ``ll_samples`` samples, ``emvi.elbo.estimate_log_likelihood``), the
ELBO, active units, KL per dimension, mutual information (``emvi.metrics``).

Usage:
  python experiments/collapse.py --workdir runs/collapse --overwrite
  python experiments/collapse.py --workdir runs/collapse_quick --num-epochs 20 --seeds 0
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from tqdm.auto import tqdm

from emvi import _checks, elbo, metrics, mmd, runs, train, vq
from emvi import nn as enn
from emvi.data import digits_bin

VAE_METHODS = ("vae", "kl_anneal", "free_bits", "infovae")
VQ_METHODS = ("vqvae", "vqvae_restart")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the collapse study (defaults: about 10 minutes on a loaded 2-core CPU)."""

    workdir: str = "runs/collapse"
    """Run folder (results.json, config.json, per-run metrics, figures)."""
    overwrite: bool = False
    """Replace an existing run folder."""
    methods: tuple[str, ...] = VAE_METHODS + VQ_METHODS
    """Models to train: any of vae, kl_anneal, free_bits, infovae, vqvae, vqvae_restart."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One training run per method and seed (same initial parameters across methods)."""
    decoder: str = "made"
    """'made' (autoregressive, conditioned on z) or 'mlp' (factorised Bernoulli)."""
    latent_dim: int = 16
    encoder_hidden: tuple[int, ...] = (256,)
    decoder_hidden: tuple[int, ...] = (256,)
    num_epochs: int = 200
    batch_size: int = 100
    learning_rate: float = 1e-3
    anneal_epochs: int = 100
    """kl_anneal: epochs over which the KL weight rises linearly from 0 to 1."""
    free_bits: float = 0.5
    """free_bits: per-dimension KL floor lambda (nats)."""
    info_alpha: float = 1.0
    """infovae: alpha (KL weight 1 - alpha; 1 = no per-example KL, the 'MMD-VAE')."""
    info_lambda: float = 100.0
    """infovae: lambda (MMD weight alpha + lambda - 1)."""
    mmd_kernel: str = "imq"
    """infovae: 'imq' (scale 2 * latent_dim, as in WAE) or 'rbf' (bandwidth 1)."""
    vq_num_codes: int = 16
    vq_groups: int = 4
    """VQ-VAE: codes per image (the encoder output is cut into this many vectors)."""
    vq_code_dim: int = 2
    vq_beta: float = 0.25
    ll_samples: int = 1000
    """Importance samples per test image for log p(x) (5000 is the usual protocol)."""
    elbo_samples: int = 16
    """Monte Carlo samples per test image for the reconstruction term of the ELBO."""
    au_threshold: float = 0.01
    """Active units: Var_x E[z_j | x] > this (Burda et al. 2016)."""
    kl_dim_threshold: float = 0.1
    """Also count the dimensions whose test KL exceeds this many nats."""
    num_plot_samples: int = 16
    progress: bool = True


# ---------------------------------------------------------------------------------------
# The decoder: MADE conditioned on z.


def _made_degrees(size: int, data_dim: int) -> np.ndarray:
    """Hidden-unit degrees 1..d-1, cycled (Germain et al. 2015, deterministic variant)."""
    return np.arange(size) % max(data_dim - 1, 1) + 1


class MADEDecoder(nn.Module):
    r"""Autoregressive Bernoulli decoder :math:`p(x|z) = \prod_i p(x_i \mid x_{<i}, z)`.

    Masked dense layers (MADE) over the pixels in raster order; z enters every hidden layer
    and the output through unmasked dense layers; a direct masked x -> logits connection
    is added. ``__call__(z, x)`` returns the d logits, logit i depending on x_<i only.
    """

    data_dim: int
    hidden: tuple[int, ...] = (256,)

    @nn.compact
    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
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

    def log_prob(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """log p(x|z) summed over pixels; x is broadcast to z's batch shape."""
        x = jnp.broadcast_to(x, (*z.shape[:-1], self.data_dim)).astype(z.dtype)
        return enn.bernoulli_log_prob(self(z, x), x)

    def sample(self, key: jax.Array, z: jax.Array) -> jax.Array:
        """Draws x ~ p(x|z) pixel by pixel (d passes)."""
        keys = jax.random.split(key, self.data_dim)
        x0 = jnp.zeros((*z.shape[:-1], self.data_dim), z.dtype)

        def body(i, x):
            p = jax.nn.sigmoid(self(z, x)[..., i])
            xi = jax.random.bernoulli(keys[i], p).astype(z.dtype)
            return x.at[..., i].set(xi)

        return jax.lax.fori_loop(0, self.data_dim, body, x0)


def _masked_dense(module, x, mask: np.ndarray, name: str, *, bias: bool = True):
    kernel = module.param(f"{name}_kernel", nn.initializers.lecun_normal(), mask.shape, jnp.float32)
    out = x @ (kernel * jnp.asarray(mask, kernel.dtype)).astype(x.dtype)
    if bias:
        b = module.param(f"{name}_bias", nn.initializers.zeros_init(), mask.shape[1:])
        out = out + b.astype(x.dtype).reshape((1,) * (out.ndim - 1) + b.shape)
    return out


class FactorisedDecoder(nn.Module):
    """emvi.nn.BernoulliDecoder behind the (z, x) interface of MADEDecoder."""

    data_dim: int
    hidden: tuple[int, ...] = (256,)

    def setup(self):
        self.net = enn.BernoulliDecoder(self.hidden, self.data_dim)

    def __call__(self, z, x):
        del x
        return self.net(z)

    def log_prob(self, z, x):
        x = jnp.broadcast_to(x, (*z.shape[:-1], self.data_dim)).astype(z.dtype)
        return enn.bernoulli_log_prob(self.net(z), x)

    def sample(self, key, z):
        return self.net.sample(key, z)


def make_decoder(cfg: Config) -> nn.Module:
    _checks.check_choice(cfg.decoder, name="decoder", choices=("made", "mlp"))
    cls = MADEDecoder if cfg.decoder == "made" else FactorisedDecoder
    return cls(data_dim=64, hidden=tuple(cfg.decoder_hidden))


# ---------------------------------------------------------------------------------------
# Gaussian-latent models and their objectives.


class VAEParams(NamedTuple):
    encoder: Any
    decoder: Any
    step: jax.Array  # float32 count of updates so far (drives the KL warm-up)


class Models(NamedTuple):
    encoder: enn.GaussianEncoder
    decoder: nn.Module


def _step_counter() -> optax.GradientTransformation:
    """An optax transformation that adds 1 to its leaves at every update (gradients ignored).

    ``fit`` hands the loss only the params, so a schedule over steps (the KL warm-up) reads
    its step from a params leaf advanced by this transformation.
    """

    def update(updates, state, params=None):
        del params
        return jax.tree.map(jnp.ones_like, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    labels = VAEParams("net", "net", "count")
    return optax.multi_transform(
        {"net": optax.adam(learning_rate), "count": _step_counter()}, labels
    )


@functools.partial(jax.jit, static_argnames=("models", "latent_dim"))
def init_vae(key, models: Models, latent_dim: int) -> VAEParams:
    """Initial parameters (jitted: one compilation instead of one per initializer shape)."""
    k_enc, k_dec = jax.random.split(key)
    x = jnp.zeros((1, 64), jnp.float32)
    z = jnp.zeros((1, latent_dim), jnp.float32)
    return VAEParams(
        models.encoder.init(k_enc, x),
        models.decoder.init(k_dec, z, x),
        jnp.zeros((), jnp.float32),
    )


def _kl_per_dim(mean, scale):
    """Per-example, per-dimension KL(q || N(0, 1)), shape (n, l)."""
    return elbo.standard_normal_kl(mean[..., None], scale[..., None])


def vae_loss(
    params: VAEParams,
    key,
    batch,
    *,
    models: Models,
    method: str,
    anneal_steps: int,
    free_bits: float,
    alpha: float,
    lam: float,
    kernel: str,
):
    """One of the four objectives; aux holds the ELBO pieces (always with KL weight 1)."""
    k_z, k_prior = jax.random.split(key)
    mean, scale = models.encoder.apply(params.encoder, batch)
    z = mean + scale * jax.random.normal(k_z, mean.shape, mean.dtype)
    recon = models.decoder.apply(params.decoder, z, batch, method="log_prob")
    kl_dims = _kl_per_dim(mean, scale)
    kl = jnp.sum(kl_dims, axis=-1)
    aux = {"elbo": jnp.mean(recon - kl), "recon": jnp.mean(recon), "kl": jnp.mean(kl)}
    if method == "vae":
        loss = -jnp.mean(recon - kl)
    elif method == "kl_anneal":
        weight = jnp.minimum(1.0, jax.lax.stop_gradient(params.step) / anneal_steps)
        loss = -jnp.mean(recon) + weight * jnp.mean(kl)
        aux["kl_weight"] = weight
    elif method == "free_bits":
        floored = jnp.maximum(free_bits, jnp.mean(kl_dims, axis=0))
        loss = -jnp.mean(recon) + jnp.sum(floored)
    elif method == "infovae":
        prior = jax.random.normal(k_prior, z.shape, z.dtype)
        bandwidth = 2.0 * z.shape[-1] if kernel == "imq" else 1.0
        d = mmd.mmd_unbiased(z, prior, kernel=kernel, bandwidth=bandwidth)
        loss = mmd.info_vae_objective(recon, kl, d, alpha=alpha, lam=lam)
        aux["mmd"] = d
    else:
        raise ValueError(f"unknown method {method!r}")
    return loss, aux


@functools.partial(jax.jit, static_argnames=("models", "num_samples"))
def _eval_elbo(params, key, x, *, models, num_samples):
    mean, scale = models.encoder.apply(params.encoder, x)
    eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
    z = mean[None] + scale[None] * eps
    recon = jnp.mean(models.decoder.apply(params.decoder, z, x[None], method="log_prob"), 0)
    kl = elbo.standard_normal_kl(mean, scale)
    return recon, kl, mean, scale


def _std_normal_log_prob(z):
    return jnp.sum(-0.5 * jnp.square(z) - 0.5 * math.log(2 * math.pi), axis=-1)


@functools.partial(jax.jit, static_argnames=("models", "num_samples", "chunk"))
def _iwae_log_likelihood(params, key, x, *, models, num_samples, chunk):
    """Per-example IWAE estimate of log p(x) (``emvi.elbo.iwae_bound``), params traced so
    one compilation serves every method and seed."""
    mean, scale = models.encoder.apply(params.encoder, x)
    posterior = distrax.MultivariateNormalDiag(mean, scale)

    def log_joint(z):
        lp = models.decoder.apply(params.decoder, z, x[None], method="log_prob")
        return lp + _std_normal_log_prob(z)

    return elbo.iwae_bound(key, posterior, log_joint, num_samples=num_samples, chunk_size=chunk)


def evaluate_vae(key, params: VAEParams, models: Models, test_x, cfg: Config) -> dict:
    """Test-set ELBO, IWAE log-likelihood and the latent-usage diagnostics."""
    k_elbo, k_mi, k_ll = jax.random.split(key, 3)
    x = jnp.asarray(test_x, jnp.float32)
    recon, kl, mean, scale = _eval_elbo(
        params, k_elbo, x, models=models, num_samples=cfg.elbo_samples
    )
    ll = _iwae_log_likelihood(
        params, k_ll, x, models=models, num_samples=cfg.ll_samples, chunk=min(100, cfg.ll_samples)
    )
    kl_dims = metrics.kl_per_dim(mean, scale)
    return {
        "log_likelihood": float(jnp.mean(ll)),
        "elbo": float(jnp.mean(recon - kl)),
        "recon": float(jnp.mean(recon)),
        "kl": float(jnp.mean(kl)),
        "active_units": int(metrics.active_units(mean, threshold=cfg.au_threshold)),
        "dims_kl_above": int(jnp.sum(kl_dims > cfg.kl_dim_threshold)),
        "mutual_information": float(metrics.mutual_information(k_mi, mean, scale)),
        "kl_per_dim": np.asarray(kl_dims).tolist(),
    }


@functools.partial(jax.jit, static_argnames=("models", "num", "latent_dim"))
def _sample_vae(key, params, *, models, num, latent_dim):
    k_z, k_x = jax.random.split(key)
    z = jax.random.normal(k_z, (num, latent_dim), jnp.float32)
    return models.decoder.apply(params.decoder, k_x, z, method="sample")


@functools.cache
def _vae_setup(method: str, cfg: Config):
    """Models, bound loss and optimizer of a method: the same objects for every seed, so
    ``fit``'s jitted epoch is compiled once per method."""
    models = Models(
        enn.GaussianEncoder(tuple(cfg.encoder_hidden), cfg.latent_dim), make_decoder(cfg)
    )
    steps_per_epoch = digits_bin().train_x.shape[0] // cfg.batch_size
    loss = functools.partial(
        vae_loss,
        models=models,
        method=method,
        anneal_steps=max(1, cfg.anneal_epochs * steps_per_epoch),
        free_bits=cfg.free_bits,
        alpha=cfg.info_alpha,
        lam=cfg.info_lambda,
        kernel=cfg.mmd_kernel,
    )
    return models, loss, make_optimizer(cfg.learning_rate)


def _model_key(cfg: Config) -> Config:
    """The config with the fields that do not change a compiled program blanked out."""
    return dataclasses.replace(
        cfg, workdir="", overwrite=False, methods=(), seeds=(), progress=False
    )


def run_vae(method, seed, cfg: Config, data, run_dir: Path) -> tuple[dict, np.ndarray]:
    models, loss, optimizer = _vae_setup(method, _model_key(cfg))
    k_init, k_train, k_eval, k_sample = jax.random.split(jax.random.key(seed), 4)
    params = init_vae(k_init, models, cfg.latent_dim)
    tic = time.perf_counter()
    result = train.fit(
        k_train,
        loss,
        params,
        optimizer,
        data.train_x,
        batch_size=cfg.batch_size,
        num_epochs=cfg.num_epochs,
        workdir=run_dir,
        checkpoint_every=cfg.num_epochs,
        max_checkpoints=1,
        progress=False,
        resume=False,
    )
    train_time = time.perf_counter() - tic
    out = evaluate_vae(k_eval, result.state.params, models, data.test_x, cfg)
    out["train_time_s"] = train_time
    out["eval_time_s"] = time.perf_counter() - tic - train_time
    out["final_train_loss"] = result.history[-1]["loss"]
    samples = _sample_vae(
        k_sample,
        result.state.params,
        models=models,
        num=cfg.num_plot_samples,
        latent_dim=cfg.latent_dim,
    )
    return out, np.asarray(samples)


# ---------------------------------------------------------------------------------------
# VQ-VAE.


class VQParams(NamedTuple):
    encoder: Any
    vq: Any
    decoder: Any


class VQModels(NamedTuple):
    encoder: enn.MLP
    quantizer: vq.VectorQuantizer
    decoder: nn.Module
    groups: int


def _vq_encode(params: VQParams, models: VQModels, x):
    """Encoder outputs as (n * groups, code_dim) vectors."""
    z_e = models.encoder.apply(params.encoder, x)
    return z_e.reshape(x.shape[0] * models.groups, -1)


def vq_loss(params: VQParams, key, batch, *, models: VQModels):
    del key
    z_e = _vq_encode(params, models, batch)
    z_q, aux = models.quantizer.apply(params.vq, z_e)
    recon = models.decoder.apply(
        params.decoder, z_q.reshape(batch.shape[0], -1), batch, method="log_prob"
    )
    loss = -jnp.mean(recon) + aux["loss"]
    return loss, {
        "recon": jnp.mean(recon),
        "vq_loss": aux["loss"],
        "perplexity": aux["perplexity"],
        "dead_codes": aux["dead_codes"].astype(jnp.float32),
    }


@functools.partial(jax.jit, static_argnames=("models",))
def _vq_assign(params: VQParams, x, *, models: VQModels):
    z_e = _vq_encode(params, models, x)
    _, idx, _ = vq.quantize(z_e, params.vq["params"]["codebook"])
    return z_e, idx


@functools.partial(jax.jit, static_argnames=("models",))
def _vq_recon(params: VQParams, x, *, models: VQModels):
    z_e = _vq_encode(params, models, x)
    z_q, _, _ = vq.quantize(z_e, params.vq["params"]["codebook"])
    return models.decoder.apply(params.decoder, z_q.reshape(x.shape[0], -1), x, method="log_prob")


@functools.partial(jax.jit, static_argnames=("models", "num"))
def _sample_vq(key, params: VQParams, *, models: VQModels, num: int):
    k_idx, k_x = jax.random.split(key)
    codebook = params.vq["params"]["codebook"]
    idx = jax.random.randint(k_idx, (num, models.groups), 0, codebook.shape[0])
    z = codebook[idx].reshape(num, -1)
    return models.decoder.apply(params.decoder, k_x, z, method="sample")


@functools.partial(jax.jit, static_argnames=("models", "code_dim"))
def _init_vq(key, models: VQModels, code_dim: int) -> VQParams:
    k_enc, k_vq, k_dec = jax.random.split(key, 3)
    x0 = jnp.zeros((1, 64), jnp.float32)
    return VQParams(
        models.encoder.init(k_enc, x0),
        models.quantizer.init(k_vq, jnp.zeros((1, code_dim), jnp.float32)),
        models.decoder.init(k_dec, jnp.zeros((1, models.groups * code_dim), jnp.float32), x0),
    )


@functools.cache
def _vq_setup(cfg: Config):
    """Models, jitted epoch and optimizer of the VQ-VAE, shared by every seed."""
    models = VQModels(
        enn.MLP((*cfg.encoder_hidden, cfg.vq_groups * cfg.vq_code_dim)),
        vq.VectorQuantizer(num_codes=cfg.vq_num_codes, code_dim=cfg.vq_code_dim, beta=cfg.vq_beta),
        make_decoder(cfg),
        cfg.vq_groups,
    )
    optimizer = optax.adam(cfg.learning_rate)
    train_epoch = train.make_train_epoch(
        functools.partial(vq_loss, models=models), optimizer, batch_size=cfg.batch_size
    )
    return models, train_epoch, optimizer


def run_vq(method, seed, cfg: Config, data, run_dir: Path) -> tuple[dict, np.ndarray]:
    """Trains a VQ-VAE with ``emvi.train.make_train_epoch``; restarts dead codes between
    epochs (usage counted on the whole training set) for the first 90% of training when
    ``method == "vqvae_restart"``."""
    models, train_epoch, optimizer = _vq_setup(_model_key(cfg))
    groups, code_dim, m = cfg.vq_groups, cfg.vq_code_dim, cfg.vq_num_codes
    k_init, k_train, k_restart, k_sample = jax.random.split(jax.random.key(seed), 4)
    params = _init_vq(k_init, models, code_dim)
    state = train.init_state(params, optimizer)
    train_x = jnp.asarray(data.train_x, jnp.float32)
    restart_until = int(0.9 * cfg.num_epochs) if method == "vqvae_restart" else 0
    restarts = 0
    tic = time.perf_counter()
    with runs.MetricsLog(run_dir) as log:
        for epoch in range(cfg.num_epochs):
            state, step_metrics = train_epoch(state, k_train, epoch, train_x)
            row = {"epoch": epoch, **{k: float(np.mean(v)) for k, v in step_metrics.items()}}
            if not np.isfinite(row["loss"]):
                raise train.TrainingDivergedError(
                    f"VQ-VAE training diverged in epoch {epoch}.", step=-1, epoch=epoch
                )
            z_e, idx = _vq_assign(state.params, train_x, models=models)
            usage = vq.code_usage(idx, m)
            row["train_dead_codes"] = int(jnp.sum(usage == 0))
            if epoch < restart_until and row["train_dead_codes"] > 0:
                codebook = state.params.vq["params"]["codebook"]
                new = vq.restart_dead_codes(
                    jax.random.fold_in(k_restart, epoch), codebook, usage, z_e
                )
                restarts += row["train_dead_codes"]
                state = state._replace(
                    params=state.params._replace(vq={"params": {"codebook": new}})
                )
            log.write(**row)
    train_time = time.perf_counter() - tic
    test_x = jnp.asarray(data.test_x, jnp.float32)
    recon = _vq_recon(state.params, test_x, models=models)
    _, test_idx = _vq_assign(state.params, test_x, models=models)
    _, train_idx = _vq_assign(state.params, train_x, models=models)
    tuples = np.asarray(test_idx).reshape(-1, groups)
    out = {
        "recon": float(jnp.mean(recon)),
        "elbo": float(jnp.mean(recon)) - groups * math.log(m),
        "perplexity": float(vq.codebook_perplexity(test_idx, m)),
        "dead_codes": int(vq.dead_codes(train_idx, m)),
        "distinct_code_tuples_test": len({tuple(t) for t in tuples.tolist()}),
        "codes_restarted": restarts,
        "train_time_s": train_time,
        "final_train_loss": row["loss"],
    }
    samples = _sample_vq(k_sample, state.params, models=models, num=cfg.num_plot_samples)
    return out, np.asarray(samples)


# ---------------------------------------------------------------------------------------
# Driver, summary, plots.


def _summarise(per_seed: list[dict]) -> dict:
    summary = {}
    for name, value in per_seed[0].items():
        if isinstance(value, list):
            arr = np.asarray([row[name] for row in per_seed], dtype=float)
            summary[name] = {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()}
        elif isinstance(value, int | float):
            arr = np.asarray([row[name] for row in per_seed], dtype=float)
            summary[name] = {"mean": float(arr.mean()), "std": float(arr.std())}
    return summary


def _check_config(cfg: Config) -> None:
    for method in cfg.methods:
        _checks.check_choice(method, name="method", choices=VAE_METHODS + VQ_METHODS)
    if not cfg.seeds:
        raise ValueError("seeds must name at least one seed.")
    _checks.check_positive_int(cfg.num_epochs, name="num_epochs")
    _checks.check_positive_int(cfg.latent_dim, name="latent_dim")
    _checks.check_positive_int(cfg.ll_samples, name="ll_samples")
    _checks.check_positive(cfg.learning_rate, name="learning_rate")
    _checks.check_nonnegative(cfg.free_bits, name="free_bits")
    _checks.check_choice(cfg.mmd_kernel, name="mmd_kernel", choices=("rbf", "imq"))
    _checks.check_choice(cfg.decoder, name="decoder", choices=("made", "mlp"))
    mmd.info_vae_weights(alpha=cfg.info_alpha, lam=cfg.info_lambda)
    _checks.check_positive_int(cfg.vq_num_codes, name="vq_num_codes (codebook size)")


def main(cfg: Config) -> dict:
    """Trains every (method, seed), writes results.json and the figures; returns the results."""
    _check_config(cfg)
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    data = digits_bin(np.float32)
    started = time.perf_counter()
    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    per_seed: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    samples = {}
    bar = tqdm(jobs, desc="collapse runs", unit="run", disable=not cfg.progress)
    for method, seed in bar:
        bar.set_postfix(method=method, seed=seed)
        run_dir = workdir / "runs" / f"{method}_seed{seed}"
        runner = run_vq if method in VQ_METHODS else run_vae
        out, x_samples = runner(method, seed, cfg, data, run_dir)
        out["seed"] = seed
        per_seed[method].append(out)
        if seed == cfg.seeds[0]:
            samples[method] = x_samples
        runs.write_json(run_dir / "result.json", out)
        tqdm.write(
            f"{method:14s} seed {seed}: "
            + ", ".join(
                f"{k}={v:.3g}" for k, v in out.items() if isinstance(v, float) and k != "seed"
            )
        )
    bar.close()
    np.savez_compressed(workdir / "samples.npz", **samples)
    results = {
        "dataset": "digits-bin (1500 train / 297 test, pixel > 8)",
        "log_likelihood_estimator": f"IWAE with {cfg.ll_samples} importance samples",
        "decoder": cfg.decoder,
        "methods": {
            m: {"summary": _summarise(rows), "per_seed": rows} for m, rows in per_seed.items()
        },
        "wall_time_s": time.perf_counter() - started,
    }
    runs.write_json(workdir / "results.json", results)
    plot(workdir)
    return results


def plot(workdir: str | Path) -> list[Path]:
    """Remakes the figures from results.json, samples.npz and the per-run metrics."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    methods = results["methods"]
    written = []

    vae_names = [m for m in methods if m in VAE_METHODS]
    if vae_names:
        fig, axes = plt.subplots(1, len(vae_names), figsize=(3.2 * len(vae_names), 3), sharey=True)
        axes = np.atleast_1d(axes)
        for ax, name in zip(axes, vae_names, strict=True):
            rows = methods[name]["per_seed"]
            kl = np.sort(np.asarray([r["kl_per_dim"] for r in rows]), axis=1)[:, ::-1]
            pos = np.arange(kl.shape[1])
            ax.bar(pos, kl.mean(0), yerr=kl.std(0), color="C0", alpha=0.8)
            ax.set_title(f"{name}\nAU={methods[name]['summary']['active_units']['mean']:.1f}")
            ax.set_xlabel("latent dim (sorted)")
        axes[0].set_ylabel("test KL per dimension (nats)")
        fig.tight_layout()
        path = workdir / "kl_per_dim.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for i, name in enumerate(vae_names):
            for j, row in enumerate(methods[name]["per_seed"]):
                hist = runs.read_metrics(workdir / "runs" / f"{name}_seed{row['seed']}")
                if hist:
                    ax.plot(
                        [h["epoch"] for h in hist],
                        [h["kl"] for h in hist],
                        color=f"C{i}",
                        alpha=0.7,
                        label=name if j == 0 else None,
                    )
        ax.set_xlabel("epoch")
        ax.set_ylabel("train KL(q(z|x) || p(z)) (nats)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.legend()
        fig.tight_layout()
        path = workdir / "kl_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    samples_path = workdir / "samples.npz"
    if samples_path.exists():
        with np.load(samples_path) as npz:
            samples = {k: npz[k] for k in npz.files}
        if samples:
            fig, axes = plt.subplots(1, len(samples), figsize=(2.2 * len(samples), 2.4))
            axes = np.atleast_1d(axes)
            for ax, (name, xs) in zip(axes, samples.items(), strict=True):
                k = math.ceil(math.sqrt(xs.shape[0]))
                grid = np.full((k * 9 - 1, k * 9 - 1), 0.35)
                for i, img in enumerate(xs):
                    r, c = divmod(i, k)
                    grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = img.reshape(8, 8)
                ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
                ax.set_title(name, fontsize=9)
                ax.axis("off")
            fig.tight_layout()
            path = workdir / "samples.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "plot":  # remake the figures from a run folder
        print(plot(sys.argv[2]))
    else:
        import tyro

        main(tyro.cli(Config))
