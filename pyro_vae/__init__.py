"""Variational autoencoders written the Pyro way.

The generative model p(x, z) is a Pyro ``model``, the amortized encoder q(z|x) a Pyro
``guide``; Pyro's ELBOs give the loss and its gradients (``fit``). See README.md for a
tour, and tutorials/ for lessons.
"""

__version__ = "0.1.0"

from . import datasets, evaluation, guides, likelihoods, nn, objectives, plots, priors
from .evaluation import elbo
from .guides import GUIDES, DiagonalNormalEncoder, FullRankNormalEncoder, IAFEncoder
from .likelihoods import LIKELIHOODS, BernoulliLikelihood, GaussianLikelihood
from .models import MODELS, VAE, HierarchicalVAE
from .priors import PRIORS, LearnedNormal, Mixture, MixtureOfGaussians, StandardNormal, VampPrior
from .runs import TrainConfig, load_run, resume_run, train_run
from .train import fit, load_checkpoint, read_checkpoint, save_checkpoint

__all__ = [
    "VAE", "HierarchicalVAE", "MODELS", "fit", "elbo", "train_run", "resume_run", "load_run", "TrainConfig",
    "save_checkpoint", "load_checkpoint", "read_checkpoint",
    "PRIORS", "StandardNormal", "LearnedNormal", "MixtureOfGaussians", "VampPrior", "Mixture",
    "GUIDES", "DiagonalNormalEncoder", "FullRankNormalEncoder", "IAFEncoder",
    "LIKELIHOODS", "BernoulliLikelihood", "GaussianLikelihood",
    "datasets", "evaluation", "guides", "likelihoods", "nn", "objectives", "plots", "priors",
]
