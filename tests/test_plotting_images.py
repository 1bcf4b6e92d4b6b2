"""emvi.plotting.show_images: the grid drawn is image_grid's, labels at image centres."""

import numpy as np

from emvi import plotting


def test_show_images_draws_the_image_grid_and_places_labels_at_centres():
    plt = plotting.pyplot()
    images = np.random.default_rng(0).random((6, 16))  # six 4x4 images
    fig, (a, b) = plt.subplots(1, 2)
    plotting.show_images(a, images, title="t")
    np.testing.assert_array_equal(a.images[0].get_array(), plotting.square_grid(images))
    assert a.get_title() == "t" and not a.axison
    plotting.show_images(b, images, 2, 3, row_labels=["r0", "r1"], col_labels=["a", "b", "c"])
    np.testing.assert_array_equal(b.images[0].get_array(), plotting.image_grid(images, 2, 3))
    assert b.axison
    # Image i of a row starts at 5 i (4 pixels and a border): its centre is at 5 i + 1.5.
    np.testing.assert_allclose(b.get_xticks(), [1.5, 6.5, 11.5])
    np.testing.assert_allclose(b.get_yticks(), [1.5, 6.5])
    assert [t.get_text() for t in b.get_yticklabels()] == ["r0", "r1"]
    plt.close(fig)


def test_gap_bars_stack_the_amortization_gap_on_the_approximation_gap():
    plt = plotting.pyplot()
    fig, ax = plt.subplots()
    plotting.gap_bars(ax, ["a", "b"], [0.5, -1e-9], [1.0, 2.0], [0.25, np.nan])
    approx, amort, closed = (list(c) for c in ax.containers)
    assert [p.get_height() for p in approx] == [0.5, -1e-9]
    # The stack starts at max(approximation, 0): a negative rounding gap does not lower it.
    assert [(p.get_y(), p.get_height()) for p in amort] == [(0.5, 1.0), (0.0, 2.0)]
    assert closed[0].get_y() == 0.5 and closed[0].get_height() == 0.25
    assert ax.get_ylim() == (0.0, 1.4 * 2.0)
    plt.close(fig)


def test_time_traces_drop_time_zero_and_mark_the_given_time():
    plt = plotting.pyplot()
    fig, ax = plt.subplots()
    t, y = [0.0, 1.0, 2.0, 3.0], [-5.0, -2.0, -1.5, -1.4]
    plotting.time_traces(ax, {"em": (t, y)}, {"em": 2.0})
    line, dot = ax.lines
    np.testing.assert_array_equal(line.get_xdata(), t[1:])
    assert list(dot.get_xdata()) == [2.0] and list(dot.get_ydata()) == [-1.5]
    assert ax.get_xscale() == "log"
    plt.close(fig)
