r"""Amortized LDA: the logistic-normal encoder's ELBO against the per-document optima.

For fixed topics, on the digits as documents (k = 10 topics fitted by batch variational EM,
:math:`\alpha = 1/k`, the digits-bin train/test split) and on the bars corpus (its 10 true
topics, :math:`\alpha = 1`, 300 training and 100 test documents), trains
:func:`emvi.lda.fit_amortized` on the training documents and reports, per word, on both
splits (:func:`emvi.lda.amortization_gap`): Blei et al.'s mean-field bound at each
document's optimum, the encoder's ELBO, the same logistic-normal family optimised per
document, and the two differences, each with its Monte Carlo standard error.

Usage::

    python scripts/lda_amortization_gap.py --out runs/lda_amortization_gap.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    """Settings (each is a command-line flag)."""

    seed: int = 0
    lda_passes: int = 20
    num_steps: int = 3000
    hidden: tuple[int, ...] = (100, 100)
    learning_rate: float = 2e-3
    num_samples: int = 1000
    refine_steps: int = 500
    out: Path | None = None


def _corpora(args):
    from emvi import lda

    docs = lda.digits_documents(np.float64)
    perm = np.random.default_rng(0).permutation(len(docs))
    train, test = docs[perm[:1500]], docs[perm[1500:]]
    k = 10
    fit = lda.fit(jax.random.key(args.seed), train, k, max_iter=args.lda_passes)
    lam = np.asarray(fit.topic_word, np.float64)
    yield "digits", train, test, lam / lam.sum(axis=1, keepdims=True), 1.0 / k
    bars, true = lda.bars_corpus(args.seed, 400)
    yield "bars", bars[:300].astype(np.float64), bars[300:].astype(np.float64), true, 1.0


def main(args: Args) -> list[dict]:
    from emvi import lda

    rows = []
    key = jax.random.key(args.seed)
    for name, train, test, topics, alpha in _corpora(args):
        t0 = time.perf_counter()
        fit = lda.fit_amortized(
            jax.random.fold_in(key, 0),
            topics,
            train,
            alpha,
            hidden=args.hidden,
            num_steps=args.num_steps,
            learning_rate=args.learning_rate,
        )
        for split, x in (("train", train), ("test", test)):
            gap = lda.amortization_gap(
                jax.random.fold_in(key, 1),
                fit,
                topics,
                x,
                alpha,
                num_samples=args.num_samples,
                refine_steps=args.refine_steps,
            )
            rows.append(dict(corpus=name, split=split, docs=len(x), **gap._asdict()))
            print(json.dumps(rows[-1]), flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
