"""What every tutorial shares: its command-line options, the data, and image figures.

Every tutorial takes ``--data-dir`` (default: $PYRO_VAE_DATA, else ~/.cache/pyro_vae),
``--device`` (auto, cpu, cuda), ``--epochs``, ``--out`` (the folder its figures go to)
and ``--smoke`` (a tiny run, for tests: one epoch on 1 000 MNIST points; tutorial 12, on
Frey Faces, takes 500).
"""

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import pyro

import pyro_vae as pv


def options(doc: str, name: str, epochs: int, extra=()) -> argparse.Namespace:
    """Parse the tutorial's options; ``extra``: (flag, keyword arguments) pairs."""
    # Under sphinx-gallery (the docs build) the docstring is the page, and __doc__ is "".
    parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0] or None,
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
    args.device = pv.config.resolve_device(args.device)
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


def frey(args):
    """Frey Faces' train (1 565), validation (200) and test (200) splits, gray 28 x 20
    images with values k / 255, on the tutorial's device. The file is not downloaded: put
    ``frey-faces/freyfaces_uint8_1965x560.npy`` in the data folder. With ``--smoke``,
    the first 500 / 100 / 100 points."""
    splits = pv.datasets.load("frey-faces", args.data_dir, binarize=False)
    if args.smoke:
        splits = [s.subset(n) for s, n in zip(splits, (500, 100, 100))]
    return [s.to(args.device) for s in splits]


def save_images(images: torch.Tensor, path, title: str, ncols: int = 10,
                shape=(28, 28)) -> None:
    """A grid of ``(n, 784)`` images, written to ``path``."""
    pv.plots.save_grid(pv.plots.image_grid(images.cpu(), shape, ncols), path, title)


def save_figure(fig, path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


PRIOR_MODELS = {  # name -> prior and its options (tutorials 4 and 5)
    "standard normal": ("normal", {}),
    "mixture of Gaussians": ("mog", {"components": 10}),
    "VampPrior": ("vamp", {"components": 500}),
}


def prior_models(args, train, valid, folder=None) -> dict:
    """The three VAEs of tutorials 4 and 5: one network (784-300-40 MLP), three priors,
    the same initial weights, data and epochs. Loaded from ``folder`` where tutorial 4
    saved them, else trained (and saved to ``args.out``)."""
    models = {}
    for name, (prior, options) in PRIOR_MODELS.items():
        if args.smoke and prior == "vamp":
            options = {"components": 50}
        torch.manual_seed(0)
        vae = pv.VAE(784, 40, (300,), prior=prior, prior_options=options).to(args.device)
        file_name = prior + ".pt"
        saved = Path(folder) / file_name if folder else None
        if saved is not None and saved.exists():
            pv.load_checkpoint(saved, vae, map_location=args.device)
            print(f"{name}: loaded {saved}")
        else:
            history = pv.fit(vae, train, valid, epochs=args.epochs, lr=1e-3,
                             progress=False)
            print(f"{name}: valid ELBO {history[-1]['valid_elbo']:.2f} after "
                  f"{args.epochs} epochs ({history[-1]['seconds']:.1f} s per epoch)")
            pv.save_checkpoint(args.out / file_name, vae)
        vae.eval()
        models[name] = vae
    return models
