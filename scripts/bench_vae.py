"""Training throughput of the default digits VAE: emvi (JAX, scanned epoch) vs a PyTorch loop.

Both sides train the same model on the same data with the same batch and optimiser:

* encoder 64-256-256 -> (mean, scale) of an 8-D Gaussian (scale = softplus(a + log(e-1))
  + 1e-3), decoder 8-256-256-64 Bernoulli logits, ReLU, float32;
* loss: negative one-sample reparameterised ELBO with the analytic KL, batch 100;
* Adam, learning rate 1e-3 (eps 1e-8 on both sides);
* digits-bin train set (1500 examples, 15 steps per epoch, reshuffled every epoch).

JAX runs ``emvi.train.make_train_epoch`` (the whole epoch is one ``lax.scan`` under
``jit``); PyTorch runs the ordinary eager loop (``randperm``, ``zero_grad``, ``backward``,
``step``), timed with its default CPU threads and with one thread, the faster kept.
Compile time is excluded: each side is warmed up, then timed over ``--repeats`` blocks
of ``--epochs`` epochs, and the median block is reported.

FLOP counting (analytic, matmuls only): a Dense layer of fan-in a and fan-out b costs 2ab
FLOPs per example forward and 4ab backward (gradients of the weights and of the input),
so a training step costs ~3x the forward matmul FLOPs; the first layer needs no input
gradient, so its backward is 2ab. Element-wise work (activations, softplus, the loss, Adam)
is not counted. XLA's own count (``cost_analysis`` of the compiled epoch, which counts
the scan body, i.e. one step, once) is reported beside it: it includes the element-wise
work and agrees to a few percent. The machine's float32 matmul rate is the median time
of a large square ``jnp.dot`` (``--matmul-size``; measured before and after the training
loops, the faster kept), and the "fraction of matmul rate" is the achieved analytic
FLOP/s of the JAX loop divided by it.

Usage::

    pip install -r requirements-bench.txt     # torch (CPU), for the comparison
    python scripts/bench_vae.py --out bench_vae.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emvi import data, runs, train, vae

HIDDEN = (256, 256)
LATENT = 8
BATCH = 100
LR = 1e-3


def dense_layers(data_dim: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every Dense layer of the default model, encoder first."""
    enc = [(data_dim, HIDDEN[0]), (HIDDEN[0], HIDDEN[1]), (HIDDEN[1], LATENT), (HIDDEN[1], LATENT)]
    dec = [(LATENT, HIDDEN[1]), (HIDDEN[1], HIDDEN[0]), (HIDDEN[0], data_dim)]
    return enc + dec


def step_flops_per_example(data_dim: int) -> dict:
    layers = dense_layers(data_dim)
    forward = sum(2 * a * b for a, b in layers)
    first = layers[0]
    backward = sum(4 * a * b for a, b in layers) - 2 * first[0] * first[1]
    return {"forward": forward, "backward": backward, "train_step": forward + backward}


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), times


def matmul_rate(size: int, repeats: int) -> dict:
    """float32 FLOP/s of a (size x size) @ (size x size) jnp.dot, median of repeats."""
    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (size, size), jnp.float32)
    b = jax.random.normal(keys[1], (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    med, times = _median_time(lambda: dot(a, b).block_until_ready(), repeats)
    return {"size": size, "median_s": med, "flops_per_s": 2 * size**3 / med, "times_s": times}


def bench_jax(train_x: np.ndarray, epochs: int, repeats: int) -> dict:
    model = vae.gaussian_vae(train_x.shape[1], LATENT, HIDDEN)
    optimizer = optax.adam(LR)
    loss = partial(vae.elbo_loss, model=model)
    epoch_fn = train.make_train_epoch(loss, optimizer, batch_size=BATCH)
    state = train.init_state(model.init(jax.random.key(0)), optimizer)
    x = jnp.asarray(train_x, jnp.float32)
    run_key = jax.random.key(1)

    # XLA's FLOP count of the compiled epoch (re-jitting the wrapper inlines the same
    # program); compile time is the first call's time.
    cost = jax.jit(epoch_fn).lower(state, run_key, jnp.int32(0), x).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    tic = time.perf_counter()
    jax.block_until_ready(epoch_fn(state, run_key, 0, x))
    compile_s = time.perf_counter() - tic

    box = {"state": state, "epoch": 0}

    def run_block():
        st = box["state"]
        for _ in range(epochs):
            st, metrics = epoch_fn(st, run_key, box["epoch"], x)
            box["epoch"] += 1
        jax.block_until_ready((st, metrics))
        box["state"] = st

    run_block()  # warm-up (first-run allocations, thread pools)
    med, times = _median_time(run_block, repeats)
    steps_per_epoch = train_x.shape[0] // BATCH
    examples = epochs * steps_per_epoch * BATCH
    return {
        "examples_per_s": examples / med,
        "median_block_s": med,
        "block_times_s": times,
        "compile_s": compile_s,
        "xla_flops_per_epoch": xla_flops,
        # XLA's cost analysis counts the body of the epoch's scan once (not once per
        # iteration), so its total is the FLOPs of one step of BATCH examples.
        "xla_flops_per_example": xla_flops / BATCH,
        "final_loss": float(jnp.mean(metrics_loss(box["state"], loss, x))),
    }


def metrics_loss(state, loss, x):
    return loss(state.params, jax.random.key(2), x)[0]


def bench_torch(
    train_x: np.ndarray, epochs: int, repeats: int, threads: int | None = None
) -> dict | None:
    try:
        import torch
    except ImportError:
        print(
            "torch is not installed, so the PyTorch comparison is skipped. Install it with\n"
            "    pip install -r requirements-bench.txt\n"
            "(torch==2.13.0, CPU build) and run this script again."
        )
        return None
    from torch import nn

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = train_x.shape[1]

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Linear(d, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU()
            )
            self.mean = nn.Linear(HIDDEN[1], LATENT)
            self.scale = nn.Linear(HIDDEN[1], LATENT)

        def forward(self, x):
            h = self.trunk(x)
            scale = nn.functional.softplus(self.scale(h) + math.log(math.e - 1.0)) + 1e-3
            return self.mean(h), scale

    enc = Encoder()
    dec = nn.Sequential(
        nn.Linear(LATENT, HIDDEN[1]),
        nn.ReLU(),
        nn.Linear(HIDDEN[1], HIDDEN[0]),
        nn.ReLU(),
        nn.Linear(HIDDEN[0], d),
    )
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=LR, eps=1e-8)
    x_all = torch.as_tensor(train_x, dtype=torch.float32)
    n = x_all.shape[0]
    steps = n // BATCH

    def loss_fn(x):
        mean, scale = enc(x)
        z = mean + scale * torch.randn_like(mean)
        logits = dec(z)
        recon = -nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
        kl = 0.5 * (mean**2 + scale**2 - 1.0 - 2.0 * torch.log(scale))
        return -(recon.sum(-1) - kl.sum(-1)).mean()

    def run_block():
        for _ in range(epochs):
            perm = torch.randperm(n)
            for i in range(steps):
                batch = x_all[perm[i * BATCH : (i + 1) * BATCH]]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(batch)
                loss.backward()
                opt.step()
        return loss

    run_block()  # warm-up
    med, times = _median_time(run_block, repeats)
    with torch.no_grad():
        final = float(loss_fn(x_all))
    return {
        "examples_per_s": epochs * steps * BATCH / med,
        "median_block_s": med,
        "block_times_s": times,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "final_loss": final,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_vae.json", help="where to write the JSON")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks (median kept)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-repeats", type=int, default=10)
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    args = parser.parse_args(argv)

    split = data.digits_bin(np.float32)
    train_x = split.train_x
    flops = step_flops_per_example(train_x.shape[1])
    load_before = os.getloadavg()
    mm_before = matmul_rate(args.matmul_size, args.matmul_repeats)
    jx = bench_jax(train_x, args.epochs, args.repeats)
    # PyTorch gets its best thread setting: its default and one thread (on a loaded or
    # small machine, spinning OpenMP threads can make the default far slower).
    thread_options = [args.torch_threads] if args.torch_threads else [None, 1]
    torch_runs = [bench_torch(train_x, args.epochs, args.repeats, t) for t in thread_options]
    torch_runs = [r for r in torch_runs if r is not None]
    th = max(torch_runs, key=lambda r: r["examples_per_s"]) if torch_runs else None
    mm_after = matmul_rate(args.matmul_size, args.matmul_repeats)
    # The machine's rate is the better of the two measurements (load can only slow it).
    mm = max(mm_before, mm_after, key=lambda m: m["flops_per_s"])
    mm["before_and_after_flops_per_s"] = [mm_before["flops_per_s"], mm_after["flops_per_s"]]
    load_after = os.getloadavg()

    jax_rate = jx["examples_per_s"] * flops["train_step"]
    result = {
        "model": {
            "layers": dense_layers(train_x.shape[1]),
            "batch_size": BATCH,
            "optimizer": f"adam({LR})",
            "steps_per_epoch": train_x.shape[0] // BATCH,
        },
        "flops_per_example": flops,
        "flop_counting": "analytic matmul FLOPs: forward 2ab per Dense layer, backward 4ab"
        " (2ab for the first layer, no input gradient); element-wise ops not counted",
        "matmul": mm,
        "jax": jx,
        "torch": th,
        "torch_all_thread_settings": torch_runs,
        "jax_flops_per_s": jax_rate,
        "fraction_of_matmul_rate": jax_rate / mm["flops_per_s"],
        "speedup_vs_torch": None if th is None else jx["examples_per_s"] / th["examples_per_s"],
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "settings": vars(args),
    }
    runs.write_json(args.out, result)

    rows = [
        (f"matmul rate (GFLOP/s, f32 {args.matmul_size}^2)", f"{mm['flops_per_s'] / 1e9:.1f}"),
        ("train-step FLOPs / example (analytic)", f"{flops['train_step'] / 1e6:.3f} M"),
        ("train-step FLOPs / example (XLA)", f"{jx['xla_flops_per_example'] / 1e6:.3f} M"),
        ("JAX scanned epoch (examples/s)", f"{jx['examples_per_s']:,.0f}"),
        ("JAX compile time (s)", f"{jx['compile_s']:.2f}"),
        ("JAX GFLOP/s achieved", f"{jax_rate / 1e9:.1f}"),
        ("fraction of matmul rate", f"{result['fraction_of_matmul_rate']:.1%}"),
    ]
    if th is not None:
        rows += [
            (
                f"PyTorch {th['torch_version']} loop, {th['torch_threads']} thread(s) (ex/s)",
                f"{th['examples_per_s']:,.0f}",
            ),
            ("speed-up JAX / PyTorch", f"{result['speedup_vs_torch']:.2f}x"),
        ]
    rows.append(("load average before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f}"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
