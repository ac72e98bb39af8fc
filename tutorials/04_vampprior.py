"""Tutorial 4: the VampPrior against a standard normal and a mixture-of-Gaussians prior
====================================================================================

VampPrior against standard and mixture-of-Gaussians priors: pseudo-inputs, samples, test
log-likelihood.

Run it::

    python tutorials/04_vampprior.py --data-dir path/to/data [--epochs 10]
        [--ll-points 1000] [--ll-samples 1000]

The maths
---------
The prior that maximizes the ELBO, averaged over the N training points, is the
aggregate posterior q(z) = (1/N) sum_n q(z | x_n). The VampPrior (Tomczak & Welling 2018)
approximates it with K learned pseudo-inputs u_k::

    p(z) = (1/K) sum_k q(z | u_k),

a mixture of the encoder's own posteriors, so prior and posterior speak the same
language. A mixture of K free Gaussians (``mog``) is the half-way house; N(0, I) the
usual start. All three VAEs here share the network, initial weights, data and epochs.
The test log-likelihood is the importance-sampled estimate::

    log p(x) ~= log (1/S) sum_s p(x, z_s) / q(z_s | x),   z_s ~ q(z | x).

What to look at
---------------
- The table: test ELBO and log p(x) (mean +- standard error) per prior. The VampPrior
  should be best, the standard normal worst.
- ``pseudo_inputs.png``: the first 50 learned pseudo-inputs: they have become digit-like
  images, since they must be inputs whose posteriors cover the data's.
- ``samples_*.png``: 100 samples from each model. The standard normal's and the
  mixture's include more shapes that are no digit: their prior puts mass where the
  encoder puts no code (the "holes" between the aggregate posterior's clusters), and the
  decoder has never learned what to draw there. The VampPrior's samples come from
  codes of the kind the encoder uses.

The three trained models are saved in ``--out`` (``normal.pt``, ``mog.pt``, ``vamp.pt``)
for tutorial 5.
"""

import pyro_vae as pv
from _common import mnist, options, prior_models, save_images

args = options(__doc__, "tutorial04", epochs=10, extra=[
    ("--ll-points", dict(type=int, default=1000, help="test points for log p(x)")),
    ("--ll-samples", dict(type=int, default=1000, help="importance samples S"))])
if args.smoke:
    args.ll_points, args.ll_samples = 100, 50
    print("--smoke: one epoch on 1 000 points: the numbers below are not meaningful "
          "(any ranking among them is arbitrary)")
train, valid, test = mnist(args)

# %%
# 1. Three priors, one network
# ----------------------------
# The same initial weights, data and epochs for each (``_common.prior_models``).
models = prior_models(args, train, valid)

# %%
# 2. Test ELBO, log p(x) and samples of each
# ------------------------------------------
subset = test.subset(args.ll_points)
print(f"\n{'prior':<22} {'test ELBO':>10} {'log p(x)':>18}   "
      f"(log p(x): first {len(subset)} test points, S = {args.ll_samples})")
for name, vae in models.items():
    ll = pv.evaluation.log_likelihood(vae, subset, num_samples=args.ll_samples)
    se = ll.std().item() / len(ll) ** 0.5
    print(f"{name:<22} {pv.elbo(vae, test, seed=0):10.2f} {ll.mean().item():9.2f} "
          f"+- {se:5.2f}")
    short = {"standard normal": "normal", "mixture of Gaussians": "mog",
             "VampPrior": "vamp"}[name]
    save_images(vae.sample(100), args.out / f"samples_{short}.png",
                f"samples, {name} prior")

# %%
# 3. The learned pseudo-inputs
# ----------------------------
u = models["VampPrior"].prior.pseudo_inputs.detach()[:50]
save_images(u, args.out / "pseudo_inputs.png", "VampPrior: the first 50 pseudo-inputs")
print(f"figures and models in {args.out}/")
