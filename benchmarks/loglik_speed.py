"""Seconds to estimate log p(x) by importance sampling, against bare matrix products.

Times ``pyro_vae.evaluation.log_likelihood`` with S samples on the first ``--limit`` test
points of a run folder and extrapolates to the whole test set (10 000 MNIST points). Two
references do the same number of decoder passes (N x S latent rows) and encoder passes
(N data rows), in the same blocks as the estimator:

- ``bare_matmul``: every ``nn.Linear`` weight as a bare matrix product, with no bias,
  activation, distribution or Pyro bookkeeping (``ratio``);
- ``network_forward``: the encoder and decoder modules themselves (biases, gates,
  activations) in plain PyTorch, without the likelihood, the prior or Pyro
  (``ratio_to_network_forward``).

The estimator does more than either: the likelihood's log-density over every pixel and
the prior's over every sample (for the VampPrior, a K-component mixture).

With ``--compile`` the estimator also runs compiled (``log_likelihood(...,
compile=True)``), interleaved with the others, and the speed-up over the eager estimator
is printed. The first compiled call compiles (the model keeps what was compiled), so with
``--repeat`` 2 or more the minimum leaves compiling out.

    python benchmarks/loglik_speed.py RUN_FOLDER [--limit 200] [--repeat 3] [--device cpu]
        [--compile [--precision bf16]]
"""

import argparse
import json
import time

import torch
from torch import nn

import pyro

import pyro_vae as pv
from pyro_vae.compiled import PRECISIONS
from pyro_vae.evaluation import log_likelihood


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_passes(module: nn.Module, rows: int, block: int, device) -> float:
    """Seconds for ``rows`` rows through every Linear of ``module``, ``block`` at a time."""
    weights = [m.weight.detach() for m in module.modules() if isinstance(m, nn.Linear)]
    inputs = [torch.randn(block, w.shape[1], device=device) for w in weights]
    _sync(device)
    start = time.perf_counter()
    done = 0
    while done < rows:
        n = min(block, rows - done)
        for x, w in zip(inputs, weights):
            torch.mm(x[:n], w.T)
        done += n
    _sync(device)
    return time.perf_counter() - start


def network_passes(vae, x: torch.Tensor, samples: int, chunk: int, batch_size: int,
                   device) -> float:
    """Seconds for the encoder on every point and the decoder on ``samples`` latents per
    point, as plain module calls on the estimator's blocks (chunk x batch_size rows)."""
    z_dim = next(m for m in vae.decoder.modules() if isinstance(m, nn.Linear)).in_features
    z = torch.randn(chunk, batch_size, z_dim, device=device)
    _sync(device)
    start = time.perf_counter()
    for xb in x.split(batch_size):
        vae.encoder(xb)
        for done in range(0, samples, chunk):
            vae.decoder(z[:min(chunk, samples - done), :len(xb)])
    _sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--total", type=int, default=10000, help="points to extrapolate to")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats (min is kept)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the estimator compiled")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="with --compile: the compiled estimator's precision")
    args = parser.parse_args()
    device = torch.device(args.device)
    vae, config = pv.load_run(args.run, device)
    vae.eval()
    test = pv.datasets.load(config.dataset, config.data_dir)[2].subset(args.limit).to(device)

    def estimate(**compiling):
        _sync(device)
        start = time.perf_counter()
        ll = log_likelihood(vae, test, args.samples, args.chunk, args.batch_size,
                            **compiling)
        _sync(device)
        return time.perf_counter() - start, ll

    block = args.chunk * args.batch_size
    times = {"estimator": [], "bare": [], "network": [], "compiled": []}
    compiling = dict(compile=True, precision=args.precision)
    with torch.no_grad():
        log_likelihood(vae, test.subset(args.batch_size), 2 * args.chunk,  # warm-up
                       args.chunk, args.batch_size)
        # Interleaved repeats, minimum of each: a shared machine's slow spells hit all
        # three alike, and the minimum is the least disturbed run.
        for _ in range(args.repeat):
            seconds, ll = estimate()
            times["estimator"].append(seconds)
            if args.compile:  # compiling (seconds) is part of each call's time
                seconds, ll_compiled = estimate(**compiling)
                times["compiled"].append(seconds)
            times["bare"].append(
                bare_passes(vae.decoder, args.limit * args.samples, block, device)
                + bare_passes(vae.encoder, args.limit, block, device))
            times["network"].append(network_passes(vae, test.x, args.samples, args.chunk,
                                                   args.batch_size, device))
    estimator, bare, network = (min(times[k]) for k in ("estimator", "bare", "network"))
    scale = args.total / args.limit
    if args.compile:
        compiled = min(times["compiled"])
        print(json.dumps({
            "compiled_seconds": compiled, "precision": args.precision,
            "speedup_compiled": estimator / compiled,
            "largest_difference_nats": (ll_compiled - ll).abs().max().item(),
            f"compiled_seconds_for_{args.total}_points": compiled * scale}))
    print(json.dumps({
        "run": args.run, "points": args.limit, "samples": args.samples,
        "log_likelihood_mean": ll.mean().item(), "repeats": args.repeat,
        "estimator_seconds": estimator, "bare_matmul_seconds": bare,
        "ratio": estimator / bare,
        "network_forward_seconds": network, "ratio_to_network_forward": estimator / network,
        f"estimator_seconds_for_{args.total}_points": estimator * scale,
        "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "pyro": pyro.__version__,
    }))


if __name__ == "__main__":
    main()
