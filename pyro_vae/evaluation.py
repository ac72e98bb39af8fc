"""Evaluation of trained VAEs."""

from typing import Optional

import torch

import pyro

from .objectives import make_elbo


@torch.no_grad()
def elbo(vae, data, loss: str = "meanfield", num_particles: int = 1,
         batch_size: int = 1000, seed: Optional[int] = None, beta: float = 1.0) -> float:
    """The ELBO per data point (nats), averaged over ``data`` (a ``TensorDataset``).

    Computed by Pyro's ELBO ``.loss`` under ``no_grad`` (what ``SVI.evaluate_loss`` does),
    never by ``SVI.step``, so no parameter moves. ``seed`` fixes the Monte Carlo draws.
    ``loss="iwae"`` gives the IWAE bound with ``num_particles`` samples. ``beta`` weights
    the KL term: ``beta=0`` gives the reconstruction term E_q[log p(x|z)] alone.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    objective = make_elbo(loss, num_particles)
    was_training = vae.training
    vae.eval()
    total = 0.0
    try:
        for xb in data.batches(batch_size, shuffle=False):
            # num_data=None: the loss is the plain sum over the batch.
            total += objective.loss(vae.model, vae.guide, xb, beta=beta)
    finally:
        vae.train(was_training)
    return -total / len(data)
