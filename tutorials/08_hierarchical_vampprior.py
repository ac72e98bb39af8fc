"""Tutorial 8: two stochastic layers with a VampPrior (the VampPrior paper's HVAE)
===============================================================================

The two-layer VAE with a VampPrior against one layer.

Run it::

    python tutorials/08_hierarchical_vampprior.py --data-dir path/to/data [--epochs 10]
        [--ll-points 1000] [--ll-samples 1000]

The maths
---------
Tomczak & Welling (2018) stack two latent layers, z2 on top::

    model:  z2 ~ p(z2) = (1/K) sum_k q(z2 | u_k)       (the VampPrior)
            z1 ~ p(z1 | z2) = N(mu(z2), diag sigma(z2)^2)
            x  ~ p(x | z1, z2)
    guide:  z2 ~ q(z2 | x),   z1 ~ q(z1 | x, z2)

The ELBO has a term per layer, E_q[log p(x | z1, z2)] - KL(q(z2|x) || p(z2)) -
E_q[KL(q(z1|x,z2) || p(z1|z2))]. The lower layer gives the model a learned,
non-Gaussian prior on z1 (a mixture over z2), on top of the VampPrior's on z2; the paper
reports 2.4 nats of log-likelihood gained over one layer on MNIST, after hundreds of
epochs.
``pv.HierarchicalVAE`` is the model; its ``model`` and ``guide`` are ordinary Pyro
programs with two sample sites. ``pv.fit`` trains it with ``TraceMeanField_ELBO`` (its
log line says so): the guide draws z2 and then z1 given z2, in the model's order, which
is what Pyro's mean-field check asks, and the KL of z1 in closed form given the drawn z2
is then an unbiased estimate of the ELBO's third term (the KL of z2 against the
VampPrior has no closed form: a one-sample estimate, with a logged warning).

What to look at
---------------
- The table: the two-layer model against a one-layer VAE with the same VampPrior, the
  same networks per layer, data and epochs: test ELBO and log p(x) (mean +- standard
  error), active units of the top layer. After a few epochs the two are close; the
  second layer's gain grows with training (``--epochs 100`` and more).
- ``samples_hvae.png``, ``samples_vae.png``: samples from each; ``pseudo_inputs.png``.
"""

import torch

import pyro_vae as pv
from _common import mnist, options, save_images

args = options(__doc__, "tutorial08", epochs=10, extra=[
    ("--ll-points", dict(type=int, default=1000, help="test points for log p(x)")),
    ("--ll-samples", dict(type=int, default=1000, help="importance samples S"))])
K = 50 if args.smoke else 500
if args.smoke:
    args.ll_points, args.ll_samples = 100, 50
    print("--smoke: one epoch on 1 000 points: the numbers below are not meaningful "
          "(any ranking among them is arbitrary)")
train, valid, test = mnist(args)
subset = test.subset(args.ll_points)

# %%
# 1. Two layers and one
# ---------------------
# The same VampPrior, networks per layer, data and epochs.
models = {}
for name, cls in (("two layers (HVAE)", pv.HierarchicalVAE), ("one layer (VAE)", pv.VAE)):
    torch.manual_seed(0)
    vae = cls(784, 40, (300,), arch="mlp", prior="vamp",
              prior_options={"components": K}).to(args.device)
    history = pv.fit(vae, train, valid, epochs=args.epochs, progress=False)
    print(f"{name}: valid ELBO {history[-1]['valid_elbo']:.2f} after {args.epochs} epochs "
          f"({history[-1]['seconds']:.1f} s per epoch)")
    vae.eval()
    models[name] = vae

# %%
# 2. Test ELBO, log p(x) and active units
# ---------------------------------------
print(f"\n{'model':<20} {'test ELBO':>10} {'log p(x)':>17} {'active units (top)':>19}")
for name, vae in models.items():
    ll = pv.evaluation.log_likelihood(vae, subset, num_samples=args.ll_samples)
    units = pv.evaluation.active_units(vae, test)["active_units"]
    print(f"{name:<20} {pv.elbo(vae, test, seed=0):10.2f} {ll.mean().item():9.2f} +- "
          f"{ll.std().item() / len(ll) ** 0.5:4.2f} {units:>12d} of 40")
print(f"(log p(x): first {len(subset)} test points, S = {args.ll_samples})")

# %%
# 3. Samples and pseudo-inputs
# ----------------------------
for name, short in (("two layers (HVAE)", "hvae"), ("one layer (VAE)", "vae")):
    save_images(models[name].sample(100), args.out / f"samples_{short}.png",
                f"samples, {name}, VampPrior")
u = models["two layers (HVAE)"].prior.pseudo_inputs.detach()[:50]
save_images(u, args.out / "pseudo_inputs.png", "HVAE: the first 50 pseudo-inputs")
print(f"figures in {args.out}/")
