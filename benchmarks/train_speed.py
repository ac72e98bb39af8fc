"""Seconds per training epoch: pyro_vae.fit against the same network and loss in plain
PyTorch, interleaved in one process.

Both loops start from the same weights, see the same batches (same permutation and
dynamic binarization draws, from generators with the same seed) on the same device and
take the same number of Adam steps. The plain loop is the textbook one: the package's
networks called as plain modules, z = mu + sigma * eps, Bernoulli log-likelihood by
binary cross-entropy, the Gaussian KL in closed form (standard prior) or, for the
VampPrior, a one-sample Monte Carlo KL with log p(z) = logsumexp over the K pseudo-input
posteriors (as in the VampPrior paper's code), and ``torch.optim.Adam``.

Epochs alternate (package, plain, package, plain, ...); each loop's median over the
rounds is reported, with their ratio. After the last round both models' validation ELBO
is computed the same way (``pyro_vae.elbo``, one fixed seed); they optimize the same
objective from the same start, so they must agree within the spread that different
Monte Carlo draws during training leave (``--tolerance``, nats).

    python benchmarks/train_speed.py --data-dir ../shared/data [--config mlp gated-vamp]
        [--rounds 5] [--limit N] [--device cpu|cuda]

Configurations: ``mlp``, the Pyro tutorial's network (784-400-50, ReLU), standard
prior, batch 128, lr 1e-3; ``gated-vamp``, the VampPrior paper's gated network (300-300,
z = 40) with a K = 500 VampPrior, batch 100, lr 5e-4.
"""

import argparse
import copy
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import pyro

import pyro_vae as pv
from pyro_vae.guides import _positive
from pyro_vae.priors import _diag_normal_log_prob, logsumexp

CONFIGS = {
    "mlp": dict(arch="mlp", z_dim=50, hidden=(400,), prior="normal", prior_options={},
                batch_size=128, lr=1e-3),
    "gated-vamp": dict(arch="gated", z_dim=40, hidden=(300, 300), prior="vamp",
                       prior_options={"components": 500}, batch_size=100, lr=5e-4),
}


def _gaussian_log_density(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log()
            - 0.5 * math.log(2 * math.pi)).sum(-1)


def _q_params(encoder, x):
    loc, s = encoder.net(x).chunk(2, dim=-1)
    return loc, _positive(s, encoder.scale, encoder.min_scale)


def plain_epoch(vae, opt, train, batch_size, generator, paper_density=False) -> None:
    """One epoch of the textbook VAE loop on ``vae``'s modules, without Pyro.

    VampPrior log p(z): by default the package's own mixture density (plain PyTorch: one
    matrix product and a logsumexp), so that the comparison measures what Pyro adds;
    ``paper_density``: the VampPrior paper's code instead (a B x K x D broadcast)."""
    n = len(train)
    for (x,) in train.batches(batch_size, generator=generator):
        loc, scale = _q_params(vae.encoder, x)
        z = loc + scale * torch.randn_like(scale)
        log_lik = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
        if isinstance(vae.prior, pv.VampPrior):
            ploc, pscale = _q_params(vae.encoder, vae.prior.pseudo_inputs)  # K x z
            log_q = _gaussian_log_density(z, loc, scale)
            if paper_density:
                log_p = torch.logsumexp(_gaussian_log_density(z[:, None], ploc, pscale), -1)
            else:
                log_p = logsumexp(_diag_normal_log_prob(z, ploc, pscale), -1)
            log_p = log_p - math.log(len(ploc))
            kl = (log_q - log_p).sum()
        else:
            kl = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum()
        loss = (kl - log_lik) * n / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name: str, train, valid, rounds: int, device, seed: int = 0,
        paper_density: bool = False) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    package = pv.VAE(784, cfg["z_dim"], cfg["hidden"], arch=cfg["arch"], prior=cfg["prior"],
                     prior_options=cfg["prior_options"]).to(device)
    plain = copy.deepcopy(package)  # the same initial weights
    opt = torch.optim.Adam(plain.parameters(), lr=cfg["lr"])
    generator = torch.Generator(device=device).manual_seed(seed)  # fit's data stream
    plain_seconds = []

    def plain_round(record, history, model):
        _sync(device)
        start = time.perf_counter()
        plain_epoch(plain, opt, train, cfg["batch_size"], generator, paper_density)
        _sync(device)
        plain_seconds.append(time.perf_counter() - start)

    history = pv.fit(package, train, epochs=rounds, batch_size=cfg["batch_size"],
                     lr=cfg["lr"], seed=seed, device=device, hooks=[plain_round],
                     progress=False)
    package_seconds = [r["seconds"] for r in history]
    # Rounds after the first (which holds one-off costs: allocation, first-step checks).
    a = statistics.median(package_seconds[1:] or package_seconds)
    b = statistics.median(plain_seconds[1:] or plain_seconds)
    elbo_package = pv.elbo(package, valid, seed=seed)
    elbo_plain = pv.elbo(plain, valid, seed=seed)
    return {"config": name, "package_s_per_epoch": a, "plain_s_per_epoch": b,
            "ratio": a / b, "package_rounds": package_seconds, "plain_rounds": plain_seconds,
            "valid_elbo_package": elbo_package, "valid_elbo_plain": elbo_plain,
            "elbo_difference": elbo_package - elbo_plain,
            "steps_per_epoch": math.ceil(len(train) / cfg["batch_size"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5, help="epochs of each loop")
    parser.add_argument("--limit", type=int, help="train on the first N points only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paper-density", action="store_true",
                        help="plain loop: the VampPrior paper's B x K x D mixture density "
                             "instead of the package's matrix-product one")
    parser.add_argument("--tolerance", type=float, default=1.0,
                        help="allowed |ELBO difference| in nats (default: %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    train, valid, _ = pv.datasets.load("mnist", args.data_dir)
    train, valid = train.subset(args.limit).to(device), valid.to(device)
    info = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                plain_vamp_density="paper" if args.paper_density else "package",
                pyro=pyro.__version__, points=len(train),
                machine=platform.processor() or platform.machine())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(info))
    results = []
    for name in args.config:
        result = run(name, train, valid, args.rounds, device, paper_density=args.paper_density)
        result["elbo_agrees"] = abs(result["elbo_difference"]) <= args.tolerance
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n| config ({device.type}) | pyro_vae s/epoch | plain PyTorch s/epoch | ratio | "
          f"valid ELBO pyro_vae | valid ELBO plain |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['package_s_per_epoch']:.3f} | "
              f"{r['plain_s_per_epoch']:.3f} | {r['ratio']:.3f} | "
              f"{r['valid_elbo_package']:.2f} | {r['valid_elbo_plain']:.2f} |")
    return 0 if all(r["elbo_agrees"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
