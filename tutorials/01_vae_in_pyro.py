"""Tutorial 1: a variational autoencoder is a Pyro model and a Pyro guide.

Run it:   python tutorials/01_vae_in_pyro.py [--epochs 50] [--out runs/tutorial01]

What you will see
-----------------
1. The generative model p(x, z) = p(z) p(x|z) and the amortized posterior q(z|x), written
   as two methods of one PyroModule, ``pyro_vae.VAE``.
2. What Pyro records when it runs them: the sample sites, their shapes, and the
   N / B scale that the "data" plate puts on a minibatch.
3. That ``TraceMeanField_ELBO``'s loss is exactly -E_q[log p(x|z)] + KL(q(z|x) || p(z)),
   checked by hand on one minibatch.
4. Training with ``pyro_vae.fit`` (Pyro's SVI underneath) and the figures it makes.

The data set is scikit-learn's 8x8 digits, bundled with it: no download needed.
"""

import argparse
from pathlib import Path

import torch
from torch.distributions import kl_divergence

import pyro
from pyro import poutine

import pyro_vae as pv

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=50)
parser.add_argument("--out", default="runs/tutorial01")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
pyro.set_rng_seed(0)

# --- 1. Data: whole tensors. Training batches are binarized afresh each time (the
# Bernoulli likelihood needs x in {0, 1}); validation and test were binarized once.
train, valid, test = pv.datasets.load("digits")
print(f"digits: {len(train)} train, {len(valid)} valid, {len(test)} test, "
      f"x_dim = {train.x.shape[1]}")

# --- 2. The model. Read pyro_vae/models.py: the whole VAE is
#
#     def model(self, x, num_data=None):
#         with pyro.plate("data", num_data or len(x), subsample=x):
#             z = pyro.sample("z", self.p_z())                     # z ~ N(0, I)
#             pyro.sample("x", self.decode(z), obs=x)              # x ~ Bernoulli(f(z))
#
#     def guide(self, x, num_data=None):
#         with pyro.plate("data", num_data or len(x), subsample=x):
#             pyro.sample("z", self.encoder(x))                    # z ~ N(mu(x), sigma(x))
vae = pv.VAE(x_dim=64, z_dim=8, hidden=(128,))

# --- 3. What Pyro sees: run the guide, then the model on the guide's z.
x = next(test.batches(16, shuffle=False))
guide_trace = poutine.trace(vae.guide).get_trace(x, num_data=len(train))
model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(
    x, num_data=len(train))
model_trace.compute_log_prob()
print("\nmodel sites (batch shape | event shape, scale):")
for name in ("z", "x"):
    site = model_trace.nodes[name]
    print(f"  {name}: {tuple(site['fn'].batch_shape)} | {tuple(site['fn'].event_shape)}, "
          f"scale {site['scale']:.2f} = {len(train)} / {len(x)}")

# --- 4. The mean-field ELBO by hand, on the same noise epsilon.
elbo = pv.objectives.make_elbo("meanfield")
torch.manual_seed(1)
loss = elbo.loss(vae.model, vae.guide, x)  # num_data=None: no N / B scaling
torch.manual_seed(1)
q = vae.encode(x)
z = q.rsample()  # the same epsilon as inside the loss
recon = vae.decode(z).log_prob(x)
kl = kl_divergence(q, vae.prior().expand(q.batch_shape))
print(f"\nTraceMeanField_ELBO loss {loss:.4f}  vs  by hand -sum(recon - KL) "
      f"{-(recon - kl).sum().item():.4f}")

# --- 5. Train. fit() runs pyro.infer.SVI; it reports ELBOs per data point in nats.
history = pv.fit(vae, train, valid, epochs=args.epochs, loss="meanfield",
                 batch_size=64, lr=3e-3, progress=False)
for record in history[:: max(1, len(history) // 5)] + history[-1:]:
    print(f"epoch {record['epoch']:3d}: train ELBO {record['train_elbo']:.2f}, "
          f"valid ELBO {record['valid_elbo']:.2f}")
test_elbo = pv.elbo(vae, test, seed=0)
print(f"test ELBO: {test_elbo:.3f} nats per data point")

# --- 6. Pictures.
pv.plots.plot_samples(vae, train.image_shape, out / "samples.png")
pv.plots.plot_reconstructions(vae, test.x[:32], train.image_shape, out / "reconstructions.png")
pv.plots.plot_elbo(history, out / "elbo.png")
print(f"figures in {out}/")
