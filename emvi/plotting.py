"""Figure helpers shared by the experiments: a non-interactive pyplot, image grids, saving.

matplotlib is imported only when a figure is drawn (``pyplot()``), so importing this module
costs nothing and the library never needs a display.

Example:
  >>> grid = image_grid(np.ones((3, 4)), rows=1, cols=3, background=0.0)
  >>> grid.shape  # three 2x2 images with one-pixel borders between them
  (2, 8)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, rows: int, cols: int, *, background: float = 0.3) -> np.ndarray:
    """Tiles square images (flattened, shape (num, side**2)) into one 2-D array.

    Images fill the grid row by row (at most ``rows * cols`` are shown), separated by
    one-pixel borders of value ``background``.

    Args:
      images: shape (num, side**2), any real values (plotted with a fixed vmin/vmax).
      rows, cols: grid size.
      background: value of the borders and of empty cells.

    Returns:
      Shape (rows * (side + 1) - 1, cols * (side + 1) - 1).

    Raises:
      ValueError: if the images are not square.
    """
    images = np.asarray(images)
    side = round(math.sqrt(images.shape[-1]))
    if side * side != images.shape[-1]:
        raise ValueError(f"images must be flattened squares; got {images.shape[-1]} pixels.")
    step = side + 1
    grid = np.full((rows * step - 1, cols * step - 1), background, dtype=np.float64)
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        grid[r * step : r * step + side, c * step : c * step + side] = img.reshape(side, side)
    return grid


def square_grid(images: np.ndarray, *, background: float = 0.3) -> np.ndarray:
    """:func:`image_grid` with ``ceil(sqrt(num))`` columns and as many rows as needed."""
    num = len(images)
    cols = max(1, math.ceil(math.sqrt(num)))
    return image_grid(images, max(1, math.ceil(num / cols)), cols, background=background)


def save(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Lays out ``fig`` (``tight_layout``), writes it to ``path`` and closes it."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def _half_step_axis(num_iter: int) -> np.ndarray:
    """x positions of the 2 * num_iter half-steps: t after E-step t, t + 1/2 after M-step t."""
    t = np.arange(num_iter, dtype=np.float64)
    return np.stack([t, t + 0.5], axis=1).reshape(-1)


def half_step_trace(
    ax,
    log_likelihood: ArrayLike,
    elbo: ArrayLike,
    *,
    start: int = 0,
    stop: int | None = None,
    shift: ArrayLike = 0.0,
    label_suffix: str = "",
    markers: bool = True,
) -> None:
    """Draws log p(x) and the ELBO after every half-step of EM (an ``emvi.em.EMTrace``).

    Row ``t`` of the ``(t, 2)`` arrays is ``[after E-step t, after M-step t]``, drawn at
    ``t`` and ``t + 1/2``: a staircase likelihood over a sawtooth ELBO that touches it after
    each E-step.

    Args:
      ax: a matplotlib axis.
      log_likelihood, elbo: shape (t, 2).
      start, stop: the iterations drawn (``stop`` None: to the end).
      shift: added to both curves (e.g. ``log_prior / n`` for MAP-EM), scalar or (t, 2).
      label_suffix: appended to both legend labels.
      markers: mark the E-step (circles) and M-step (triangles) points of the ELBO.
    """
    ll = np.asarray(log_likelihood, np.float64) + shift
    lower = np.asarray(elbo, np.float64) + shift
    stop = ll.shape[0] if stop is None else stop
    win = slice(2 * start, 2 * stop)
    xs, ll, lower = _half_step_axis(ll.shape[0])[win], ll.reshape(-1)[win], lower.reshape(-1)[win]
    ax.plot(xs, ll, "k-", lw=1.2, label="log p(x)" + label_suffix)
    ax.plot(xs, lower, "C1-", lw=0.9, label="ELBO(q_t, θ)" + label_suffix)
    if markers:
        ax.plot(xs[0::2], lower[0::2], "o", color="C2", ms=4, label="after E-step: ELBO = log p(x)")
        ax.plot(xs[1::2], lower[1::2], "v", color="C3", ms=4, label="after M-step: gap = KL")
    ax.set_xlabel("EM iteration t (E-step at t, M-step at t + 1/2)")


def kl_trace(ax, kl: ArrayLike, *, floor: float = 1e-17) -> None:
    """Draws KL(q || p(z|x)) = log p(x) - ELBO after every EM half-step, log scale.

    ``kl`` has shape (t, 2) as in :func:`half_step_trace`. After an exact E-step the KL is
    zero up to rounding, so its absolute value is drawn, and values below ``floor`` (exact
    zeros included) are drawn at ``floor``.
    """
    kl = np.asarray(kl, np.float64)
    xs = _half_step_axis(kl.shape[0])
    ax.plot(xs[1::2], np.maximum(kl[:, 1], floor), "v-", color="C3", ms=3, label="after M-step")
    e_label = "after E-step (|KL|: rounding only)"
    ax.plot(xs[0::2], np.maximum(np.abs(kl[:, 0]), floor), "o", color="C2", ms=3, label=e_label)
    ax.set_yscale("log")
    ax.set_ylabel("KL(q || p(z|x)) = log p(x) - ELBO")
    ax.set_xlabel("EM iteration t (E-step at t, M-step at t + 1/2)")


def covariance_ellipse(ax, mean: ArrayLike, cov: ArrayLike, num_sigma: float | int = 1.0, **kwargs):
    """Adds the ellipse ``(x - mean)^T cov^{-1} (x - mean) = num_sigma^2`` of a 2-D Gaussian.

    The axes are the eigenvectors of ``cov`` with half-lengths ``num_sigma * sqrt(eigenvalue)``.
    ``kwargs`` go to ``matplotlib.patches.Ellipse`` (unfilled by default).

    Returns:
      The ``Ellipse`` patch.
    """
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(np.asarray(cov, np.float64))
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    width, height = 2 * num_sigma * np.sqrt(vals[::-1])
    kwargs.setdefault("fill", False)
    return ax.add_patch(Ellipse(mean, width, height, angle=angle, **kwargs))


def image_panels(axes, images: ArrayLike, titles=(), *, vmin=0.0, vmax=1.0, fontsize=6) -> None:
    """Draws flattened square images one per axis (in the order of ``axes.ravel()``).

    Each used axis gets the image (``gray_r``, fixed ``vmin``/``vmax``), its title from
    ``titles`` (if given) and no ticks or frame, so a y-label can still name a row;
    axes beyond the images are switched off.
    """
    images = np.asarray(images)
    side = round(math.sqrt(images.shape[-1]))
    axes = np.asarray(axes).ravel()
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[i].reshape(side, side), cmap="gray_r", vmin=vmin, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if len(titles):
            ax.set_title(titles[i], fontsize=fontsize)


def zoom_window(kl: ArrayLike, zoom: int) -> tuple[int, int]:
    """``zoom`` iterations ``[lo, hi)`` around the widest post-M-step KL of a (t, 2) trace.

    Iteration 0 is skipped (the first M-step's jump would flatten everything else) unless
    the trace has a single iteration.
    """
    kl = np.asarray(kl, np.float64)
    num_iter = kl.shape[0]
    widest = int(np.argmax(kl[1:, 1])) + 1 if num_iter > 1 else 0
    lo = min(max(widest - zoom // 2, 1), max(num_iter - zoom, 0))
    return lo, min(lo + zoom, num_iter)


def em_trace_figure(traces, *, zoom: int = 8, start: int | None = None, title: str = ""):
    """A figure of EM half-step traces, one column per trace (see :func:`half_step_trace`).

    Top row: log p(x) and the ELBO over ``zoom`` iterations (linear scale, where the
    sawtooth shows), from ``start`` or, with ``start=None``, around the widest gap
    (:func:`zoom_window`). Bottom row: the KL after every half-step (:func:`kl_trace`),
    all iterations, the zoomed ones shaded.

    Args:
      traces: mapping from a panel title to ``(log_likelihood, elbo, kl)``, each (t, 2).
      zoom: iterations shown in the top row.
      start: first iteration shown in the top row (None: around the widest gap).
      title: the figure's title.

    Returns:
      The matplotlib figure (write it with :func:`save`).
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, len(traces), figsize=(5.5 * len(traces), 7.5), squeeze=False)
    for col, (name, (ll, elbo, kl)) in enumerate(traces.items()):
        num_iter = np.shape(ll)[0]
        lo, hi = zoom_window(kl, zoom) if start is None else (start, min(start + zoom, num_iter))
        top, bottom = axes[0, col], axes[1, col]
        half_step_trace(top, ll, elbo, start=lo, stop=hi)
        top.set_ylabel("nats per example")
        final = np.asarray(ll)[-1, 1]
        top.set_title(f"{name}\niterations {lo}-{hi - 1}; final log p(x) = {final:.3f}", fontsize=9)
        top.legend(fontsize=8, loc="lower right")
        kl_trace(bottom, kl)
        bottom.axvspan(lo, hi - 0.5, color="0.9", zorder=0, label="zoomed above")
        bottom.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def mixture_ellipses(
    ax, weights: ArrayLike, means: ArrayLike, covariances: ArrayLike, *, annotate=True, **kwargs
) -> None:
    """Draws a 2-D Gaussian mixture: each component's 1σ (solid) and 2σ (dashed) ellipse
    (:func:`covariance_ellipse`, ``kwargs`` to the patches, black by default) and, with
    ``annotate``, its weight ``w=...`` beside the mean. ``covariances`` is (k, 2, 2)."""
    kwargs.setdefault("color", "k")
    for w, m, c in zip(weights, means, covariances, strict=True):
        for num_sigma, ls in ((1, "-"), (2, "--")):
            covariance_ellipse(ax, m, c, num_sigma, ls=ls, **kwargs)
        if annotate:
            ax.annotate(f"w={w:.2f}", m, textcoords="offset points", xytext=(6, 6), fontsize=9)


def image_rows_figure(rows, *, cell: tuple[float, float] = (0.9, 1.0)):
    """A figure of labelled rows of flattened square images (topics, say), one image per axis.

    Args:
      rows: mapping from a row label to its images, shape (num, side**2); every row gets
        as many columns as the first has images. Each image is scaled to its own range.
      cell: (width, height) of one image, in inches.

    Returns:
      The matplotlib figure (write it with :func:`save`).
    """
    first = len(next(iter(rows.values())))
    fig, axes = pyplot().subplots(
        len(rows), first, figsize=(first * cell[0], len(rows) * cell[1]), squeeze=False
    )
    for r, (label, images) in enumerate(rows.items()):
        image_panels(axes[r], images, vmin=None, vmax=None)
        axes[r, 0].set_ylabel(label)
    return fig


def ranked_values_figure(series, *, xlabel: str, ylabel: str, log: bool = True):
    """A figure of several curves of values against their rank (1, 2, ...), e.g. the sorted
    mixture weights of several fits; ``series`` maps a legend label to its values, already
    in rank order. ``log``: a log-scale y axis.

    Returns:
      The matplotlib figure (write it with :func:`save`).
    """
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for label, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, "o-", label=label)
    ax.set(yscale="log" if log else "linear", xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    return fig


def show_images(
    ax,
    images: np.ndarray,
    rows: int | None = None,
    cols: int | None = None,
    *,
    title: str | None = None,
    ylabel: str | None = None,
    row_labels=None,
    col_labels=None,
    background: float = 0.3,
    fontsize: int = 9,
) -> None:
    """Draws flattened square images as one grid on ``ax`` (``gray_r``, values 0 to 1).

    ``rows`` and ``cols`` default to :func:`square_grid`'s layout. With ``ylabel``,
    ``row_labels`` or ``col_labels`` the axis keeps its frame and the labels sit at the
    image centres; otherwise it is switched off.

    Args:
      ax: a matplotlib axis.
      images: shape (num, side**2).
      rows, cols: grid size (both or neither).
      title, ylabel: the axis's title and y-label.
      row_labels, col_labels: one tick label per grid row / column.
      background: value of the borders (see :func:`image_grid`).
      fontsize: of the title.
    """
    images = np.asarray(images)
    if rows is None or cols is None:
        grid = square_grid(images, background=background)
    else:
        grid = image_grid(images, rows, cols, background=background)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
    if title is not None:
        ax.set_title(title, fontsize=fontsize)
    if ylabel is None and row_labels is None and col_labels is None:
        ax.axis("off")
        return
    side = round(math.sqrt(images.shape[-1])) + 1
    for set_ticks, labels in ((ax.set_xticks, col_labels), (ax.set_yticks, row_labels)):
        labels = [] if labels is None else list(labels)
        set_ticks([side * i + side / 2 - 1 for i in range(len(labels))], labels, fontsize=7)
    if ylabel is not None:
        ax.set_ylabel(ylabel, rotation=0, ha="right", va="center")


def train_test_figure(
    rows, x: str, metric: str, *, err: str = "test_stderr", test_label: str = "held out"
):
    """A figure of a training curve (circles) and a held-out curve with error bars
    (squares) from a sweep's rows (dicts, e.g. one per number of states): ``x`` against
    ``train_<metric>`` and ``test_<metric>`` ± ``err``.

    Returns:
      The matplotlib figure (its axis is ``fig.axes[0]``; write it with :func:`save`).
    """
    col = {key: [r[key] for r in rows] for key in (x, f"train_{metric}", f"test_{metric}", err)}
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    ax.plot(col[x], col[f"train_{metric}"], "o-", label="train")
    ax.errorbar(col[x], col[f"test_{metric}"], yerr=col[err], fmt="s-", label=test_label, capsize=3)
    ax.legend()
    return fig


def image_state_strips(images, paths, titles, *, num_states: int, ylabel: str = ""):
    """A figure of 2-D images (top row) above the discrete state of each of their rows
    (bottom row: a coloured strip, each cell numbered), e.g. the Viterbi path of an HMM that
    reads each image row by row.

    Args:
      images: (m, rows, cols).
      paths: (m, rows) integer states in [0, num_states).
      titles: m titles of the images.
      num_states: the number of colours.
      ylabel: label of the first strip.

    Returns:
      The matplotlib figure (write it with :func:`save`).
    """
    plt = pyplot()
    m = len(images)
    fig, axes = plt.subplots(2, m, figsize=(1.3 * m, 3.2), squeeze=False)
    cmap = plt.get_cmap("tab20", num_states)
    for i in range(m):
        axes[0, i].imshow(images[i], cmap="gray_r")
        axes[0, i].set_title(titles[i], fontsize=8)
        strip = np.asarray(paths[i])[:, None]
        axes[1, i].imshow(strip, cmap=cmap, vmin=-0.5, vmax=num_states - 0.5, aspect=0.25)
        for r, s in enumerate(strip[:, 0]):
            axes[1, i].text(0, r, str(s), ha="center", va="center", fontsize=7)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel(ylabel, fontsize=8)
    return fig


def decoded_states_figure(
    x,
    states,
    decoded,
    true_means,
    fitted_means,
    *,
    title: str = "",
    scatter_title: str = "sequence 1 (colour = true state)",
):
    """A figure of one 2-D sequence with known states: left, its points coloured by true
    state with the true (x) and fitted (+) means; right, the true and the decoded state
    against time (the decoded one raised by 0.1 so both show).

    Args:
      x: (t, 2) observations.
      states, decoded: (t,) true and decoded states (decoded in the true labels).
      true_means, fitted_means: (k, 2).
      title: of the right panel; scatter_title: of the left one.

    Returns:
      The matplotlib figure (write it with :func:`save`).
    """
    fig, (a0, a1) = pyplot().subplots(
        1, 2, figsize=(10, 3.5), gridspec_kw=dict(width_ratios=[1, 2])
    )
    a0.scatter(x[:, 0], x[:, 1], c=states, cmap="tab10", vmin=0, vmax=9, s=6)
    a0.scatter(*np.asarray(true_means).T, marker="x", c="k", s=60, label="true means")
    a0.scatter(*np.asarray(fitted_means).T, marker="+", c="r", s=80, label="fitted means")
    a0.legend(fontsize=7)
    a0.set_title(scatter_title, fontsize=9)
    steps = np.arange(np.size(states))
    a1.step(steps, states, where="mid", label="true state")
    a1.step(steps, np.asarray(decoded) + 0.1, where="mid", label="Viterbi (fitted, +0.1)")
    a1.set_title(title, fontsize=9)
    a1.set_xlabel("t")
    a1.set_yticks(np.arange(len(true_means)))
    a1.legend(fontsize=7)
    return fig


def gap_bars(ax, labels, approximation, amortization, closed=None) -> None:
    r"""Stacked bars of an inference-gap split (Cremer et al., 2018), one bar per label:
    the approximation gap (grey) under the amortization gap (red), so each bar's top is
    :math:`\log p(x) - \mathrm{ELBO}(q_\phi)`, with an optional narrow green bar from the
    same base for the part of the amortization gap that a refinement ``closed`` (NaN
    entries are not drawn). A negative approximation gap (rounding) is drawn below zero
    but does not lower the stack.
    """
    approx, amort = np.asarray(approximation, float), np.asarray(amortization, float)
    pos, bottom = np.arange(len(labels)), np.maximum(approx, 0.0)
    ax.bar(pos, approx, color="0.6", label="approximation gap (measured)")
    ax.bar(pos, amort, bottom=bottom, color="C3", label="amortization gap")
    if closed is not None and not np.all(np.isnan(np.asarray(closed, float))):
        label = "closed by the semi-amortized refinement"
        ax.bar(pos, closed, bottom=bottom, color="C2", width=0.4, label=label)
    ax.set_xticks(pos, labels, fontsize=6, rotation=40)
    ax.set_ylim(0.0, 1.4 * max(float(np.max(bottom + amort, initial=0.0)), 1e-12))
    ax.set_ylabel("nats per example")


def time_traces(ax, traces, marks=None) -> None:
    """Draws each ``(time, value)`` trace against time on a log axis (the first point, at
    time 0, is left out), with a dot at ``marks[label]`` (a time) on its trace, e.g. when it
    first came within a tolerance of its final value.

    Args:
      ax: a matplotlib axis.
      traces: mapping from a label to ``(times, values)``, equal lengths, times rising.
      marks: mapping from a label to a time (labels missing: no dot).
    """
    for i, (label, (t, y)) in enumerate(traces.items()):
        t, y = np.asarray(t, float), np.asarray(y, float)
        ax.plot(t[1:], y[1:], color=f"C{i}", label=label, lw=1.5)
        if marks and label in marks:
            hit = min(np.searchsorted(t, marks[label]), len(y) - 1)
            ax.plot([marks[label]], [y[hit]], "o", color=f"C{i}", ms=5)
    ax.set_xscale("log")
