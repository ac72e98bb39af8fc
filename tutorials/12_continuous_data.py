"""Tutorial 12: gray images, three likelihoods for them, and a badly started sigma
===============================================================================

Gray data (Frey Faces): the ``gaussian_decoded``, ``discretized_logistic`` and
``continuous_bernoulli`` heads side by side, why a density's log p(x) and a
probability's (bits/dim) are in different units; a Gaussian sigma started at 1 against
0.1, and the mean face it decodes to. Needs ``frey-faces/freyfaces_uint8_1965x560.npy``
in the data folder: it is not downloaded (there is no public mirror).

Run it::

    python tutorials/12_continuous_data.py --data-dir path/to/data [--epochs 100]
        [--ll-samples 1000]

Frey Faces: 1 965 gray 28 x 20 frames of a video of one face (1 565 train, 200
validation, 200 test), pixels k / 255 for k in 0..255, so D = 560 values on a grid in
[0, 1]. The file is not downloaded: put ``frey-faces/freyfaces_uint8_1965x560.npy`` in
the data folder.

The maths
---------
One VAE (z_dim 20, one hidden layer of 400 each way, the same start and data), three
likelihood heads p(x | z), each a product over the D pixels:

- ``gaussian_decoded``: N(x_d; mu_d(z), sigma_d(z)^2), the decoder predicting a mean and
  a scale for every pixel of every image. A density on R^D: it ignores that pixels lie
  in [0, 1] and on 256 levels, and it grows without bound as sigma_d -> 0 on a pixel it
  predicts exactly (the head keeps sigma >= 1e-3, so a pixel adds at most 5.99 nats).
- ``discretized_logistic``: P(x_d = k / 255) = F(x_d + 1/510) - F(x_d - 1/510), F the
  logistic CDF with location mu_d(z) and scale s_d(z); the two edge bins take the tails
  so the 256 probabilities sum to one. A probability (the VampPrior paper's likelihood
  for gray data): log P(x) <= 0, and -log2 P(x) / D is bits per dimension, comparable
  with any other model of the same 8-bit data.
- ``continuous_bernoulli``: C(l) lambda^x (1 - lambda)^(1 - x), lambda = sigmoid(l_d(z)),
  with the normalizer C(l) that makes it a density on [0, 1] (the Bernoulli's formula on
  gray data is not normalized). A density on [0, 1]^D; its mean is not lambda.

Units. A density's log p(x) is nats per image per unit volume of x: rescale x by a and it
moves by -D log a. It is not a log-probability and is not compared with one. The way to
compare: dequantize. Spread each level k over a cell of width w, y = (k + u) w with
u ~ U[0, 1)^D (w = 1/255; 1/256 keeps y in [0, 1]), and fit the density to y; then
P(k) = integral of p over the cell >= w^D exp(E_u log p(y)) (Jensen), i.e. log P(k) >=
E_u[log p(y)] - D log(1/w) (D log 255 = 3103.1 nats here). The densities here are
trained and evaluated on the grid points themselves, where they may put narrow spikes,
so that bound does not apply to their numbers: read them as densities only (the two are
in the same units, but on 8-bit data comparing them rewards spikes on the grid more than
good faces).

sigma's start. The plain ``gaussian`` head learns one sigma per pixel for all images.
Its reconstruction term is -(x_d - mu_d)^2 / (2 sigma_d^2) per pixel: with sigma ~ 1 on
data in [0, 1], what a code z can explain is worth at most 560 x 0.0116 / 2 = 3.3 nats
per image (0.0116: the test pixels' mean squared distance to the mean face), too little
to pay for the KL of a code, so the encoder learns to carry nothing and the decoder
draws the mean face for every image. Adam moves sigma's raw parameter by at most about
lr per step, so sigma comes down slowly (here from 1 to 0.36 in 100 epochs of 13 steps);
only as it does does the latent start to pay. Started at 0.1 (the head's default), the
reconstruction term is weighted 100 times more from the first step.

What to look at
---------------
- The first table: the test ELBO <= log p(x) (importance-sampled, S = --ll-samples) of
  each head, in its own units: the two densities are positive (a density can exceed 1),
  the probability negative, with its bits per dimension.
- The second table, what each code carries: the KL term (nats per image), the spread of
  the test images' codes (the sd of q(z), the mixture of their posteriors; p(z) has sd
  1), and the reconstruction error, far below the mean face's for every head: each uses
  its latent. The heads whose decoder predicts a scale spend many more nats on the code.
- ``samples.png``: those two heads draw poor faces from p(z). Their sharp posteriors
  fill a small part of z-space (q(z) sd well below 1), so most draws from N(0, I) land
  where the decoder never trained; a good test likelihood and good samples from p(z) are
  different questions (a prior fitted to q(z), the VampPrior of tutorial 4, is one
  answer). The continuous Bernoulli's codes carry few nats and spread like p(z): its
  samples are faces, close to the mean face.
- ``reconstructions.png``: test faces and each head's reconstructions.
- The sigma table and ``sigma_start.png``: started at 1, sigma is still large after the
  run, and the reconstruction error sits at the mean face's for tens of epochs (the
  decoder draws the mean face) before it falls; started at 0.1 it falls from the first
  epoch.

What you should see
-------------------
``OMP_NUM_THREADS=1 python tutorials/12_continuous_data.py`` (100 epochs, S = 1000) on
a 2-core Intel Xeon CPU with one torch thread: 1 min 32 s. (On a busy 2-core machine, one
torch thread is much faster than two for these small networks.)::

    Frey Faces: 1565 train, 200 valid, 200 test images of 28 x 20 gray pixels (k / 255)

    head                   likelihood of  test ELBO    log p(x) +- se  bits/dim
    gaussian_decoded       density          1078.42  1111.61 +- 14.20         -
    discretized_logistic   probability     -1973.75 -1940.13 +- 13.48     4.998
    continuous_bernoulli   density           140.06   141.67 +-  1.77         -
    (nats per image; log p(x): S = 1000 on the 200 test faces)

    head                         KL  q(z) sd  recon MSE   (p(z) = N(0, I): sd 1)
    gaussian_decoded          72.63    0.288    0.00248
    discretized_logistic      75.32    0.263    0.00224
    continuous_bernoulli       6.62    0.999    0.00389
    the mean face                               0.01164   (the training images' mean)

    sigma start    learned sigma    recon MSE   (mean face 0.01164)
    1.0                    0.362      0.00885
    0.1 (default)          0.074      0.00221
    recon MSE by epoch               1       25       50       75      100
      sigma start 1.0           0.16502  0.01267  0.01195  0.01288  0.00885
      sigma start 0.1 (default) 0.02509  0.00551  0.00356  0.00272  0.00221
"""

import math

import matplotlib.pyplot as plt
import torch

import pyro_vae as pv
from _common import frey, options, save_figure

args = options(__doc__, "tutorial12", epochs=100, extra=[
    ("--ll-samples", dict(type=int, default=1000, help="importance samples S"))])
if args.smoke:
    args.ll_samples = 20
    print("--smoke: one epoch on 500 points: the numbers below are not meaningful "
          "(any ranking among them is arbitrary)")
train, valid, test = frey(args)
SHAPE, D, Z = train.image_shape, train.x.shape[1], 20  # (28, 20), 560
print(f"Frey Faces: {len(train)} train, {len(valid)} valid, {len(test)} test images of "
      f"{SHAPE[0]} x {SHAPE[1]} gray pixels (k / 255)")

mean_face = train.x.mean(0)
mean_face_mse = ((test.x - mean_face) ** 2).mean().item()


def mse(vae) -> float:
    """Per-pixel squared error of the test faces' reconstructions."""
    return ((vae.reconstruct(test.x) - test.x) ** 2).mean().item()


def train_vae(likelihood, likelihood_options=None, hooks=()):
    """The same VAE, start and data for every head; only p(x | z) differs."""
    torch.manual_seed(0)
    vae = pv.VAE(D, Z, (400,), likelihood=likelihood,
                 likelihood_options=likelihood_options).to(args.device)
    pv.fit(vae, train, valid, epochs=args.epochs, batch_size=128, lr=1e-3,
           progress=False, hooks=hooks)
    vae.eval()
    return vae


def draw_rows(ax, rows: dict, title: str) -> None:
    """Images (n, D) as labelled rows, one row per entry of ``rows``."""
    ncols = max(len(images) for images in rows.values())
    images = torch.cat([torch.cat([v.cpu(), torch.ones(ncols - len(v), D)]) for v in
                        rows.values()])
    ax.imshow(pv.plots.image_grid(images, SHAPE, ncols).numpy(), cmap="gray", vmin=0,
              vmax=1, interpolation="nearest")
    ax.set_yticks([(SHAPE[0] + 1) * i + SHAPE[0] / 2 for i in range(len(rows))],
                  list(rows), fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)


def save_rows(rows: dict, path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(max(len(v) for v in rows.values()) * 0.55 + 1.5,
                                    len(rows) * 0.75 + 0.5))
    draw_rows(ax, rows, title)
    save_figure(fig, path)


# %%
# 1. Three heads for gray data, side by side
# ------------------------------------------
HEADS = ("gaussian_decoded", "discretized_logistic", "continuous_bernoulli")
heads, codes = {}, {}
print(f"\n{'head':<22} {'likelihood of':<13} {'test ELBO':>10} {'log p(x) +- se':>17} "
      f"{'bits/dim':>9}")
for name in HEADS:
    vae = heads[name] = train_vae(name)
    measured = pv.evaluation.units(vae, test)   # probability or density, and D
    elbo = pv.elbo(vae, test, seed=0)
    ll = pv.log_likelihood(vae, test, num_samples=args.ll_samples, seed=0)
    nats, se = ll.mean().item(), ll.std().item() / math.sqrt(len(ll))
    bits = (f"{pv.evaluation.bits_per_dim(nats, measured['dims']):9.3f}"
            if vae.likelihood.discrete else f"{'-':>9}")
    print(f"{name:<22} {measured['likelihood_of']:<13} {elbo:10.2f} {nats:8.2f} +- "
          f"{se:5.2f} {bits}")
    # What the code carries: KL = E_q log p(x|z) - ELBO; the spread of q(z), the test
    # posteriors' mixture: sqrt of Var E[z|x] + E Var[z|x], averaged over dimensions.
    with torch.no_grad():
        q = vae.encode(test.x)
        spread = (q.mean.var(0) + q.variance.mean(0)).mean().sqrt().item()
    codes[name] = (pv.elbo(vae, test, seed=0, beta=0.0) - elbo, spread, mse(vae))
print(f"(nats per image; log p(x): S = {args.ll_samples} on the {len(test)} test faces)")

print(f"\n{'head':<22} {'KL':>8} {'q(z) sd':>8} {'recon MSE':>10}   (p(z) = N(0, I): sd 1)")
for name, (kl, spread, error) in codes.items():
    print(f"{name:<22} {kl:8.2f} {spread:8.3f} {error:10.5f}")
print(f"{'the mean face':<40} {mean_face_mse:10.5f}   (the training images' mean)")

faces = test.x[:12]
rows = {"test faces": faces}
rows.update({name: vae.reconstruct(faces) for name, vae in heads.items()})
save_rows(rows, args.out / "reconstructions.png",
          "test faces and the mean of p(x | z) at z = E[z | x], a row per head")
samples = {}
for name, vae in heads.items():
    torch.manual_seed(1)
    samples[name] = vae.sample(12)
save_rows(samples, args.out / "samples.png", "mean of p(x | z), z ~ p(z), a row per head")


# %%
# 2. The plain Gaussian head
# --------------------------
# sigma started at 1 against the default 0.1.
def recorder(log):
    """An on_epoch_end hook: the test reconstruction error and the mean sigma."""
    def hook(record, history, model):
        log.append((record["epoch"], mse(model), model.likelihood.scale.mean().item()))
    return hook


STARTS = {"1.0": 1.0, "0.1 (default)": 0.1}
gaussians, logs = {}, {}
for label, start in STARTS.items():
    logs[label] = []
    gaussians[label] = train_vae("gaussian", {"init_scale": start},
                                 hooks=[recorder(logs[label])])

print(f"\n{'sigma start':<14} {'learned sigma':>13} {'recon MSE':>12}   "
      f"(mean face {mean_face_mse:.5f})")
for label, vae in gaussians.items():
    print(f"{label:<14} {vae.likelihood.scale.mean().item():13.3f} {mse(vae):12.5f}")
shown = sorted({1, *(round(args.epochs * f) for f in (0.25, 0.5, 0.75)), args.epochs}
               - {0})
print(f"{'recon MSE by epoch':<27}" + "  ".join(f"{e:>7d}" for e in shown))
for label, log in logs.items():
    print(f"  sigma start {label:<14}" + "  ".join(f"{log[e - 1][1]:7.5f}" for e in shown))

fig = plt.figure(figsize=(9, 6.5))
grid = fig.add_gridspec(2, 2, height_ratios=(1, 0.8), hspace=0.35, wspace=0.3)
ax_mse, ax_sigma = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
for label, log in logs.items():
    epochs, errors, sigmas = zip(*log)
    ax_mse.plot(epochs, errors, marker="." if len(log) < 30 else None,
                label=f"sigma starts at {label}")
    ax_sigma.plot(epochs, sigmas, marker="." if len(log) < 30 else None)
ax_mse.axhline(mean_face_mse, color="gray", linestyle="--", linewidth=1,
               label="the mean face")
ax_mse.set(xlabel="epoch", ylabel="test reconstruction MSE per pixel", yscale="log")
ax_mse.legend(fontsize=8)
ax_sigma.set(xlabel="epoch", ylabel="mean sigma of p(x | z)", yscale="log")
for ax in (ax_mse, ax_sigma):
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
draw_rows(fig.add_subplot(grid[1, :]),
          {"test faces": faces, "mean face": mean_face.expand(1, D),
           **{f"sigma start {k}": v.reconstruct(faces) for k, v in gaussians.items()}},
          f"reconstructions after {args.epochs} epoch{'s' * (args.epochs != 1)}")
fig.suptitle("gaussian head: sigma started at 1 and at 0.1", fontsize=10)
save_figure(fig, args.out / "sigma_start.png")
print(f"figures in {args.out}/")
