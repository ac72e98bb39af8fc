"""Tutorial 6: write your own model in Pyro style, from the package's parts
========================================================================

Your own model in Pyro style: a conditional VAE, a prior of your own through the
registry.

Run it::

    python tutorials/06_custom_model.py --data-dir path/to/data [--epochs 10]

The maths
---------
A conditional VAE (Sohn et al. 2015) observes a label y beside each image x::

    model:  z ~ p(z),            x ~ p(x | z, y) = Bernoulli(f([z, y]))
    guide:  z ~ q(z | x, y) = N(mu([x, y]), diag sigma([x, y])^2)

The label is an input, not a random variable: the code z is left to carry what the label
does not, the style of the digit. Sampling z ~ p(z) with a chosen y draws that digit.

The parts of this package have small contracts (see their module docstrings):

- a likelihood head: ``head(features) -> Distribution`` with event shape (x_dim,);
- a prior: ``prior(encoder) -> Distribution`` with event shape (z_dim,);
- a guide family: ``encoder(x) -> Distribution``, batch (B,), event (z_dim,).

Any class that keeps to them can be registered by name (``pv.PRIORS["name"] = Class``)
and then used wherever names are accepted: ``pv.VAE(prior=...)``, ``pyro-vae train
--prior``, or a model of your own, as here.

How the labels reach the model: a split can hold several tensors with one row per point;
``train.with_labels()`` makes its batches ``(x, y)``, and ``pv.fit`` calls
``model(x, y, num_data=N)`` and ``guide(x, y, num_data=N)``. Dynamic binarization draws x
only. The model has no ``beta`` argument: ``pv.fit(..., beta=...)`` weights its latent
sites through a Pyro handler (``pv.scale_latents``).

What to look at
---------------
- The warning logged when training starts: the Student-t prior has no closed-form KL
  against the Gaussian guide, so ``TraceMeanField_ELBO`` uses a one-sample Monte Carlo
  KL (pyro_vae says so once).
- ``cvae_samples.png``: row d holds samples z ~ p(z) decoded with label d: each row is
  one digit, each column one style. A column of odd shapes is a draw from the
  Student-t's heavy tails, a code far outside those the encoder gives to real images.
  The code is kept small (4 dimensions): with room to spare, z would carry the digit's
  identity too, and the decoder would learn to ignore the label.
- ``style_transfer.png``: the codes of a few test images (left column) decoded with
  every label: the style (slant, thickness) stays, the digit changes.
- ``model.png``: Pyro's drawing of the model (``pyro.render_model``) when the graphviz
  Python package and program are installed; otherwise a line says it was skipped.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule, pyro_method

import pyro_vae as pv
from _common import mnist, options, save_images

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
args = options(__doc__, "tutorial06", epochs=10)
if args.smoke:
    print("--smoke: one epoch on 1 000 points: the ELBOs below are not meaningful")
X, Y, Z = 784, 10, 4


# %%
# 1. A prior of our own
# ---------------------
# Heavier tails than N(0, I). Registered by name.
class StudentTPrior(nn.Module):
    """p(z) = prod_k StudentT(z_k; df, 0, 1)."""

    def __init__(self, z_dim: int, df: float = 4.0):
        super().__init__()
        # Buffers follow .to(device) and are saved with the model; they are not trained.
        self.register_buffer("df", torch.full((z_dim,), df))
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self, encoder=None) -> dist.Distribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


pv.PRIORS["student_t"] = StudentTPrior


# %%
# 2. The conditional VAE
# ----------------------
# One ``PyroModule``, model and guide as methods (as ``pv.VAE``).
class ConditionalVAE(PyroModule):
    guide_modules = ("encoder",)  # what makes the guide (freeze_model, fresh guides)

    def __init__(self, prior: str = "student_t", hidden=(400,)):
        super().__init__()
        self.encoder = pv.DiagonalNormalEncoder(X + Y, Z, hidden)
        self.decoder = pv.nn.network("mlp", Z + Y, hidden[::-1], X)
        self.likelihood = pv.BernoulliLikelihood(X)
        self.prior = pv.PRIORS[prior](Z)

    def p_z(self):
        return self.prior()

    def decode(self, z, y):
        return self.likelihood(self.decoder(torch.cat([z, y], dim=-1)))

    def check_data(self, x, y, what="data"):  # optional: refused before training
        self.likelihood.check(x, what)

    @pyro_method
    def model(self, x, y, num_data=None):
        y = F.one_hot(y, Y).to(x.dtype)
        with pyro.plate("data", num_data or len(x), subsample=x):
            z = pyro.sample("z", self.p_z())
            pyro.sample("x", self.decode(z, y), obs=x)

    @pyro_method
    def guide(self, x, y, num_data=None):
        y = F.one_hot(y, Y).to(x.dtype)
        with pyro.plate("data", num_data or len(x), subsample=x):
            pyro.sample("z", self.encoder(torch.cat([x, y], dim=-1)))


# %%
# 3. Training
# -----------
# The batches are ``(x, y)``: ``fit`` calls ``model(x, y, num_data=N)``.
train, valid, test = [split.with_labels() for split in mnist(args)]

cvae = ConditionalVAE().to(args.device)
history = pv.fit(cvae, train, valid, epochs=args.epochs, progress=False)
print(f"conditional VAE, Student-t prior: valid ELBO {history[-1]['valid_elbo']:.2f} "
      f"after {args.epochs} epochs; test ELBO {pv.elbo(cvae, test, seed=0):.2f}")

# %%
# 4. Samples per label
# --------------------
# And the style of test images under every label.
cvae.eval()
labels = torch.eye(Y, device=args.device)
with torch.no_grad():
    z = cvae.p_z().sample((Y,))                           # 10 styles
    zz = z.repeat(Y, 1)                                   # row d: the 10 styles ...
    yy = labels.repeat_interleave(Y, 0)                   # ... with label d
    save_images(cvae.decode(zz, yy).mean, args.out / "cvae_samples.png",
                "row d: z ~ p(z) decoded with label d")
    x6 = test.x[:6]
    codes = cvae.encoder(torch.cat([x6, labels[test.labels[:6]]], -1)).mean  # 6 styles
    rows = []
    for i in range(len(codes)):
        rows += [x6[i:i + 1], cvae.decode(codes[i].expand(Y, Z), labels).mean]
    save_images(torch.cat(rows), args.out / "style_transfer.png",
                "a test image, then its code decoded with labels 0-9", ncols=Y + 1)

# %%
# 5. The model's graph
# --------------------
# Pyro draws it, if graphviz is there.
try:
    graph = pyro.render_model(cvae.model, model_args=(test.x[:4], test.labels[:4]),
                              render_distributions=True)
    graph.render(args.out / "model", format="png", cleanup=True)
    print(f"model graph: {args.out / 'model.png'}")
except Exception as e:  # graphviz (the Python package or the dot program) is missing
    print(f"model graph skipped: pyro.render_model needs graphviz ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''})")
print(f"figures in {args.out}/")
