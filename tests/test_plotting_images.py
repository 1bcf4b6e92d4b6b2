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
