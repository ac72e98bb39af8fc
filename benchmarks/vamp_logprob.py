"""Time of one SVI step of the VampPrior VAE: pyro_vae's Mixture against MixtureSameFamily.

The VampPrior's log-density is a logsumexp over K = 500 Gaussian components. Inside the
"data" plate, Pyro expands a ``MixtureSameFamily`` to batch x K x z parameters and
computes the log-variances on that grid; ``pyro_vae.priors.Mixture`` broadcasts z against
the K x z parameters as they are. Same network (the paper's gated 784-300-300, z = 40),
same batch (128), same weights.

    python benchmarks/vamp_logprob.py [--steps 60] [--device cpu]
"""

import argparse
import json
import time

import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI

import pyro_vae as pv
from pyro_vae.objectives import make_elbo


class VampMixtureSameFamily(pv.VampPrior):
    """The same prior, returned as torch's MixtureSameFamily."""

    def forward(self, encoder):
        q = encoder(self.pseudo_inputs)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), q)


def time_steps(prior_cls, x, steps, device):
    torch.manual_seed(0)
    prior = prior_cls(40, 784, components=500)
    vae = pv.VAE(784, 40, (300, 300), arch="gated", prior=prior).to(device)
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_elbo("meanfield"))
    with pyro.validation_enabled(False):
        for _ in range(5):
            svi.step(x, num_data=50000)
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps // 3):
                svi.step(x, num_data=50000)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / (steps // 3))
    return best * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.bernoulli(torch.full((128, 784), 0.13, device=device))
    mixture = time_steps(pv.VampPrior, x, args.steps, device)
    same_family = time_steps(VampMixtureSameFamily, x, args.steps, device)
    print(json.dumps({"ms_per_step_mixture": mixture,
                      "ms_per_step_mixture_same_family": same_family,
                      "saved_ms_per_step": same_family - mixture,
                      "device": str(device), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "pyro": pyro.__version__}))


if __name__ == "__main__":
    main()
