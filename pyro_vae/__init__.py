"""Variational autoencoders written the Pyro way.

The generative model p(x, z) is a Pyro ``model``, the amortized encoder q(z|x) a Pyro
``guide``; Pyro's ELBOs give the loss and its gradients (``fit``). The documentation
(``docs/``: a user guide, the tutorials, this reference) gives the tour.
"""

__version__ = "0.1.0"

from . import (checkpoints, compiled, config, contract, datasets, evaluation, guides,
               likelihoods, nn, objectives, plots, priors, runs, semisupervised, train)
from .checkpoints import TrainState, load_checkpoint, read_checkpoint, save_checkpoint
from .contract import LatentVariableModel, PyroModel
from .evaluation import elbo, elbo_surgery, log_likelihood
from .guides import GUIDES, DiagonalNormalEncoder, FullRankNormalEncoder, IAFEncoder
from .likelihoods import LIKELIHOODS, BernoulliLikelihood, GaussianLikelihood
from .models import MODELS, VAE, HierarchicalVAE
from .semisupervised import SemiSupervisedVAE
from .priors import PRIORS, LearnedNormal, Mixture, MixtureOfGaussians, StandardNormal, VampPrior
from .config import TrainConfig
from .runs import RunFolder, load_run, resume_run, save_run, train_run
from .objectives import scale_latents
from .hooks import Checkpointer, EarlyStopping, Hook, KeepBest, MetricsWriter
from .train import Options, Step, Trainer, TrainingDiverged, TrainingInterrupted, fit

__all__ = [
    "VAE", "HierarchicalVAE", "SemiSupervisedVAE", "MODELS", "PyroModel", "LatentVariableModel",
    "fit", "Options", "Trainer", "Step", "TrainState", "TrainingDiverged", "TrainingInterrupted",
    "scale_latents",
    "Hook", "EarlyStopping", "KeepBest", "MetricsWriter", "Checkpointer",
    "elbo", "log_likelihood", "elbo_surgery",
    "train_run", "resume_run", "load_run", "save_run", "RunFolder", "TrainConfig",
    "save_checkpoint", "load_checkpoint", "read_checkpoint",
    "PRIORS", "StandardNormal", "LearnedNormal", "MixtureOfGaussians", "VampPrior", "Mixture",
    "GUIDES", "DiagonalNormalEncoder", "FullRankNormalEncoder", "IAFEncoder",
    "LIKELIHOODS", "BernoulliLikelihood", "GaussianLikelihood",
    "checkpoints", "compiled", "config", "contract", "datasets", "runs", "evaluation", "guides", "likelihoods", "nn",
    "objectives", "plots", "priors", "semisupervised", "train",
]
