"""Tutorial 10: a model of your own, from scratch, with a discrete latent summed out
=================================================================================

A model from scratch as a plain ``PyroModule``: a mixture prior as a discrete latent
summed out by ``TraceEnum_ELBO``, the posterior over it (``infer_discrete``), stopping
and resuming exactly from a checkpoint, log p(x) with the discrete latent drawn or
summed out.

Run it::

    python tutorials/10_your_own_model.py --data-dir path/to/data [--epochs 5]
        [--ll-points 1000] [--ll-samples 500]

The maths
---------
A VAE whose prior is a mixture of K = 10 Gaussians, written with the mixture's component
as a discrete latent variable c::

    model:  c ~ Categorical(1/K),  z ~ N(mu_c, diag sigma_c^2),  x ~ Bernoulli(f(z))
    guide:  z ~ q(z | x) = N(mu(x), diag sigma(x)^2)

with mu_c, sigma_c learned. The guide does not sample c: the model sums it out. Pyro's
``TraceEnum_ELBO`` runs the guide, then evaluates the site "c" at all K values at once
(``infer={"enumerate": "parallel"}`` puts them in a new tensor dimension left of the
plates, dim -2 with ``max_plate_nesting=1``) and sums them out exactly::

    ELBO(x) = E_q(z|x)[ log p(x | z) + log sum_c p(c) p(z | c) - log q(z | x) ].

log sum_c p(c) p(z | c) = log p(z) is the mixture prior's density, so this is the
mixture-of-Gaussians VAE of tutorial 4, written so that the component is a random
variable one can ask about: given a code z, p(c | z) = p(c) p(z | c) / p(z), and for an
image, q(c | x) = E_q(z|x)[p(c | z)]. ``pyro.infer.infer_discrete`` gives the same
answer from the model itself (the most probable c with ``temperature=0``).

The model contract is Pyro's and nothing more (``pyro_vae.contract``): one object with
``model(x, num_data=None)`` and ``guide(x, num_data=None)``, every site of a data point in
``pyro.plate("data", num_data or len(x), subsample=x)``. Here that object is a plain
``PyroModule``: two ``nn.Sequential`` networks, and mu_c, sigma_c as ``PyroParam`` values (sigma_c
with a positivity constraint: it is trained as its logarithm). Two optional parts of the
contract are there too: ``check_data`` (``pv.fit`` calls it before training) and
``sample`` (``pv.plots.plot_samples`` calls it).

Log-likelihood. ``pv.log_likelihood`` samples z from the guide; the site c, absent from
the guide, is drawn from the model's own p(c), so it cancels from the weight
p(x | z) p(c) p(z | c) / (q(z | x) p(c)). Unbiased for p(x), but noisy: a c that does
not fit z gives a weight near 0, so with K components only about 1 sample in K counts.
Summing c out (what the ELBO does) gives the weight p(x | z) p(z) / q(z | x), the same
expectation with less variance (Rao-Blackwellization): at the same number of samples S
its estimate is the tighter lower bound.

Resuming. ``pv.Checkpointer(path, model)`` writes the weights and the training state
(position, optimizer, every random stream) after each epoch; ``pv.read_checkpoint(path)``
reads them back, ``model.load_state_dict(state["model"])`` restores the weights and
``pv.fit(..., resume=state["training"])`` continues (``epochs`` is the total): on the CPU
bitwise as if the run had never stopped.

What to look at
---------------
- "largest absolute difference": the run stopped half-way and resumed ends with the
  weights of the uninterrupted run, exactly (0.0 on the CPU).
- The table: the ELBO <= both estimates of log p(x), and the estimate with c summed out
  above the one with c drawn, at the same S. The +- of each is mostly the spread of
  log p(x) over images; their difference, image by image, is known far better.
- The posterior over c for a few test images: one component takes most of the mass,
  and ``infer_discrete`` picks the same component as the sum by hand (for every test
  image, printed below the table).
- "cluster-label agreement": the components were never told the digits; how well each
  matches one digit (each component counted as its most common digit). A few epochs
  give clusters of style as much as of class: two components may share a digit.
- ``samples.png``: 100 samples of the model, c ~ p(c), z ~ p(z | c).
  ``samples_per_component.png``: row c decodes codes z ~ N(mu_c, sigma_c^2): each row
  is what component c stands for. ``test_images_per_component.png``: row c holds the
  test images most confidently put in component c.
"""

import math

import torch
import torch.nn.functional as F
from torch.distributions import constraints

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, infer_discrete
from pyro.nn import PyroModule, PyroParam, pyro_method

import pyro_vae as pv
from _common import mnist, options, save_images

args = options(__doc__, "tutorial10", epochs=5, extra=[
    ("--ll-points", dict(type=int, default=1000, help="test points for log p(x)")),
    ("--ll-samples", dict(type=int, default=500, help="importance samples S"))])
if args.smoke:
    args.epochs, args.ll_points, args.ll_samples = 2, 100, 50  # two: one to resume into
    print("--smoke: 2 epochs on 1 000 points: the ELBOs, log-likelihoods and clusters "
          "below are not meaningful; the resume check is")
X, Z, K = 784, 10, 10


# %%
# 1. The model
# ------------
# A plain ``PyroModule``, model and guide as methods.
class MixturePriorVAE(PyroModule):
    guide_modules = ("encoder",)  # what makes the guide (optional: fresh guides, freezing)

    def __init__(self, hidden=(400,)):
        super().__init__()
        self.encoder = pv.nn.network("mlp", X, hidden, 2 * Z)       # x -> mu, scale
        self.decoder = pv.nn.network("mlp", Z, hidden[::-1], X)     # z -> logits of x
        self.locs = PyroParam(torch.randn(K, Z))                     # mu_c
        self.scales = PyroParam(torch.ones(K, Z), constraint=constraints.positive)  # sigma_c
        self.register_buffer("weights", torch.full((K,), 1 / K))     # p(c), not trained

    def q_z(self, x) -> dist.Distribution:
        """q(z | x): batch (B,), event (Z,)."""
        loc, s = self.encoder(x).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(s) + 1e-4).to_event(1)

    def p_z_given_c(self, c) -> dist.Distribution:
        """p(z | c) for a tensor of components: batch c.shape, event (Z,)."""
        return dist.Normal(self.locs[c], self.scales[c]).to_event(1)

    def p_x_given_z(self, z) -> dist.Distribution:
        return dist.Bernoulli(logits=self.decoder(z)).to_event(1)

    @pyro_method
    def model(self, x, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            c = pyro.sample("c", dist.Categorical(self.weights),
                            infer={"enumerate": "parallel"})  # shape (K, 1) when enumerated
            z = pyro.sample("z", self.p_z_given_c(c))         # batch (K, B) when enumerated
            pyro.sample("x", self.p_x_given_z(z), obs=x)

    @pyro_method
    def guide(self, x, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            pyro.sample("z", self.q_z(x))  # no "c": the model sums it out

    # Optional parts of the contract, used when present.
    def check_data(self, x, what="data"):
        if x.shape[-1] != X or not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(f"{what}: this model needs binary images of {X} pixels")

    @torch.no_grad()
    def sample(self, n):
        c = dist.Categorical(self.weights).sample((n,))
        return self.p_x_given_z(self.p_z_given_c(c).sample()).mean


# %%
# 2. Questions about c
# --------------------
# p(c | z) by hand, and ``infer_discrete``.
@torch.no_grad()
def log_p_z_each(vae, z):
    """log p(c) + log p(z | c) for every c: shape z.shape[:-1] + (K,)."""
    return vae.p_z_given_c(torch.arange(K, device=z.device)).log_prob(z.unsqueeze(-2)) \
        + vae.weights.log()


@torch.no_grad()
def posterior_c(vae, x, samples=64):
    """q(c | x) = E_q(z|x)[p(c | z)], (B, K), from ``samples`` draws of z."""
    z = vae.q_z(x).sample((samples,))
    return log_p_z_each(vae, z).softmax(-1).mean(0)


@torch.no_grad()
def most_probable_c(vae, x):
    """argmax_c p(c | z) at z = E_q[z | x], by Pyro: infer_discrete on the model with z
    fixed, with temperature 0 (the MAP value instead of a sample)."""
    conditioned = poutine.condition(vae.model, data={"z": vae.q_z(x).mean})
    serving = infer_discrete(conditioned, first_available_dim=-2, temperature=0)
    return poutine.trace(serving).get_trace(x).nodes["c"]["value"]


@torch.no_grad()
def log_likelihood_c_summed(vae, x, num_samples, batch_size=40):
    """log p(x) ~= log (1/S) sum_s p(x | z_s) p(z_s) / q(z_s | x), z_s ~ q(z | x), with
    p(z_s) = sum_c p(c) p(z_s | c) computed exactly."""
    out = []
    for xb in x.split(batch_size):
        q = vae.q_z(xb)
        z = q.sample((num_samples,))                               # (S, B, Z)
        log_w = (vae.p_x_given_z(z).log_prob(xb) + log_p_z_each(vae, z).logsumexp(-1)
                 - q.log_prob(z))
        out.append(log_w.logsumexp(0) - math.log(num_samples))
    return torch.cat(out)


def mean_se(values):
    return f"{values.mean().item():9.2f} +- {values.std().item() / len(values) ** 0.5:4.2f}"


train, valid, test = mnist(args)


def new_model(seed):
    torch.manual_seed(seed)
    return MixturePriorVAE().to(args.device)


def fit(vae, **kwargs):
    # No loss=: the model marks "c" for enumeration, so fit chooses TraceEnum_ELBO (with
    # max_plate_nesting read from the trace), and each epoch's record says so ("loss").
    return pv.fit(vae, train, valid, epochs=args.epochs, lr=1e-3, progress=False, **kwargs)


# %%
# 3. Train without interruption
# -----------------------------
vae = new_model(0)
history = fit(vae)
print(f"loss chosen by fit: {history[0]['loss']}")
for record in history:
    print(f"epoch {record['epoch']}: train ELBO {record['train_elbo']:8.2f}, "
          f"valid ELBO {record['valid_elbo']:8.2f} ({record['seconds']:.1f} s)")

# %%
# 4. Stopped and resumed
# ----------------------
# The same run, stopped after part of the epochs, then resumed from its checkpoint.
stop = args.epochs // 2
path = args.out / "checkpoint.pt"
interrupted = new_model(0)
fit(interrupted, hooks=[pv.Checkpointer(path, interrupted),
                        lambda record, history, model: record["epoch"] == stop])
state = pv.read_checkpoint(path, map_location=args.device)
resumed = new_model(1)  # other initial weights: all that counts comes from the file
resumed.load_state_dict(state["model"])
resumed_history = fit(resumed, resume=state["training"])
difference = max((a - b).abs().max().item() for a, b in
                 zip(vae.state_dict().values(), resumed.state_dict().values()))
print(f"\nstopped after epoch {stop} of {args.epochs}, resumed from {path.name} for epochs "
      f"{stop + 1}-{args.epochs}: largest absolute difference from the uninterrupted run's "
      f"weights {difference}; valid ELBO {resumed_history[-1]['valid_elbo']:.2f} and "
      f"{history[-1]['valid_elbo']:.2f}")

# %%
# 5. ELBO and log-likelihood
# --------------------------
vae.eval()
subset = test.subset(args.ll_points)
# pv.elbo chooses the ELBO by fit's rule: TraceEnum_ELBO here, as an explicit loss= would.
print(f"\ntest ELBO (TraceEnum_ELBO, {len(test)} points): {pv.elbo(vae, test, seed=0):.2f}")
elbo_subset = pv.elbo(vae, subset, seed=0)
assert elbo_subset == pv.elbo(vae, subset, loss=TraceEnum_ELBO(max_plate_nesting=1), seed=0)
ll_drawn = pv.log_likelihood(vae, subset, num_samples=args.ll_samples, chunk=50, seed=0)
torch.manual_seed(0)
ll_summed = log_likelihood_c_summed(vae, subset.x, args.ll_samples)
print(f"first {len(subset)} test points, S = {args.ll_samples} (mean +- standard error):")
print(f"  ELBO, c summed out              {elbo_subset:9.2f}")
print(f"  log p(x), c drawn from p(c)     {mean_se(ll_drawn)}   (pv.log_likelihood)")
print(f"  log p(x), c summed out          {mean_se(ll_summed)}   (by hand)")
print(f"  summed out - drawn, per image   {mean_se(ll_summed - ll_drawn)}   (the same images: "
      f"a far smaller standard error)")

# %%
# 6. The posterior over c
# -----------------------
x6, y6 = test.x[:6], test.labels[:6]
probs = posterior_c(vae, x6)
print("\nq(c | x) for the first test images:")
print("digit   " + "".join(f"{f'c={c}':>6}" for c in range(K)) + "   infer_discrete")
for y, p, c in zip(y6.tolist(), probs, most_probable_c(vae, x6).tolist()):
    print(f"{y:5d}   " + "".join(f"{v:6.2f}" for v in p.tolist()) + f"   c = {c}")

x_all, labels = test.x, test.labels
probs = torch.cat([posterior_c(vae, xb) for xb in x_all.split(1000)])
by_pyro = torch.cat([most_probable_c(vae, xb) for xb in x_all.split(1000)])
with torch.no_grad():
    by_hand = log_p_z_each(vae, vae.q_z(x_all).mean).argmax(-1)
print(f"infer_discrete and the sum by hand pick the same component at E[z | x] for "
      f"{int((by_pyro == by_hand).sum())} of {len(x_all)} test images")
cluster = probs.argmax(-1)
agree = 0
print("component: test images, most common digit (share)")
for c in range(K):
    members = labels[cluster == c]
    if len(members) == 0:
        print(f"  {c}: none")
        continue
    counts = torch.bincount(members, minlength=10)
    agree += int(counts.max())
    print(f"  {c}: {len(members):5d}, digit {int(counts.argmax())} "
          f"({counts.max().item() / len(members):.0%})")
print(f"cluster-label agreement (each component counted as its most common digit): "
      f"{agree / len(x_all):.1%} of {len(x_all)} test images")

# %%
# 7. Figures
# ----------
# Samples (``plot_samples`` calls the model's own ``sample()``), what each
# component generates, and the test images it claims.
pv.plots.plot_samples(vae, train.image_shape, args.out / "samples.png", n=100)
with torch.no_grad():
    c = torch.arange(K, device=args.device).repeat_interleave(10)
    images = vae.p_x_given_z(vae.p_z_given_c(c).sample()).mean
save_images(images, args.out / "samples_per_component.png",
            "row c: z ~ N(mu_c, sigma_c^2) decoded")
rows = []
for c in range(K):
    best = probs[:, c].argsort(descending=True)[:10]
    rows.append(x_all[best])
save_images(torch.cat(rows), args.out / "test_images_per_component.png",
            "row c: the 10 test images with the largest q(c | x)")
print(f"figures and checkpoint in {args.out}/")
