"""The sweep-curve and state-sequence figure helpers of emvi.plotting (Agg backend)."""

import numpy as np

from emvi import plotting


def test_train_test_figure_draws_both_curves_from_the_rows():
    rows = [dict(states=k, train_ll=-k, test_ll=-2.0 * k, test_stderr=0.1 * k) for k in (1, 2, 4)]
    fig = plotting.train_test_figure(rows, "states", "ll", test_label="held out (3)")
    ax = fig.axes[0]
    train, test = ax.get_lines()[:2]
    np.testing.assert_array_equal(train.get_xdata(), [1, 2, 4])
    np.testing.assert_array_equal(train.get_ydata(), [-1, -2, -4])
    np.testing.assert_array_equal(test.get_ydata(), [-2.0, -4.0, -8.0])
    # the error bars span test ± stderr
    segs = ax.collections[0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segs], [[-2.1, -1.9], [-4.2, -3.8], [-8.4, -7.6]])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "held out (3)"]
    plotting.pyplot().close(fig)


def test_image_state_strips_numbers_every_row():
    images = np.zeros((3, 4, 5))
    paths = np.array([[0, 1, 1, 2], [2, 2, 0, 0], [1, 0, 2, 1]])
    fig = plotting.image_state_strips(images, paths, ["a", "b", "c"], num_states=3, ylabel="s")
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["a", "b", "c"]
    for i, ax in enumerate(axes[1]):
        assert [t.get_text() for t in ax.texts] == [str(s) for s in paths[i]]
        np.testing.assert_array_equal(ax.images[0].get_array()[:, 0], paths[i])
    assert axes[1, 0].get_ylabel() == "s"
    plotting.pyplot().close(fig)


def test_decoded_states_figure_shows_truth_and_decoding():
    rng = np.random.default_rng(0)
    z = rng.integers(0, 3, 30)
    decoded = np.where(rng.uniform(size=30) < 0.9, z, (z + 1) % 3)
    means = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    fig = plotting.decoded_states_figure(
        rng.normal(size=(30, 2)), z, decoded, means, means + 0.1, title="acc"
    )
    scatter_ax, path_ax = fig.axes
    assert len(scatter_ax.collections) == 3  # points, true means, fitted means
    np.testing.assert_allclose(scatter_ax.collections[2].get_offsets(), means + 0.1)
    true_line, decoded_line = path_ax.get_lines()
    np.testing.assert_array_equal(true_line.get_ydata(), z)
    np.testing.assert_allclose(decoded_line.get_ydata(), decoded + 0.1)
    np.testing.assert_array_equal(path_ax.get_yticks(), [0, 1, 2])
    assert path_ax.get_title() == "acc"
    plotting.pyplot().close(fig)
