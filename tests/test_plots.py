import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from pyro_vae import VAE, plots

# A rendered gray level is the colormap's (256 levels) written as 8 bits: within 2 / 255.
GRAY_TOL = 2 / 255


def test_image_grid_tiles_row_major_with_gaps():
    images = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4) / 100
    grid = plots.image_grid(images, (2, 2), ncols=4)
    assert grid.shape == (2 * 3 - 1, 4 * 3 - 1)
    assert torch.equal(grid[0:2, 0:2], images[0].reshape(2, 2))
    assert torch.equal(grid[0:2, 3:5], images[1].reshape(2, 2))
    assert torch.equal(grid[3:5, 0:2], images[4].reshape(2, 2))
    assert torch.all(grid[2, :] == 1) and torch.all(grid[3:5, 6:] == 1)  # gap and padding


def _expected_grid(rows, image_shape, ncols):
    """The picture ``image_grid`` is documented to draw, built independently: ``rows`` of
    images (each row at most ``ncols``), h x w cells, 1-pixel white gaps, white where a
    row has no image."""
    h, w = image_shape
    grid = np.ones((len(rows) * (h + 1) - 1, ncols * (w + 1) - 1))
    for r, row in enumerate(rows):
        assert len(row) <= ncols
        for c, img in enumerate(row):
            grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = \
                np.asarray(img, dtype=float).reshape(h, w)
    return grid


def _bands(mask):
    """(start, end) of each run of True in a 1-d boolean array, end exclusive."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _longest_run(mask):
    """Longest run of True along each row of a 2-d boolean array."""
    return np.array([max([e - s for s, e in _bands(row)], default=0) for row in mask])


def _read_grid(path, image_shape, nrows, ncols):
    """Read a PNG written by ``save_grid`` and return the gray level at the centre of each
    grid pixel, as an array of the grid's shape.

    Every image cell of the grid must be darker than 0.9 somewhere in each grid row and
    column of cells. Rows of the PNG crossing a cell have a run of non-white pixels as
    long as a cell is wide, which the title's glyphs never have; the grid's rows of cells
    are those rows, its columns of cells are where those rows are non-white. Asserts
    there are ``nrows`` x ``ncols`` of them, the size of a cell follows ``image_shape``,
    and the pixels are square (the same scale across and down)."""
    png = mpimg.imread(path)
    assert png.dtype == np.float32 and png.shape[2] in (3, 4)
    assert np.array_equal(png[..., 0], png[..., 1]) and np.array_equal(png[..., 0], png[..., 2])
    gray = png[..., 0]
    dark = gray < 0.9
    runs = _longest_run(dark)
    row_bands = _bands(runs >= 0.5 * runs.max())
    assert len(row_bands) == nrows, row_bands
    top, bottom = row_bands[0][0], row_bands[-1][1]
    col_bands = _bands(dark[top:bottom].any(axis=0))
    assert len(col_bands) == ncols, col_bands
    left, right = col_bands[0][0], col_bands[-1][1]
    h, w = image_shape
    grid_h, grid_w = nrows * (h + 1) - 1, ncols * (w + 1) - 1
    sy, sx = (bottom - top) / grid_h, (right - left) / grid_w  # PNG pixels per grid pixel
    assert sx > 3 and sy == pytest.approx(sx, rel=0.03)
    assert all(abs((e - s) - h * sy) <= 1.5 for s, e in row_bands)
    assert all(abs((e - s) - w * sx) <= 1.5 for s, e in col_bands)
    ys = (top + (np.arange(grid_h) + 0.5) * sy).astype(int)
    xs = (left + (np.arange(grid_w) + 0.5) * sx).astype(int)
    return gray[np.ix_(ys, xs)], gray[:top]


def test_a_grid_of_known_images_is_drawn_cell_by_cell(tmp_path):
    """Six 3 x 6 images of constant gray (0, 0.5, 1 / 0.25, 1, 0) in 3 columns: the PNG
    shows 2 x 3 cells of 6:3 shape, each of its level (black 0, white 1, vmin 0 and vmax
    1 fixed: 0.5 is mid-gray, not stretched), white gaps, and the title above."""
    levels = [0.0, 0.5, 1.0, 0.25, 1.0, 0.0]
    images = torch.tensor(levels)[:, None].expand(6, 18)
    grid = plots.image_grid(images, (3, 6), ncols=3)
    plots.save_grid(grid, tmp_path / "g.png", "six known images")
    seen, above = _read_grid(tmp_path / "g.png", (3, 6), nrows=2, ncols=3)
    expected = _expected_grid([images[:3], images[3:]], (3, 6), 3)
    assert np.abs(seen - expected).max() <= GRAY_TOL
    cells = seen[[1, 1, 1, 5, 5, 5], [2, 9, 16, 2, 9, 16]]  # a pixel inside each cell
    assert cells == pytest.approx(levels, abs=GRAY_TOL)
    assert (above < 0.5).sum() > 20  # the title's glyphs


def test_plot_samples_draws_the_models_samples_in_a_square_grid(tmp_path):
    """plot_samples(n=9) of 4 x 4 images: 3 x 3 cells, each the mean of p(x|z) of the
    sample drawn with the same seed, pixel by pixel. The decoder's output layer is set so
    that every level lies in (0.1, 0.9), darker than the background."""
    torch.manual_seed(0)
    vae = VAE(16, 2, (8,))
    with torch.no_grad():
        vae.decoder[-1].weight.mul_(2.0)
        vae.decoder[-1].bias.zero_()
    torch.manual_seed(1)
    expected = vae.sample(9)
    assert 0.1 < expected.min() and expected.max() < 0.9 and expected.std() > 0.05
    torch.manual_seed(1)
    plots.plot_samples(vae, (4, 4), tmp_path / "s.png", n=9)
    seen, above = _read_grid(tmp_path / "s.png", (4, 4), nrows=3, ncols=3)
    rows = [expected[0:3], expected[3:6], expected[6:9]]
    assert np.abs(seen - _expected_grid(rows, (4, 4), 3)).max() <= GRAY_TOL
    assert (above < 0.5).sum() > 20


@pytest.mark.parametrize("n", [
    5, 32,
    # 20: the last, short pair of rows is padded, not run together (a bug once).
    20,
])
def test_plot_reconstructions_pairs_data_rows_with_reconstruction_rows(tmp_path, n):
    """n points of 4 x 8 images, at most 16 per row: a row of data, then the row of their
    reconstructions (``vae.reconstruct``), and so on, white padding after a short pair;
    checked pixel by pixel."""
    torch.manual_seed(0)
    vae = VAE(32, 2, (8,))
    with torch.no_grad():
        vae.decoder[-1].bias.uniform_(0.5, 1.5)
    x = 0.05 + 0.3 * torch.rand(n, 32)  # data in (0.05, 0.35): distinct from the
    recon = vae.reconstruct(x)          # reconstructions, in (0.45, 0.9)
    assert 0.45 < recon.min() and recon.max() < 0.9 and recon.std() > 0.03
    plots.plot_reconstructions(vae, x, (4, 8), tmp_path / "r.png")
    ncols = min(n, 16)
    rows = []
    for i in range(0, n, ncols):
        rows += [x[i:i + ncols], recon[i:i + ncols]]
    seen, _ = _read_grid(tmp_path / "r.png", (4, 8), nrows=len(rows), ncols=ncols)
    assert np.abs(seen - _expected_grid(rows, (4, 8), ncols)).max() <= GRAY_TOL


def _draw_elbo(history, path, monkeypatch):
    """Run plot_elbo, keeping its figure (pyplot.close is intercepted) and the PNG."""
    import matplotlib.pyplot as plt

    figures = []
    with monkeypatch.context() as patch:
        patch.setattr(plots.plt, "close", lambda fig=None: figures.append(fig))
        plots.plot_elbo(history, path)
    assert len(figures) == 1
    fig = figures[0]
    axes = fig.axes
    png = mpimg.imread(path)
    plt.close(fig)
    return axes, png


def _pixels_of(png, color, tol=0.06):
    """How many pixels have this RGB colour."""
    return int((np.abs(png[..., :3] - np.array(color)).max(axis=-1) < tol).sum())


C0, C1 = (0x1f / 255, 0x77 / 255, 0xb4 / 255), (0xff / 255, 0x7f / 255, 0x0e / 255)


def test_plot_elbo_draws_the_history(tmp_path, monkeypatch):
    """The train curve has a point per epoch, the validation curve one per validated
    epoch (epoch 3 has none); both appear in the PNG in their colours. A history with no
    validation draws the train curve alone: no orange anywhere in its PNG."""
    history = [{"epoch": 1, "train_elbo": -3.0, "valid_elbo": -2.5},
               {"epoch": 2, "train_elbo": -2.0, "valid_elbo": -1.5},
               {"epoch": 3, "train_elbo": -1.0, "valid_elbo": None}]
    (ax,), png = _draw_elbo(history, tmp_path / "e.png", monkeypatch)
    train, valid = ax.get_lines()
    assert train.get_xydata().tolist() == [[1, -3.0], [2, -2.0], [3, -1.0]]
    assert valid.get_xydata().tolist() == [[1, -2.5], [2, -1.5]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "ELBO per data point (nats)")
    assert _pixels_of(png, C0) > 50 and _pixels_of(png, C1) > 50

    alone = [dict(r, valid_elbo=None) for r in history]
    (ax,), png = _draw_elbo(alone, tmp_path / "t.png", monkeypatch)
    (train,) = ax.get_lines()
    assert train.get_xydata().tolist() == [[1, -3.0], [2, -2.0], [3, -1.0]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train"]
    assert _pixels_of(png, C0) > 50 and _pixels_of(png, C1) == 0


def test_plot_analogies_labels_its_columns(tmp_path, monkeypatch):
    """analogies.png: a row per test image, its columns labelled: the image (x), then its
    style decoded with each label (y=0, y=1, ...), each label centred over its column."""
    import matplotlib.pyplot as plt

    from pyro_vae import SemiSupervisedVAE

    torch.manual_seed(0)
    vae = SemiSupervisedVAE(16, z_dim=2, hidden=(8,), num_classes=3)
    x = torch.bernoulli(torch.full((4, 16), 0.5))
    figures = []
    with monkeypatch.context() as patch:
        patch.setattr(plots.plt, "close", lambda fig=None: figures.append(fig))
        plots.plot_analogies(vae, x, (4, 4), tmp_path / "a.png")
    (ax,) = figures[0].axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["x", "y=0", "y=1", "y=2"]
    assert list(ax.get_xticks()) == [1.5, 6.5, 11.5, 16.5]  # centres of 4-pixel cells
    assert ax.get_images()[0].get_array().shape == (4 * 5 - 1, 4 * 5 - 1)
    plt.close(figures[0])
    seen, _ = _read_grid(tmp_path / "a.png", (4, 4), nrows=4, ncols=4)
    assert np.abs(seen[:, :4] - plots.image_grid(x, (4, 4), 1).numpy()).max() <= GRAY_TOL
