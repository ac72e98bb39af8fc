"""What every tutorial shares: its command-line options, the data, and image figures.

Every tutorial takes ``--data-dir`` (default: $PYRO_VAE_DATA, else ~/.cache/pyro_vae),
``--device`` (auto, cpu, cuda), ``--epochs``, ``--out`` (the folder its figures go to)
and ``--smoke`` (a tiny run, for tests: one epoch on 1 000 MNIST points).
"""

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import pyro

import pyro_vae as pv


def options(doc: str, name: str, epochs: int, extra=()) -> argparse.Namespace:
    """Parse the tutorial's options; ``extra``: (flag, keyword arguments) pairs."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="data root (default: $PYRO_VAE_DATA, else "
                                           "~/.cache/pyro_vae)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--epochs", type=int, default=epochs,
                        help="training epochs (default: %(default)s)")
    parser.add_argument("--out", default=f"runs/{name}", help="folder for the figures")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run: one epoch on 1000 points (for tests)")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    args.device = pv.runs.resolve_device(args.device)
    if args.smoke:
        args.epochs = 1
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(0)
    return args


def mnist(args, binarize: bool = True):
    """MNIST's train (50 000), validation (10 000) and test (10 000) splits on the
    tutorial's device; training batches are binarized afresh each time, validation and
    test once. With ``--smoke``, the first 1 000 / 500 / 500 points."""
    splits = pv.datasets.load("mnist", args.data_dir, binarize=binarize)
    if args.smoke:
        splits = [s.subset(n) for s, n in zip(splits, (1000, 500, 500))]
    return [s.to(args.device) for s in splits]


def save_images(images: torch.Tensor, path, title: str, ncols: int = 10,
                shape=(28, 28)) -> None:
    """A grid of ``(n, 784)`` images, written to ``path``."""
    pv.plots.save_grid(pv.plots.image_grid(images.cpu(), shape, ncols), path, title)


def save_figure(fig, path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
