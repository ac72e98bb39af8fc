import torch

from pyro_vae import VAE, plots


def test_image_grid_tiles_row_major_with_gaps():
    images = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4) / 100
    grid = plots.image_grid(images, (2, 2), ncols=4)
    assert grid.shape == (2 * 3 - 1, 4 * 3 - 1)
    assert torch.equal(grid[0:2, 0:2], images[0].reshape(2, 2))
    assert torch.equal(grid[0:2, 3:5], images[1].reshape(2, 2))
    assert torch.equal(grid[3:5, 0:2], images[4].reshape(2, 2))
    assert torch.all(grid[2, :] == 1) and torch.all(grid[3:5, 6:] == 1)  # gap and padding


def test_figures_are_written(tmp_path):
    vae = VAE(16, 2, (8,))
    plots.plot_samples(vae, (4, 4), tmp_path / "s.png", n=9)
    plots.plot_reconstructions(vae, torch.rand(5, 16), (4, 4), tmp_path / "r.png")
    plots.plot_elbo([{"epoch": 1, "train_elbo": -3.0, "valid_elbo": -2.5},
                     {"epoch": 2, "train_elbo": -2.0, "valid_elbo": None}], tmp_path / "e.png")
    for name in ("s.png", "r.png", "e.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
