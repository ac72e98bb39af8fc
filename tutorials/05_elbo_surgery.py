"""Tutorial 5: ELBO surgery, where a better prior wins
===================================================

ELBO surgery of tutorial 4's models: where a better prior wins.

Run it::

    python tutorials/05_elbo_surgery.py --data-dir path/to/data [--models runs/tutorial04]
        [--points 10000]

The maths
---------
Hoffman & Johnson (2016) split the average KL term of the ELBO over N data points with
the aggregate posterior q(z) = (1/N) sum_n q(z | x_n)::

    ELBO = E[log p(x_n | z)] - I(n; z) - KL(q(z) || p(z)),
    (1/N) sum_n KL(q(z | x_n) || p(z)) = I(n; z) + KL(q(z) || p(z)).

I(n; z), the mutual information between the data index and the code, is what the code
must carry to tell the points apart (at most log N). KL(q(z) || p(z)), the marginal KL,
is pure waste: the price of a prior that does not match the codes the encoder uses.
``pyro_vae.evaluation.elbo_surgery`` estimates every term from one z_n ~ q(z | x_n) per
point, with log q(z_n) evaluated against all N posteriors.

What to look at
---------------
- The table, for the three models of tutorial 4 (trained here if ``--models`` does not
  hold them): the reconstruction terms and I(n; z) are close across priors, the marginal
  KL is not, and it is where the VampPrior gains its ELBO. That is Hoffman & Johnson's
  lesson: a better prior wins through the marginal KL, not by squeezing I(n; z). On the
  full test set I(n; z) sits at its ceiling log N for every prior: each code tells its
  image apart from all others, so nothing is to be gained there.
- ``elbo_surgery.png``: the terms side by side.
"""

import matplotlib.pyplot as plt

import pyro_vae as pv
from _common import mnist, options, prior_models, save_figure

args = options(__doc__, "tutorial05", epochs=10, extra=[
    ("--models", dict(default="runs/tutorial04", help="folder with tutorial 4's models")),
    ("--points", dict(type=int, default=10000, help="test points (N) for the surgery"))])
if args.smoke:
    args.points = 300
    print("--smoke: one epoch on 1 000 points: the numbers below are not meaningful "
          "(any ranking among them is arbitrary)")
train, valid, test = mnist(args)
models = prior_models(args, train, valid, folder=args.models)

# %%
# 1. The surgery
# --------------
# Every term from one z_n ~ q(z | x_n) per point, for each of tutorial 4's models.
data = test.subset(args.points)
terms = ("reconstruction", "mutual_information", "marginal_kl", "avg_kl", "elbo")
labels = ("E log p(x|z)", "I(n; z)", "KL(q(z)||p(z))", "average KL", "ELBO")
results = {name: pv.evaluation.elbo_surgery(vae, data) for name, vae in models.items()}
log_n = next(iter(results.values()))["log_n"]
print(f"\nELBO surgery on {len(data)} test points (nats per point; I(n; z) <= log N = "
      f"{log_n:.2f}):")
print(f"{'prior':<22}" + "".join(f"{label:>16}" for label in labels))
for name, r in results.items():
    print(f"{name:<22}" + "".join(f"{r[t]:16.2f}" for t in terms))

base, vamp = results["standard normal"], results["VampPrior"]
gain = vamp["elbo"] - base["elbo"]
print(f"\nVampPrior against the standard normal: ELBO {gain:+.2f}, of which marginal KL "
      f"{base['marginal_kl'] - vamp['marginal_kl']:+.2f}, I(n; z) "
      f"{base['mutual_information'] - vamp['mutual_information']:+.2f}, reconstruction "
      f"{vamp['reconstruction'] - base['reconstruction']:+.2f}")

# %%
# 2. The terms side by side
# -------------------------
# Two panels: the KL terms (a few to tens of nats) and the totals (about -100).
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8),
                                  gridspec_kw={"width_ratios": [3, 2]})
width = 0.8 / len(results)
for ax, panel in ((left, (1, 2, 3)), (right, (0, 4))):
    for i, (name, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(panel))]
        bars = ax.bar(xs, [r[terms[k]] for k in panel], width, label=name)
        for bar in bars:
            v = bar.get_height()
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=7)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(panel))])
    ax.set_xticklabels([labels[k] for k in panel], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
left.axhline(log_n, color="gray", linestyle="--", linewidth=1,
             label=f"log N = {log_n:.2f}")
left.set_ylabel("nats per data point")
left.legend(fontsize=8)
fig.suptitle("ELBO = E log p(x|z) - I(n; z) - KL(q(z) || p(z))", fontsize=10)
save_figure(fig, args.out / "elbo_surgery.png")
print(f"figure in {args.out}/")
