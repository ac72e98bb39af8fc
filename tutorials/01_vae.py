"""Tutorial 1: a variational autoencoder is a Pyro model and a Pyro guide
======================================================================

The VAE as a Pyro model and guide, the ELBO checked by hand, the reparameterization
trick; samples, reconstructions, a 2-D latent space.

Run it::

    python tutorials/01_vae.py --data-dir path/to/data [--epochs 10] [--out runs/tutorial01]

The maths
---------
The model draws a code z ~ p(z) = N(0, I) and an image x ~ p_theta(x | z) =
prod_d Bernoulli(x_d; f_theta(z)_d). Its marginal log p(x) has no closed form, so we fit
an amortized posterior q_phi(z | x) = N(mu_phi(x), diag sigma_phi(x)^2) (a factorized
Gaussian from an encoder network) and maximize the evidence lower bound::

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))  <=  log p(x).

Its gradient in phi goes through the sample: z = mu + sigma * eps with eps ~ N(0, I)
(the reparameterization trick), so one draw of eps gives an unbiased, low-variance
estimate. In Pyro, p is the ``model`` and q the ``guide``; Pyro's ``TraceMeanField_ELBO``
runs the guide, replays the model on its z, and builds this loss (with the Gaussian KL in
closed form).

What to look at
---------------
- The printed trace: the sites "z" and "x", their shapes, and the N / B scale that the
  "data" plate puts on a minibatch so that the loss estimates the whole data set's.
- "TraceMeanField_ELBO loss ... by hand ...": the two numbers agree.
- ``samples.png`` (digits drawn from the model), ``reconstructions.png``, ``elbo.png``.
- ``latent_2d.png``: the test set's posterior means of a z_dim = 2 model, coloured by
  digit: the classes separate though the model never saw a label. ``manifold_2d.png``
  decodes a grid of z values.
"""

import matplotlib.pyplot as plt
import torch
from torch.distributions import kl_divergence

from pyro import poutine

import pyro_vae as pv
from _common import mnist, options, save_figure, save_images

args = options(__doc__, "tutorial01", epochs=10)
train, valid, test = mnist(args)
print(f"MNIST: {len(train)} train, {len(valid)} valid, {len(test)} test points "
      f"of {train.x.shape[1]} pixels")

# %%
# 1. The model and the guide
# --------------------------
# ``pyro_vae/models.py`` holds them; in short::
#
#     def model(self, x, num_data=None):
#         with pyro.plate("data", num_data or len(x), subsample=x):
#             z = pyro.sample("z", self.p_z())                # z ~ N(0, I)
#             pyro.sample("x", self.decode(z), obs=x)         # x ~ Bernoulli(f(z))
#
#     def guide(self, x, num_data=None):
#         with pyro.plate("data", num_data or len(x), subsample=x):
#             pyro.sample("z", self.encoder(x))               # z ~ N(mu(x), sigma(x)^2)
vae = pv.VAE(x_dim=784, z_dim=20, hidden=(400,)).to(args.device)

# %%
# 2. What Pyro sees
# -----------------
# Run the guide, then the model on the guide's z.
x = next(test.batches(16, shuffle=False))[0]
guide_trace = poutine.trace(vae.guide).get_trace(x, num_data=len(train))
model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(
    x, num_data=len(train))
print("\nmodel sites (batch shape | event shape, scale):")
for name in ("z", "x"):
    site = model_trace.nodes[name]
    print(f"  {name}: {tuple(site['fn'].batch_shape)} | {tuple(site['fn'].event_shape)}, "
          f"scale {site['scale']:.2f} = {len(train)} / {len(x)}")

# %%
# 3. The mean-field ELBO by hand
# ------------------------------
# With the same noise eps as inside Pyro's loss.
elbo = pv.objectives.make_elbo("meanfield")
torch.manual_seed(1)
loss = elbo.loss(vae.model, vae.guide, x)  # num_data=None: the plain sum over the batch
torch.manual_seed(1)
q = vae.encode(x)
z = q.rsample()  # z = mu + sigma * eps: the same eps as inside the loss
reconstruction = vae.decode(z).log_prob(x)
kl = kl_divergence(q, vae.p_z().expand(q.batch_shape))
print(f"\nTraceMeanField_ELBO loss {loss:.4f}  vs  by hand -sum(recon - KL) "
      f"{-(reconstruction - kl).sum().item():.4f}")

# %%
# 4. Train
# --------
# ``fit()`` takes Pyro's ELBO and its gradients at every step.
history = pv.fit(vae, train, valid, epochs=args.epochs, batch_size=128, lr=1e-3,
                 progress=False)
for record in history:
    print(f"epoch {record['epoch']:3d}: train ELBO {record['train_elbo']:8.2f}, "
          f"valid ELBO {record['valid_elbo']:8.2f}")
print(f"test ELBO (z_dim 20): {pv.elbo(vae, test, seed=0):.2f} nats per image")

# %%
# Samples from the model, reconstructions of test images and the training curves.
vae.eval()
pv.plots.plot_samples(vae, train.image_shape, args.out / "samples.png", n=100)
pv.plots.plot_reconstructions(vae, test.x[:32], train.image_shape,
                              args.out / "reconstructions.png")
pv.plots.plot_elbo(history, args.out / "elbo.png")

# %%
# 5. Two latent dimensions
# ------------------------
# The posterior means of the test set, coloured by digit.
vae2 = pv.VAE(x_dim=784, z_dim=2, hidden=(400,)).to(args.device)
pv.fit(vae2, train, valid, epochs=args.epochs, batch_size=128, lr=1e-3, progress=False)
print(f"test ELBO (z_dim 2):  {pv.elbo(vae2, test, seed=0):.2f} nats per image")
vae2.eval()
with torch.no_grad():
    means = vae2.encode(test.x).mean.cpu()
fig, ax = plt.subplots(figsize=(6, 5))
points = ax.scatter(means[:, 0], means[:, 1], c=test.labels.cpu(), cmap="tab10", s=3,
                    vmin=-0.5, vmax=9.5)
fig.colorbar(points, ticks=range(10), label="digit")
ax.set_xlabel("z_1")
ax.set_ylabel("z_2")
ax.set_title("E[z | x] of the test images (z_dim = 2)")
save_figure(fig, args.out / "latent_2d.png")

# %%
# The decoder's mean over a grid of codes: the prior's central region, from -2 to 2.
ticks = torch.linspace(-2, 2, 15)
grid = torch.stack(torch.meshgrid(ticks, ticks.flip(0), indexing="xy"), -1).reshape(-1, 2)
with torch.no_grad():
    images = vae2.decode(grid.to(args.device)).mean
save_images(images, args.out / "manifold_2d.png", "mean of p(x | z) on a grid of z",
            ncols=15)
print(f"figures in {args.out}/")
