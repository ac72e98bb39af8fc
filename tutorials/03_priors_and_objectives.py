"""Tutorial 3: priors and objectives: VampPrior, beta-VAE with warm-up, the IWAE bound.

Run it:   python tutorials/03_priors_and_objectives.py [--epochs 40]

Everything here is a keyword of ``pv.VAE`` or ``pv.fit``; the same choices exist on the
command line (``--prior vamp``, ``--beta 4 --warmup-epochs 10``, ``--loss iwae``).

1. The prior. A standard normal p(z) against a VampPrior (Tomczak & Welling 2018):
   p(z) = (1/K) sum_k q(z | u_k), the encoder's own posteriors at K learned pseudo-inputs.
   Its KL has no closed form, so TraceMeanField_ELBO uses a Monte Carlo KL (logged).
2. beta. ELBO_beta = E_q[log p(x|z)] - beta KL(q(z|x) || p(z)). A larger beta buys a
   smaller KL (less information in z) with a worse reconstruction (Higgins et al. 2017).
   ``pv.elbo(..., beta=0)`` is the reconstruction term alone, so KL = recon - ELBO.
3. The IWAE bound (Burda et al. 2015): log (1/K) sum_k p(x, z_k) / q(z_k | x) is a
   tighter lower bound on log p(x) than the ELBO, and rises with K.
"""

import argparse
import logging

import pyro

import pyro_vae as pv

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=40)
args = parser.parse_args()

train, valid, test = pv.datasets.load("digits")
settings = dict(epochs=args.epochs, batch_size=64, lr=3e-3, progress=False)


def report(name, vae):
    elbo = pv.elbo(vae, test, seed=0)
    recon = pv.elbo(vae, test, seed=0, beta=0)  # same draws: KL = recon - ELBO
    iwae = pv.elbo(vae, test, loss="iwae", num_particles=50, seed=0)
    print(f"{name:<22} test ELBO {elbo:8.3f}   recon {recon:8.3f}   KL {recon - elbo:6.3f}"
          f"   IWAE(K=50) {iwae:8.3f}")
    return elbo, iwae


# 1. Two priors, same network and training.
pyro.set_rng_seed(0)
normal = pv.VAE(64, 8, (128,), prior="normal")
pv.fit(normal, train, valid, **settings)
pyro.set_rng_seed(0)
vamp = pv.VAE(64, 8, (128,), prior="vamp", prior_options={"components": 50})
pv.fit(vamp, train, valid, **settings)
report("normal prior", normal)
report("VampPrior (K = 50)", vamp)

# 2. beta = 4, reached by a linear warm-up over the first quarter of training.
pyro.set_rng_seed(0)
beta4 = pv.VAE(64, 8, (128,))
history = pv.fit(beta4, train, valid, beta=4.0, warmup_epochs=max(1, args.epochs // 4),
                 **settings)
print("beta per epoch:", [round(r["beta"], 2) for r in history[:6]], "...")
report("normal prior, beta = 4", beta4)

# 3. Trained on the IWAE bound with K = 5 particles.
pyro.set_rng_seed(0)
iwae = pv.VAE(64, 8, (128,))
pv.fit(iwae, train, valid, loss="iwae", num_particles=5, **settings)
report("normal prior, IWAE K=5", iwae)
