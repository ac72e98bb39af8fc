"""Tutorial 2: plug in your own likelihood and prior.

Run it:   python tutorials/02_your_own_parts.py [--epochs 30] [--out runs/tutorial02]

A VAE of this package is assembled from small parts with fixed contracts
(see the module docstrings of pyro_vae/likelihoods.py, priors.py, guides.py):

- likelihood head: ``head(decoder_features) -> Distribution`` with event shape (x_dim,)
- prior:           ``prior(encoder) -> Distribution`` with event shape (z_dim,)
- guide family:    ``encoder(x) -> Distribution`` with batch (B,) and event (z_dim,)

Here we write two parts of our own:

1. A continuous Bernoulli likelihood (Loaiza-Ganem & Cunningham 2019), whose support is
   the whole interval [0, 1]: gray images can be modelled as they are, no binarization.
2. A heavy-tailed Student-t prior. It has no closed-form KL against the Gaussian guide,
   so ``TraceMeanField_ELBO`` falls back to a one-sample Monte Carlo KL: pyro_vae logs it.
"""

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

import pyro
import pyro.distributions as dist

import pyro_vae as pv

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--out", default="runs/tutorial02")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
pyro.set_rng_seed(0)


class ContinuousBernoulliLikelihood(nn.Module):
    """p(x|z) = prod_d ContinuousBernoulli(x_d; logits f_d(z)), for x in [0, 1]."""

    def __init__(self, x_dim):
        super().__init__()
        self.x_dim = x_dim

    def forward(self, logits):
        return dist.ContinuousBernoulli(logits=logits).to_event(1)

    def check(self, x, what="data"):  # called by fit() before training
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"continuous Bernoulli needs x in [0, 1]; {what} is not")


class StudentTPrior(nn.Module):
    """p(z) = prod_k StudentT(z_k; df, 0, 1): heavier tails than N(0, I)."""

    def __init__(self, z_dim, df=4.0):
        super().__init__()
        self.register_buffer("df", torch.full((z_dim,), df))  # buffers follow .to(device)
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self, encoder=None):
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


# Registering by name makes the part available wherever names are accepted.
pv.LIKELIHOODS["continuous_bernoulli"] = ContinuousBernoulliLikelihood
pv.PRIORS["student_t"] = StudentTPrior

# Gray digits, not binarized: the continuous Bernoulli takes them as they are.
train, valid, test = pv.datasets.load("digits", binarize=False)
vae = pv.VAE(x_dim=64, z_dim=8, hidden=(128,), likelihood="continuous_bernoulli",
             prior="student_t")

# The built-in Bernoulli head refuses gray data with a clear message:
try:
    pv.fit(pv.VAE(64, 8, (128,)), train, epochs=1, progress=False)
except ValueError as e:
    print(f"Bernoulli on gray data -> ValueError: {e}")

# Watch the log: the mean-field ELBO has no closed-form KL(Normal || StudentT).
history = pv.fit(vae, train, valid, epochs=args.epochs, loss="meanfield", batch_size=64,
                 lr=3e-3, progress=False)
print(f"after {args.epochs} epochs: valid ELBO {history[-1]['valid_elbo']:.2f} nats "
      f"(a density on [0, 1]^64, so it can be positive)")

pv.plots.plot_samples(vae, train.image_shape, out / "samples.png")
pv.plots.plot_reconstructions(vae, test.x[:32], train.image_shape, out / "reconstructions.png")
print(f"figures in {out}/")
