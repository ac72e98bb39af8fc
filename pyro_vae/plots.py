"""Matplotlib figures of a trained VAE: samples, reconstructions, ELBO curves; and of a
semi-supervised one: analogies, confusion matrix, error curve."""

from pathlib import Path
from typing import Dict, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; works on machines with no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .checkpoints import atomic_write  # noqa: E402
from .semisupervised import classification_error, confusion_matrix  # noqa: E402


def image_grid(images: torch.Tensor, image_shape: Tuple[int, int], ncols: int) -> torch.Tensor:
    """Tile ``(n, H*W)`` images into one ``(rows*H, ncols*W)`` array, 1-pixel gaps."""
    h, w = image_shape
    n = len(images)
    nrows = -(-n // ncols)
    grid = torch.ones(nrows * (h + 1) - 1, ncols * (w + 1) - 1)
    for i, img in enumerate(images.detach().float().cpu().reshape(n, h, w)):
        r, c = divmod(i, ncols)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
    return grid


def save_figure(fig, path) -> None:
    """Write ``fig`` to ``path`` (PNG, or the format its suffix names) and close it: atomically
    (``atomic_write``: a link at ``path`` is replaced, never written through), and a
    failed write (a full disk) is one line naming the file."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png",
                                                 dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def save_grid(grid, path, title: str, columns: Sequence[str] = (),
              cell_width: int = 0) -> None:
    """Write an ``image_grid`` to ``path`` in gray levels, with ``title``; ``columns``:
    a label above each column of cells ``cell_width`` pixels wide."""
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 25 + 1, grid.shape[0] / 25 + 1))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_yticks([])
    ax.set_xticks([c * (cell_width + 1) + (cell_width - 1) / 2 for c in range(len(columns))],
                  list(columns), fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(fig, path)


def plot_samples(vae, image_shape, path, n: int = 64) -> None:
    """Means of p(x|z) for z drawn from the prior."""
    images = vae.sample(n)
    ncols = int(n ** 0.5)
    save_grid(image_grid(images, image_shape, ncols), path,
               "mean of p(x|z), z ~ p(z)")


def plot_reconstructions(vae, x: torch.Tensor, image_shape, path) -> None:
    """Pairs of rows: data on top, the mean of p(x|z) at z = E[z|x] below."""
    recon = vae.reconstruct(x)
    ncols = min(len(x), 16)
    rows = []
    for i in range(0, len(x), ncols):
        data, back = x[i:i + ncols], recon[i:i + ncols]
        pad = torch.ones(ncols - len(data), x.shape[-1], dtype=x.dtype, device=x.device)
        rows += [torch.cat([data, pad]), torch.cat([back.to(x.dtype), pad])]  # a short pair
    save_grid(image_grid(torch.cat(rows), image_shape, ncols), path,
               "data (odd rows) and reconstructions (even rows)")


def plot_elbo(history: Sequence[Dict], path) -> None:
    """Train and validation ELBO per data point against epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["train_elbo"] for r in history], marker="o", label="train")
    valid = [(r["epoch"], r["valid_elbo"]) for r in history if r.get("valid_elbo") is not None]
    if valid:
        ax.plot(*zip(*valid), marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per data point (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_elbo_surgery(terms: Dict, path) -> None:
    """Bars of the ELBO-surgery terms (Hoffman & Johnson 2016), nats per data point."""
    names = ["reconstruction", "avg_kl", "mutual_information", "marginal_kl", "elbo"]
    labels = ["E log p(x|z)", "avg KL", "I(n; z)", "KL(q(z)||p(z))", "ELBO"]
    values = [terms[n] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, values, color=["C0", "C1", "C2", "C3", "C4"])
    ax.axhline(terms["log_n"], color="gray", linestyle="--", linewidth=1,
               label=f"log N = {terms['log_n']:.2f} (bound on I)")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom" if v >= 0 else "top", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("nats per data point")
    ax.set_title("ELBO = E log p(x|z) − I(n; z) − KL(q(z) || p(z))", fontsize=9)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    save_figure(fig, path)


def plot_analogies(vae, x: torch.Tensor, image_shape, path) -> None:
    """The M2 paper's analogy figure: the first column holds test images; row i then
    decodes image i's style z (the mean of q(z | x, y), y the classifier's label) with
    each label 0, 1, ... in turn."""
    styles = vae.analogies(x)  # (C, B, D)
    c, b = styles.shape[:2]
    rows = torch.cat([x.unsqueeze(0).to(styles.dtype), styles]).transpose(0, 1)
    save_grid(image_grid(rows.reshape((c + 1) * b, -1), image_shape, c + 1), path,
              "each row: a test image, then its style z decoded with label y",
              columns=["x"] + [f"y={y}" for y in range(c)], cell_width=image_shape[1])


def plot_confusion(counts: torch.Tensor, path, title: str = "") -> None:
    """A confusion matrix: row = true label, column = predicted, as counts."""
    c = len(counts)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.imshow(counts.float().log1p().numpy(), cmap="Blues")
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=6,
                    color="white" if i == j else "black")
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xlabel("label of q(y|x)")
    ax.set_ylabel("true label")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_error(history: Sequence[Dict], path, test_error=None) -> None:
    """Validation classification error (%) per epoch, and the final test error."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    valid = [(r["epoch"], r["valid_error"]) for r in history
             if r.get("valid_error") is not None]
    if valid:
        ax.plot(*zip(*valid), marker="o", label="validation")
    if test_error is not None:
        ax.axhline(test_error, color="C1", linestyle="--", label=f"test {test_error:.2f}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("classification error (%)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)


def plot_classifier(vae, test, history: Sequence[Dict], folder) -> None:
    """A semi-supervised run's figures in ``folder``: analogies.png, confusion.png,
    error.png."""
    folder = Path(folder)
    error = classification_error(vae, test)
    plot_analogies(vae, test.x[:10], test.image_shape, folder / "analogies.png")
    plot_confusion(confusion_matrix(vae, test), folder / "confusion.png",
                   f"test set: {error:.2f}% error ({len(test)} points)")
    plot_error(history, folder / "error.png", error)
