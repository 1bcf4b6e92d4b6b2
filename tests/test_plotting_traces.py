"""The EM-trace, ellipse and image-panel figure helpers of emvi.plotting (Agg backend)."""

import math

import numpy as np
import pytest

from emvi import plotting

plt = plotting.pyplot()


def _trace(num_iter, widest):
    """A (t, 2) trace whose post-M-step KL is largest at iteration ``widest``."""
    ll = np.cumsum(np.ones((num_iter, 2)), axis=None).reshape(num_iter, 2) / 10
    kl = np.zeros((num_iter, 2))
    kl[:, 1] = 0.01
    kl[widest, 1] = 0.5
    kl[0, 1] = 9.0  # the first M-step's jump, which zoom_window skips
    return ll, ll - kl, kl


@pytest.mark.parametrize(
    ("num_iter", "widest", "window"),
    [(20, 6, (2, 10)), (20, 1, (1, 9)), (20, 19, (12, 20)), (5, 3, (0, 5)), (1, 0, (0, 1))],
)
def test_zoom_window_centres_on_the_widest_gap_after_the_first_jump(num_iter, widest, window):
    assert plotting.zoom_window(_trace(num_iter, widest)[2], 8) == window


def test_half_step_trace_draws_each_half_step_at_t_and_t_plus_half():
    ll, elbo, _ = _trace(6, 3)
    shift = np.full((6, 2), 0.25)
    fig, ax = plt.subplots()
    plotting.half_step_trace(ax, ll, elbo, start=2, stop=5, shift=shift, label_suffix=" (s)")
    line_ll, line_elbo, e_marks, m_marks = ax.lines
    np.testing.assert_array_equal(line_ll.get_xdata(), [2, 2.5, 3, 3.5, 4, 4.5])
    np.testing.assert_allclose(line_ll.get_ydata(), ll[2:5].ravel() + 0.25, rtol=0, atol=1e-15)
    np.testing.assert_allclose(line_elbo.get_ydata(), elbo[2:5].ravel() + 0.25, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(e_marks.get_xdata(), [2, 3, 4])
    np.testing.assert_array_equal(m_marks.get_xdata(), [2.5, 3.5, 4.5])
    assert line_ll.get_label() == "log p(x) (s)"
    plt.close(fig)
    fig, ax = plt.subplots()
    plotting.half_step_trace(ax, ll, elbo, markers=False)
    assert len(ax.lines) == 2 and len(ax.lines[0].get_xdata()) == 12
    plt.close(fig)


def test_kl_trace_floors_rounding_and_draws_absolute_e_step_values():
    kl = np.array([[-1e-20, 0.3], [2e-16, 0.0], [-5e-15, 1e-3]])
    fig, ax = plt.subplots()
    plotting.kl_trace(ax, kl, floor=1e-17)
    m_line, e_line = ax.lines
    np.testing.assert_array_equal(m_line.get_xdata(), [0.5, 1.5, 2.5])
    np.testing.assert_array_equal(m_line.get_ydata(), [0.3, 1e-17, 1e-3])
    np.testing.assert_array_equal(e_line.get_ydata(), [1e-17, 2e-16, 5e-15])
    assert ax.get_yscale() == "log"
    plt.close(fig)


def test_covariance_ellipse_has_the_eigen_axes_and_passes_through_mahalanobis_radius():
    theta = math.radians(30)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rot @ np.diag([4.0, 1.0]) @ rot.T
    mean = np.array([1.0, -2.0])
    fig, ax = plt.subplots()
    patch = plotting.covariance_ellipse(ax, mean.tolist(), cov, 2, color="k")  # lists, ints too
    assert patch.width == pytest.approx(8.0) and patch.height == pytest.approx(4.0)
    assert patch.angle % 180 == pytest.approx(30.0)
    assert not patch.get_fill()
    # Every vertex of the drawn outline lies at Mahalanobis distance 2 from the mean
    # (matplotlib approximates the ellipse by Bezier curves through these points).
    verts = patch.get_patch_transform().transform(patch.get_path().vertices[::3])
    d = verts - mean
    maha = np.sqrt(np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d))
    np.testing.assert_allclose(maha, 2.0, rtol=1e-6)
    plt.close(fig)


def test_image_panels_draws_each_image_and_switches_off_the_rest():
    images = np.arange(3 * 16, dtype=float).reshape(3, 16)
    fig, axes = plt.subplots(2, 2)
    plotting.image_panels(axes, images, ["a", "b", "c"], vmax=47)
    flat = axes.ravel()
    for i in range(3):
        np.testing.assert_array_equal(flat[i].images[0].get_array(), images[i].reshape(4, 4))
        assert flat[i].get_title() == "abc"[i] and not flat[i].get_xticks().size
    assert not flat[3].axison and not flat[3].images
    plt.close(fig)


def test_em_trace_figure_has_one_column_per_trace_and_shades_the_zoom(tmp_path):
    # Lists, as read back from results.json, are accepted as well as arrays.
    traces = {"first": _trace(20, 6), "second": tuple(a.tolist() for a in _trace(12, 4))}
    fig = plotting.em_trace_figure(traces, zoom=4, title="t")
    axes = np.array(fig.axes).reshape(2, 2)
    assert axes[0, 0].get_title().startswith("first\niterations 4-7")
    assert axes[0, 1].get_title().startswith("second\niterations 2-5")
    assert axes[1, 0].get_yscale() == "log" and len(axes[1, 0].patches) == 1  # the shading
    fig = plotting.em_trace_figure(traces, zoom=4, start=0)
    assert fig.axes[0].get_title().startswith("first\niterations 0-3")
    assert plotting.save(fig, tmp_path / "f.png").stat().st_size > 0


def test_mixture_ellipses_draws_two_ellipses_per_component_and_the_weights():
    weights = np.array([0.25, 0.75])
    means = np.array([[0.0, 0.0], [3.0, 1.0]])
    covs = np.stack([np.eye(2), np.diag([4.0, 1.0])])
    fig, ax = plt.subplots()
    plotting.mixture_ellipses(ax, weights, means, covs, lw=0.8)
    assert len(ax.patches) == 4 and [t.get_text() for t in ax.texts] == ["w=0.25", "w=0.75"]
    # Component 1 at 2 sigma: axes 2 * 2 * sqrt(4) = 8 and 2 * 2 * 1 = 4, dashed.
    assert (ax.patches[3].width, ax.patches[3].height) == pytest.approx((8.0, 4.0))
    assert ax.patches[3].get_linestyle() == "--" and ax.patches[2].get_linestyle() == "-"
    plotting.mixture_ellipses(ax, weights, means, covs, annotate=False, color="0.6")
    assert len(ax.patches) == 8 and len(ax.texts) == 2
    plt.close(fig)
