"""Tutorial 3: beta-VAE, the rate-distortion trade-off and active units
====================================================================

Β-VAE: rate–distortion curve, KL per dimension, active units, latent traversals.

Run it::

    python tutorials/03_beta_vae.py --data-dir path/to/data [--epochs 10]

The maths
---------
The beta-VAE (Higgins et al. 2017) maximizes::

    E_q[log p(x | z)] - beta * KL(q(z | x) || p(z)).

Write D = -E_q[log p(x | z)] (the distortion: nats to describe x given its code) and
R = KL(q(z | x) || p(z)) (the rate: nats the code carries about x). Then -ELBO = D + R,
and the beta objective is D + beta R: beta > 1 buys a cheaper code with a worse
reconstruction, beta < 1 the opposite (Alemi et al. 2018). In Pyro, beta scales the
latent sites in model and guide alike: ``pv.fit`` applies a Pyro handler,
``pv.scale_latents(beta)``, around both, so the model itself takes no ``beta``.

A latent dimension u is "active" when its posterior mean moves with the data,
Cov_x(E_q[z_u | x]) > 0.01 (Burda et al. 2015); an inactive one has collapsed to the
prior: its KL is near 0 and decoding ignores it.

What to look at
---------------
- The table: for each beta, distortion, rate, the ELBO (beta = 1) and the active units.
  Rate falls and distortion rises with beta; the ELBO is best near beta = 1.
- ``rate_distortion.png``: the trade-off curve, one point per beta.
- ``kl_per_dim.png``: KL per latent dimension at beta 1 and 4: at beta 4 every dimension
  carries less, and unevenly; at the largest beta some collapse to the prior entirely
  (the active units drop in the table).
- ``traversals_beta1.png``, ``traversals_beta4.png``: rows are the latent dimensions (most
  informative first), columns move that one dimension from -3 to 3 around the code of one
  test image. Inactive rows do not change.
"""

import matplotlib.pyplot as plt
import torch

import pyro_vae as pv
from _common import mnist, options, save_figure, save_images

args = options(__doc__, "tutorial03", epochs=10)
if args.smoke:
    print("--smoke: one epoch on 1 000 points: the numbers below are not meaningful "
          "(any ranking among them is arbitrary)")
train, valid, test = mnist(args)
betas = [1.0, 4.0] if args.smoke else [0.5, 1.0, 2.0, 4.0, 8.0]
Z = 10

# %%
# 1. One model per beta
# ---------------------
# The same network, initial weights and data; distortion, rate and ELBO on the test set.
models, rows = {}, []
for beta in betas:
    torch.manual_seed(0)
    vae = pv.VAE(784, Z, (400,)).to(args.device)
    pv.fit(vae, train, valid, epochs=args.epochs, beta=beta, progress=False)
    vae.eval()
    distortion = -pv.elbo(vae, test, beta=0.0, seed=0)   # -E_q log p(x|z)
    elbo = pv.elbo(vae, test, seed=0)
    rate = -elbo - distortion
    units = pv.evaluation.active_units(vae, test)
    models[beta] = (vae, units)
    rows.append((beta, distortion, rate, elbo, units["active_units"]))

print(f"{'beta':>5} {'distortion':>11} {'rate':>7} {'ELBO':>9} {'active units':>13}")
for beta, distortion, rate, elbo, active in rows:
    print(f"{beta:5.1f} {distortion:11.2f} {rate:7.2f} {elbo:9.2f} {active:>9d} of {Z}")

# %%
# 2. Rate against distortion
# --------------------------
fig, ax = plt.subplots(figsize=(5, 4))
ax.plot([r[2] for r in rows], [r[1] for r in rows], marker="o")
for beta, distortion, rate, _, _ in rows:
    ax.annotate(f"beta {beta:g}", (rate, distortion), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
ax.set_xlabel("rate R = KL(q(z|x) || p(z))  (nats)")
ax.set_ylabel("distortion D = -E log p(x|z)  (nats)")
ax.set_title("rate-distortion trade-off (test set)")
ax.grid(alpha=0.3)
save_figure(fig, args.out / "rate_distortion.png")

# %%
# 3. KL per latent dimension
# --------------------------
fig, ax = plt.subplots(figsize=(6, 3.5))
for i, beta in enumerate((1.0, 4.0)):
    kl = models[beta][1]["kl_per_dim"]
    ax.bar([u + 0.4 * i for u in range(Z)], kl, 0.4, label=f"beta {beta:g}")
ax.set_xticks([u + 0.2 for u in range(Z)])
ax.set_xticklabels(range(1, Z + 1))
ax.set_xlabel("latent dimension")
ax.set_ylabel("average KL (nats)")
ax.legend()
save_figure(fig, args.out / "kl_per_dim.png")

# %%
# 4. Latent traversals
# --------------------
# One dimension at a time from -3 to 3, the others at the image's code.
x = test.x[:1]
steps = torch.linspace(-3, 3, 9, device=args.device)
for beta in (1.0, 4.0):
    vae, units = models[beta]
    order = sorted(range(Z), key=lambda u: -units["kl_per_dim"][u])
    with torch.no_grad():
        code = vae.encode(x).mean[0]
        codes = code.repeat(Z, len(steps), 1)
        for row, u in enumerate(order):
            codes[row, :, u] = steps
        images = vae.decode(codes.reshape(-1, Z)).mean
    save_images(images, args.out / f"traversals_beta{beta:g}.png",
                f"beta {beta:g}: rows = dimensions by KL, columns z_u from -3 to 3",
                ncols=len(steps))
print(f"figures in {args.out}/")
