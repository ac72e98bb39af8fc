"""Seconds per training epoch: pyro_vae.fit, eager and compiled, against the same network
and loss in plain PyTorch (and, where installed, in NumPyro), interleaved in one process.

Every loop starts from the same weights and takes the same Adam steps on the same kind of
batches: the torch loops see the very same batches (same permutation and dynamic
binarization draws, from generators with the same seed) on the same device. The plain
loop is the textbook one: the package's networks called as plain modules, z = mu + sigma
* eps, Bernoulli log-likelihood by binary cross-entropy, the Gaussian KL in closed form
(standard prior) or, for the VampPrior, a one-sample Monte Carlo KL with log p(z) =
logsumexp over the K pseudo-input posteriors (as in the VampPrior paper's code), and
``torch.optim.Adam``.

Loops (``--loops``):

- ``plain``: that loop, eager, in float32: the reference of every ratio;
- ``plain-compiled``: the same with its loss (networks, likelihood, KL) under
  ``torch.compile``;
- ``fit``: ``pyro_vae.fit``; ``fit-compiled``: ``fit(..., compile=True)``;
  ``fit-bf16``: ``fit(..., compile=True, precision="bf16")``, where bfloat16 is fast
  (elsewhere it is reported as refused);
- ``numpyro``: NumPyro's SVI with ``TraceMeanField_ELBO``, one jitted epoch (the same
  network and prior, on the CPU; needs ``pip install numpyro``; see ``numpyro_vae.py``).

Each round runs one epoch of every loop in turn; each loop's median over the rounds after
the first is reported (compiling is done before the first round and reported apart), with
its ratio to ``plain`` and to ``numpyro``: the median over those rounds of the ratio of
the two loops' epochs in the same round (a shared machine's load changes from round to
round, and slows the loops of one round alike). After the last round every loop's validation
ELBO is computed the same way (``pyro_vae.elbo``, one fixed seed); they optimize the same
objective from the same start, so they must agree within the spread that different Monte
Carlo draws during training leave (``--tolerance``, nats).

    python benchmarks/train_speed.py --data-dir ../shared/data [--config mlp gated-vamp]
        [--rounds 5] [--threads 1] [--loops plain fit fit-compiled ...] [--limit N]
        [--device cpu|cuda]

Configurations: ``mlp``, the Pyro tutorial's network (784-400-50, ReLU), standard
prior, batch 128, lr 1e-3; ``gated-vamp``, the VampPrior paper's gated network (300-300,
z = 40) with a K = 500 VampPrior, batch 100, lr 5e-4.
"""

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pyro

import pyro_vae as pv
from pyro_vae.compiled import check_precision, fast_bf16
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


def plain_loss(vae, x, n, paper_density=False) -> torch.Tensor:
    """The textbook VAE loss (-ELBO of the batch, times n / B) on ``vae``'s modules,
    without Pyro.

    VampPrior log p(z): by default the package's own mixture density (plain PyTorch: one
    matrix product and a logsumexp), so that the comparison measures what Pyro adds;
    ``paper_density``: the VampPrior paper's code instead (a B x K x D broadcast)."""
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
    return (kl - log_lik) * n / len(x)


def plain_epoch(vae, opt, train, batch_size, generator, paper_density=False,
                loss_fn=plain_loss) -> None:
    """One epoch of the textbook VAE loop (``loss_fn``, Adam)."""
    for (x,) in train.batches(batch_size, generator=generator):
        loss = loss_fn(vae, x, len(train), paper_density)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Plain:
    """The plain PyTorch loop, eager or with its loss compiled."""

    def __init__(self, vae, train, cfg, device, seed, compile=False, paper_density=False):
        self.model, self.train, self.cfg, self.device = vae, train, cfg, device
        self.opt = torch.optim.Adam(vae.parameters(), lr=cfg["lr"])
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.paper_density = paper_density
        self.loss = torch.compile(plain_loss, dynamic=False) if compile else plain_loss
        self.compile_seconds = None

    def epoch(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        plain_epoch(self.model, self.opt, self.train, self.cfg["batch_size"],
                    self.generator, self.paper_density, self.loss)
        _sync(self.device)
        return time.perf_counter() - start


class _Last(pv.hooks.Hook):
    def on_checkpoint(self, state):
        self.state = state


class Fit:
    """``pyro_vae.fit``, one epoch per call (resumed from the last one's state in the
    same process: compiled graphs are reused, and the epoch's own clock excludes set-up)."""

    def __init__(self, vae, train, cfg, device, seed, **options):
        self.model, self.train, self.device = vae, train, device
        self.options = dict(batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed,
                            device=device, progress=False, **options)
        self.state, self.epochs, self.compile_seconds = None, 0, None

    def epoch(self) -> float:
        last = _Last()
        self.epochs += 1
        history = pv.fit(self.model, self.train, epochs=self.epochs, resume=self.state,
                         hooks=[last], **self.options)
        self.state = last.state
        if self.compile_seconds is None:
            self.compile_seconds = history[-1].get("compile_seconds")
        return history[-1]["seconds"]


class NumPyro:
    """NumPyro's jitted epoch (``numpyro_vae.py``), compiled ahead of the first round."""

    def __init__(self, vae, train, cfg, seed):
        from numpyro_vae import NumPyroVAE
        self.model = vae
        start = time.perf_counter()
        self.svi = NumPyroVAE(vae, train.x, cfg["batch_size"], cfg["lr"], seed)
        self.svi.compile()
        self.compile_seconds = time.perf_counter() - start

    def epoch(self) -> float:
        return self.svi.epoch()

    def finish(self):
        self.svi.copy_back()


def _loops(names, package, train, cfg, device, seed, paper_density):
    """The loops to time, by name, each on its own copy of the initial weights; and the
    loops refused here, with the reason."""
    loops, refused = {}, {}
    for name in names:
        vae = copy.deepcopy(package)
        if name in ("plain", "plain-compiled"):
            loops[name] = Plain(vae, train, cfg, device, seed, name == "plain-compiled",
                                paper_density)
        elif name in ("fit", "fit-compiled"):
            loops[name] = Fit(vae, train, cfg, device, seed, compile=name != "fit")
        elif name == "fit-bf16":
            try:
                check_precision("bf16", device)
                loops[name] = Fit(vae, train, cfg, device, seed, compile=True,
                                  precision="bf16")
            except ValueError as e:
                refused[name] = str(e)
        elif name == "numpyro":
            if device.type != "cpu":
                refused[name] = "the NumPyro reference runs on the CPU"
                continue
            try:
                loops[name] = NumPyro(vae, train, cfg, seed)
            except ImportError as e:
                refused[name] = f"not installed ({e})"
    return loops, refused


def run(name: str, train, valid, rounds: int, device, loop_names, seed: int = 0,
        paper_density: bool = False) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    package = pv.VAE(784, cfg["z_dim"], cfg["hidden"], arch=cfg["arch"], prior=cfg["prior"],
                     prior_options=cfg["prior_options"]).to(device)
    loops, refused = _loops(loop_names, package, train, cfg, device, seed, paper_density)
    seconds = {k: [] for k in loops}
    for _ in range(rounds):
        for k, loop in loops.items():
            seconds[k].append(loop.epoch())
    # Rounds after the first (which holds one-off costs: allocation, first-step checks).
    median = {k: statistics.median(v[1:] or v) for k, v in seconds.items()}
    result = {"config": name, "refused": refused, "rounds": seconds, "median": median,
              "compile_seconds": {k: loop.compile_seconds for k, loop in loops.items()},
              "steps_per_epoch": math.ceil(len(train) / cfg["batch_size"])}
    for reference in ("plain", "numpyro"):
        if reference in median:  # the median of each round's ratio: the load of a round
            result[f"ratio_to_{reference}"] = {  # slows all its loops alike
                k: statistics.median([a / b for a, b in zip(v, seconds[reference])][1:]
                                     or [v[0] / seconds[reference][0]])
                for k, v in seconds.items()}
    for loop in loops.values():
        getattr(loop, "finish", lambda: None)()
    result["valid_elbo"] = {k: pv.elbo(loop.model, valid, seed=seed)
                            for k, loop in loops.items()}
    return result


def _threads(n: int) -> None:
    """n threads for torch, and the process held to n cores: XLA's CPU code (NumPyro)
    otherwise uses every core, whatever its flags say."""
    torch.set_num_threads(n)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:n])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    parser.add_argument("--rounds", type=int, default=5, help="epochs of each loop")
    parser.add_argument("--threads", type=int, help="torch threads, and cores the process "
                                                   "may use (default: torch's, all)")
    parser.add_argument("--limit", type=int, help="train on the first N points only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paper-density", action="store_true",
                        help="plain loop: the VampPrior paper's B x K x D mixture density "
                             "instead of the package's matrix-product one")
    parser.add_argument("--tolerance", type=float, default=1.0,
                        help="allowed |ELBO difference| to plain, in nats "
                             "(default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        _threads(args.threads)
    device = torch.device(args.device)
    train, valid, _ = pv.datasets.load("mnist", args.data_dir)
    train, valid = train.subset(args.limit).to(device), valid.to(device)
    info = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                plain_vamp_density="paper" if args.paper_density else "package",
                pyro=pyro.__version__, points=len(train), fast_bf16=fast_bf16(device),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                machine=platform.processor() or platform.machine(), **_cpu_model(),
                load_average=os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(info), flush=True)
    results = [run(name, train, valid, args.rounds, device, args.loops,
                   paper_density=args.paper_density) for name in args.config]
    info["load_average_after"] = os.getloadavg()
    agree = True
    for r in results:
        print(json.dumps(r), flush=True)
    for r in results:
        print(f"\n{r['config']} ({device.type}, {info['threads']} threads, {info['cpu']}, "
              f"load average {info['load_average'][0]:.2f} before, "
              f"{info['load_average_after'][0]:.2f} after): s/epoch, median of rounds "
              f"2-{args.rounds}; ratios: median of the rounds' ratios"
              f"\n\n| loop | s/epoch | to plain | to numpyro | "
              f"compile s | valid ELBO |\n|---|---|---|---|---|---|")
        for k, s in r["median"].items():
            to_plain = r.get("ratio_to_plain", {}).get(k)
            to_numpyro = r.get("ratio_to_numpyro", {}).get(k)
            compile_s = r["compile_seconds"][k]
            print(f"| {k} | {s:.3f} | {_fmt(to_plain)} | {_fmt(to_numpyro)} | "
                  f"{_fmt(compile_s, 1)} | {r['valid_elbo'][k]:.2f} |")
        for k, why in r["refused"].items():
            print(f"| {k} | refused: {why} | | | | |")
        if "plain" in r["valid_elbo"]:
            agree &= all(abs(v - r["valid_elbo"]["plain"]) <= args.tolerance
                         for v in r["valid_elbo"].values())
    return 0 if agree else 1


def _cpu_model() -> dict:
    """The CPU's model name and whether it has AMX (Linux's /proc/cpuinfo)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {"cpu": platform.processor() or platform.machine(), "amx": None}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), platform.machine())
    return {"cpu": model, "amx": " amx_bf16" in text}


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


LOOPS = ("plain", "plain-compiled", "fit", "fit-compiled", "fit-bf16", "numpyro")

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
