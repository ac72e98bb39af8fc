"""Where compiling can and cannot help a step of the tutorial MLP VAE (784-400-50, batch
128, meanfield ELBO), in milliseconds, medians of interleaved rounds:

- ``whole_loss``: one training step with Pyro's whole ``differentiable_loss`` under
  ``torch.compile`` (Dynamo breaks the graph at Pyro's handlers; their count is printed)
  against the same step eager;
- ``fixed_cost``: one eager ``fit`` step of a 784-4-2 network, whose matrix products are
  negligible: what a step costs beyond the networks (Pyro's tracing, the 784-pixel
  Bernoulli density, autograd, the update);
- ``bernoulli_density``: the Bernoulli log-density of 100 x 40 latent samples over 784
  pixels (one chunk of the log-likelihood estimator), eager and compiled.

    python benchmarks/compile_parts.py [--threads 1] [--rounds 7]
"""

import argparse
import json
import statistics
import time

import torch

import pyro

import pyro_vae as pv
from pyro_vae.likelihoods import _bernoulli_log_prob
from pyro_vae.step import Step, _Loss, make_optimizer


def _step(vae, x, loss=None):
    params = dict(vae.named_parameters())
    step = Step(vae, pv.objectives.make_elbo("meanfield", 1), params,
                make_optimizer("adam", params.values()))
    if loss is not None:
        step.loss = loss
    return lambda: step((x,), check=False, num_data=50000)


def _medians(fns, rounds, calls):
    for f in fns.values():  # compile, allocate
        f(), f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                f()
            times[k].append((time.perf_counter() - start) / calls * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(128, 784))
    eager, whole = pv.VAE(784, 50, (400,)), pv.VAE(784, 50, (400,))
    whole.load_state_dict(eager.state_dict())
    compiled_loss = torch.compile(_Loss(whole, whole.model,
                                        pv.objectives.make_elbo("meanfield", 1)))
    steps = _medians({"eager": _step(eager, x), "compiled": _step(whole, x, compiled_loss),
                      "fixed_cost": _step(pv.VAE(784, 2, (4,)), x)}, args.rounds, 30)
    from torch._dynamo.utils import counters
    breaks = sum(counters["graph_break"].values())
    logits, value = torch.randn(100, 40, 784) * 3, torch.rand(40, 784).round()
    compiled_density = torch.compile(_bernoulli_log_prob, dynamic=False)
    with torch.no_grad():
        density = _medians({"eager": lambda: _bernoulli_log_prob(logits, value),
                            "compiled": lambda: compiled_density(logits, value)},
                           args.rounds, 10)
    print(json.dumps({
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "whole_loss_ms": {"eager": steps["eager"], "compiled": steps["compiled"],
                          "ratio": steps["compiled"] / steps["eager"],
                          "graph_breaks": breaks},
        "fixed_cost_ms": steps["fixed_cost"],
        "bernoulli_density_ms": {**density, "ratio": density["compiled"] / density["eager"]},
    }, indent=1))


if __name__ == "__main__":
    main()
