"""Tutorial 11: semi-supervised learning, a label as a latent variable summed out (M2)
===================================================================================

Semi-supervised learning with the label as a latent variable (M2,
``SemiSupervisedVAE``): why y is summed out by ``TraceEnum_ELBO`` rather than drawn (the
classifier's gradient, enumeration against REINFORCE: same mean, variance and cost),
what the classification weight alpha does, the decoder's use of y; analogies, confusion
matrix, validation error.

Run it::

    python tutorials/11_semi_supervised.py --data-dir path/to/data [--epochs 10]
        [--train-points 10000] [--labels 100] [--draws 200]

The maths
---------
M2 of Kingma, Rezende, Mohamed & Welling (2014), ``pv.SemiSupervisedVAE``: the digit's
class y is a latent variable of a VAE, observed for a few training images and latent for
all the others::

    model:  y ~ Cat(1/10),  z ~ N(0, I),  x ~ Bernoulli(f(y, z))
    guide:  y ~ q(y | x) = Cat(g(x))  (the classifier),  z ~ q(z | x, y)

A labelled image observes y; its ELBO::

    L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]

holds no q(y | x). An unlabelled image has y latent too::

    U(x) = E_q(y|x)[L(x, y) - log q(y | x)] = sum_y q(y | x) L(x, y) + H(q(y | x)).

Why y is summed, not sampled. L(x, y) does not depend on the classifier's weights phi,
so the gradient of U with respect to them is (sum_y grad q(y | x) = 0 removes the rest)::

    grad U = sum_y grad q(y | x) [L(x, y) - log q(y | x)]                  (10 terms)
           = E_q(y|x)[ grad log q(y | x) [L(x, y) - log q(y | x)] ]        (one y drawn)

A Gaussian z = mu + sigma * eps carries the gradient through the draw (the
reparameterization trick, tutorial 1). A label has no such path: the drawn y is a step
function of the classifier's output, its derivative zero wherever it exists. Sampling y
leaves the second line, the score-function (REINFORCE) estimator, whose weight
L - log q is hundreds of nats for an MNIST image (about the ELBO: -566 nats per image
at the start below, -154 after 200 steps) and multiplies grad log q(y | x) with a sign
and size that change with every draw. Ten classes are few enough to sum: the
guide's site ``y_unlabelled`` is marked ``infer={"enumerate": "parallel"}``, and
``TraceEnum_ELBO(max_plate_nesting=1)`` evaluates all ten labels at once (a tensor
dimension left of the data plate) and sums them exactly. That costs ten passes of the
decoder and of the encoder q(z | x, y) (all but its first layer, which sees x once)
instead of one, and leaves no variance from y at all: only z is drawn, one per label.
``Trace_ELBO`` on the same model with the mark removed draws y and builds the
REINFORCE surrogate itself (as for any site without ``rsample``, and with no baseline;
``TraceGraph_ELBO`` can add baselines, which shrink that variance but do not remove it).

What alpha does. L(x, y) does not touch q(y | x): trained on the ELBO alone, the
classifier learns from the unlabelled images only, and the labels reach it only through
the decoder, which the labelled images teach what each label looks like: q(y | x) moves
towards the labels whose p(x | y, z) explains x best. But U(x) also rewards the entropy
H(q(y | x)): where L(x, y) is about the same for every y (a decoder that draws the
digit from z and ignores y), the best q(y | x) is uniform. The paper adds a
classification term, alpha N times the mean of log q(y | x) over the labelled points
(eq. 9, alpha = 0.1, N training images): a = alpha N / N_labelled for each labelled point
(``paper_aux_weight``; 10 for 100 labels among 10 000 images). ``aux_weight=0`` leaves
it out; the model leaves it out in ``eval()`` mode too (validation sees the ELBO).

What to look at
---------------
- The two site lines: enumerated, ``y_unlabelled`` holds the ten labels, shape (10, 1); with
  the mark removed, one label drawn per image, (100,), not reparameterizable, so
  Trace_ELBO gives it a score-function term.
- The gradient table: ``--draws`` estimates of the classifier's gradient on one batch of
  100 unlabelled images (test images, their labels unused), y summed against y drawn,
  the same seed for both, at initialization and after 200 steps of training with alpha
  (two epochs). Both are unbiased: along the direction of the mean gradient their means
  agree within their standard errors (the printed distance, in standard errors, is
  below 2 about 95% of the time by chance alone). The drawn estimator's total variance
  (the trace of the covariance over the 397 510 weights) is 10^3 to 10^5 times larger.
  A summed estimate costs about 2.5 drawn ones, not 10 (the largest layers, the
  classifier's and the encoder's first, see x once), while averaging drawn estimates
  down to its variance would take from a minute to most of an hour. The ratio shrinks
  as training raises the ELBO (printed under each model's name, nats per image), which
  is most of the weight L - log q, but stays in the thousands.
- The alpha table: the same start, seed, batches and steps, with and without the
  classification term. Without it, q(y | x) stays almost uniform (its entropy near
  log 10 = 2.30) and the error is chance or worse. With it the error falls epoch by
  epoch, yet q(y | x) is still unsure and the same network trained on the 100 labelled
  images alone does better: in this short run M2 has not yet gained from the
  unlabelled images. The decoder table says why: decoded with the ten labels, one
  style gives nearly one image (a pixel sd across labels 1/20 to 1/40 of that across
  images), so L(x, y) hardly depends on y, and the entropy of 99 unlabelled images per
  batch pulls q(y | x) back towards uniform against the one labelled image's
  classification term. M2's paper figures (12% error with 100 labels) come from far
  longer runs on all 50 000 images (``benchmarks/reproduce_m2.py``).
- ``analogies.png``: the first column holds test images; row i then decodes image i's
  style z (the mean of q(z | x, y), y the classifier's label) with the labels 0..9. In
  the paper's figure each row is ten digits in one handwriting; here each row repeats
  the image's own digit: z carries the class, and y is not used yet (the decoder table).
- ``confusion.png``: the test set's confusion matrix (row: true label, column: the
  classifier's); the three most common mistakes are printed.
- ``error.png``: the validation error by epoch of the run with alpha, and its test
  error (the valid@ columns of the table).

What you should see
-------------------
``OMP_NUM_THREADS=1 python tutorials/11_semi_supervised.py`` (10 epochs on the first
10 000 training images, 100 labels, 200 gradient draws) with one torch thread on a
2-core AMD EPYC CPU that two other training processes kept busy: 3 min 40 s (3 min 30 s
to 3 min 52 s over five runs; 1.4 GB of memory at most, the 2 x 200 gradients). The
numbers are the same from run to run on the CPU, the times per estimate aside.::

    10000 training images, 100 of them labelled (10 per class, 1 per batch of 100)
    10000 validation and 10000 test images; a = alpha N / N_l = 0.1 x 10000 / 100 = 10

    y_unlabelled enumerated: shape (10, 1), the labels 0..9 left of the data plate
    y_unlabelled drawn: shape (100,), one per image; rsample: False; score function: yes

    the classifier's gradient (397510 weights): 200 estimates each on 100
    unlabelled images, the same seed for both (y drawn: REINFORCE)
    model              estimator                  ms/est  total var  along the mean (se)
    at initialization  y summed (TraceEnum_ELBO)    30.4   3.55e+04      199.7 +-    6.5
    (ELBO -566)        y drawn (Trace_ELBO)         11.8    6.9e+09    -3151.4 +- 2402.6
                       drawn / summed: variance x 1.94e+05, time x 0.39; means 1.39 se apart
                       drawn averaged to the summed variance: 1.94e+05 x 11.8 ms = 2297 s
    after 200 steps    y summed (TraceEnum_ELBO)    28.4   3.04e+04       74.9 +-    4.1
    (ELBO -154)        y drawn (Trace_ELBO)         10.7   1.93e+08      691.4 +-  347.0
                       drawn / summed: variance x 6.34e+03, time x 0.38; means 1.78 se apart
                       drawn averaged to the summed variance: 6.34e+03 x 10.7 ms = 68 s

    after 10 epochs (1000 steps), the same start, seed and batches:
                     aux_weight test error H(q(y|x))   valid@1  valid@5 valid@10
    alpha = 0                 0     93.42%      2.28     92.4%    93.5%    93.8%
    alpha = 0.1              10     35.15%      2.17     74.2%    37.6%    33.5%
    classifier alone          -     28.02%      0.33  (the 100 labelled images)

    the decoder's use of y: 1000 test images' styles decoded with each label, pixel sd
                     across the labels  across the images
    alpha = 0                   0.0036             0.1531
    alpha = 0.1                 0.0068             0.1507

    most common test mistakes (alpha = 0.1): 2 as 8 (237), 5 as 0 (143), 9 as 4 (134)
"""

import time

import torch
import torch.nn.functional as F

import pyro
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

import pyro_vae as pv
from pyro_vae.semisupervised import (classification_error, confusion_matrix,
                                     labelled_split, paper_aux_weight)
from _common import mnist, options

args = options(__doc__, "tutorial11", epochs=10, extra=[
    ("--train-points", dict(type=int, default=10000,
                            help="train on the first N training images (default: 10000)")),
    ("--labels", dict(type=int, default=100,
                      help="how many of them keep their label, a multiple of 10")),
    ("--draws", dict(type=int, default=200, help="gradient estimates per estimator"))])
if args.smoke:
    args.draws = 20
    print("--smoke: one epoch on 1 000 points: the numbers below are not meaningful")
SNAPSHOT_EPOCHS = 2  # the trained model of section 2: 200 steps on 10 000 images
BATCH = 100

# %%
# 1. The data
# -----------
# A few labels among many images.
train, valid, test = mnist(args)
train = labelled_split(train.subset(args.train_points), args.labels, seed=0)
AUX = paper_aux_weight(len(train), args.labels)  # alpha = 0.1
STEPS_PER_EPOCH = -(-len(train) // BATCH)
print(f"{len(train)} training images, {args.labels} of them labelled ({args.labels // 10} "
      f"per class, {BATCH * args.labels / len(train):g} per batch of {BATCH})")
print(f"{len(valid)} validation and {len(test)} test images; a = alpha N / N_l = "
      f"0.1 x {len(train)} / {args.labels} = {AUX:g}")


def new_model(aux_weight: float) -> pv.SemiSupervisedVAE:
    """The paper's networks (one hidden layer of 500 softplus units each, z_dim 50), the
    same initial weights every time."""
    torch.manual_seed(0)
    return pv.SemiSupervisedVAE(784, z_dim=50, hidden=(500,),
                                aux_weight=aux_weight).to(args.device)


def fit(vae, epochs: int, valid=None):
    # y_unlabelled is summed out: the model's default_loss is TraceEnum_ELBO, which fit
    # uses when no loss= is given.
    return pv.fit(vae, train, valid, epochs=epochs, batch_size=BATCH, lr=1e-3,
                  progress=False)


# %%
# 2. y summed out against y drawn
# -------------------------------
# The classifier's gradient, many times over.
def drawn(fn):
    """``fn`` with every site's enumeration mark removed: Trace_ELBO draws y. (An infer
    dict is updated, not replaced: the key has to be set, to None.)"""
    return poutine.infer_config(fn, lambda site: {"enumerate": None})


x = next(test.batches(BATCH, shuffle=False))[0]  # test images, their labels unused
vae = new_model(AUX)
with torch.no_grad():
    summed_site = poutine.trace(poutine.enum(vae.guide, first_available_dim=-2)
                                ).get_trace(x).nodes["y_unlabelled"]
    guide_trace = poutine.trace(drawn(vae.guide)).get_trace(x)
    guide_trace.compute_score_parts()
drawn_site = guide_trace.nodes["y_unlabelled"]
print(f"\ny_unlabelled enumerated: shape {tuple(summed_site['value'].shape)}, the labels "
      f"0..9 left of the data plate")
print(f"y_unlabelled drawn: shape {tuple(drawn_site['value'].shape)}, one per image; "
      f"rsample: {drawn_site['fn'].has_rsample}; score function: "
      f"{'yes' if torch.is_tensor(drawn_site['score_parts'].score_function) else 'no'}")


def gradients(vae, objective, model, guide):
    """``--draws`` estimates of the gradient of the loss on ``x`` with respect to the
    classifier's weights, flattened (draws, weights), the seconds each took and the
    mean ELBO per image."""
    params = list(vae.classifier.parameters())
    draws, elbo = [], 0.0
    pyro.set_rng_seed(1)
    start = time.perf_counter()
    for _ in range(args.draws):
        loss = objective.differentiable_loss(model, guide, x)
        draws.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        elbo -= loss.item() / len(x) / args.draws
    return torch.stack(draws), (time.perf_counter() - start) / args.draws, elbo


def compare(label: str, vae) -> None:
    summed = gradients(vae, TraceEnum_ELBO(max_plate_nesting=1), vae.model, vae.guide)
    sampled = gradients(vae, Trace_ELBO(), drawn(vae.model), drawn(vae.guide))
    # Unbiased, both: their means agree within their standard errors. Checked along the
    # direction that matters, that of the mean gradient (the summed estimates' mean).
    direction = summed[0].mean(0) / summed[0].mean(0).norm()
    along = []
    for name, (g, seconds, _) in (("y summed (TraceEnum_ELBO)", summed),
                                  ("y drawn (Trace_ELBO)", sampled)):
        a = g @ direction
        along.append((a.mean().item(), a.std().item() / args.draws ** 0.5))
        print(f"{label:<18} {name:<26} {seconds * 1000:6.1f} {g.var(0).sum().item():10.3g}"
              f" {along[-1][0]:10.1f} +- {along[-1][1]:6.1f}")
        label = f"(ELBO {summed[2]:.0f})"  # nats per image, this batch
    (m1, se1), (m2, se2) = along
    ratio = (sampled[0].var(0).sum() / summed[0].var(0).sum()).item()
    apart = abs(m1 - m2) / (se1 ** 2 + se2 ** 2) ** 0.5
    print(f"{'':<18} drawn / summed: variance x {ratio:.3g}, time x "
          f"{sampled[1] / summed[1]:.2f}; means {apart:.2f} se apart")
    print(f"{'':<18} drawn averaged to the summed variance: {ratio:.3g} x "
          f"{sampled[1] * 1000:.1f} ms = {ratio * sampled[1]:.0f} s")


n_params = sum(p.numel() for p in vae.classifier.parameters())
print(f"\nthe classifier's gradient ({n_params} weights): {args.draws} estimates each on "
      f"{len(x)}\nunlabelled images, the same seed for both (y drawn: REINFORCE)")
print(f"{'model':<18} {'estimator':<26} {'ms/est':>6} {'total var':>10} "
      f"{'along the mean (se)':>20}")
compare("at initialization", vae)
vae = new_model(AUX)
fit(vae, SNAPSHOT_EPOCHS)
compare(f"after {SNAPSHOT_EPOCHS * STEPS_PER_EPOCH} steps", vae)

# %%
# 3. What alpha does
# ------------------
# The same run with and without the classification term.
runs = {}
for name, aux_weight in (("alpha = 0", 0.0), ("alpha = 0.1", AUX)):
    vae = new_model(aux_weight)
    history = fit(vae, args.epochs, valid)
    vae.eval()
    runs[name] = (vae, history)

# %%
# The yardstick: the classifier network alone on the labelled images, cross-entropy.
known = train.spread
x_known, y_known = train.x[known], train.labels[known]
classifier = new_model(0.0).classifier
optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
for _ in range(500):  # full batches, each binarized afresh as the training images are
    optimizer.zero_grad()
    F.cross_entropy(classifier(torch.bernoulli(x_known)), y_known).backward()
    optimizer.step()
with torch.no_grad():
    alone = 100.0 * (classifier(test.x).argmax(-1) != test.labels).double().mean().item()


def entropy(logits) -> float:
    """The mean entropy of q(y | x) over the test images, nats (uniform: log 10 = 2.30)."""
    return torch.distributions.Categorical(logits=logits).entropy().mean().item()


shown = sorted({1, args.epochs // 2, args.epochs} - {0})
print(f"\nafter {args.epochs} epochs ({args.epochs * STEPS_PER_EPOCH} steps), the same "
      f"start, seed and batches:")
print(f"{'':<16} {'aux_weight':>10} {'test error':>10} {'H(q(y|x))':>9}  "
      + " ".join(f"{f'valid@{e}':>8}" for e in shown))
for name, (vae, history) in runs.items():
    error = classification_error(vae, test)
    with torch.no_grad():
        h = entropy(vae.classifier(test.x))
    print(f"{name:<16} {vae.aux_weight:10g} {error:9.2f}% {h:9.2f}  "
          + " ".join(f"{history[e - 1]['valid_error']:7.1f}%" for e in shown))
with torch.no_grad():
    h = entropy(classifier(test.x))
print(f"{'classifier alone':<16} {'-':>10} {alone:9.2f}% {h:9.2f}  (the {len(x_known)} "
      f"labelled images)")

# %%
# Does p(x | y, z) depend on y? Styles z of test images decoded with every label.
print(f"\nthe decoder's use of y: {min(1000, len(test))} test images' styles decoded with "
      f"each label, pixel sd")
print(f"{'':<16} {'across the labels':>17} {'across the images':>18}")
for name, (vae, _) in runs.items():
    decoded = vae.analogies(test.x[:1000])  # (labels, images, pixels)
    print(f"{name:<16} {decoded.std(0).mean().item():17.4f} "
          f"{decoded.std(1).mean().item():18.4f}")

# %%
# 4. Figures of the run with alpha
# --------------------------------
# Analogies, confusion matrix, validation error.
vae, history = runs["alpha = 0.1"]
pv.plots.plot_classifier(vae, test, history, args.out)
counts = confusion_matrix(vae, test)
mistakes = counts - torch.diag(torch.diag(counts))
top = mistakes.flatten().argsort(descending=True)[:3]
print("\nmost common test mistakes (alpha = 0.1): " + ", ".join(
    f"{int(i) // 10} as {int(i) % 10} ({int(mistakes.flatten()[i])})" for i in top))
print(f"figures in {args.out}/")
