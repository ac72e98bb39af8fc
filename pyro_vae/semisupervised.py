"""Semi-supervised learning with a label as a latent variable: M2 of Kingma, Rezende,
Mohamed & Welling, "Semi-supervised learning with deep generative models" (NeurIPS 2014).

::

    Model:  y ~ Cat(1/C),  z ~ p(z),  x ~ p(x | decoder(z, y))
    Guide:  y ~ q(y | x) = Cat(classifier(x)),  z ~ q(z | x, y) = N(mu(x, y), diag sigma(x, y)^2)

A labelled point observes y: its ELBO is

    L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)],

and q(y | x) takes no part in it. An unlabelled point sums y out under the classifier::

    U(x) = sum_y q(y | x) L(x, y) + H(q(y | x)),

which Pyro's ``TraceEnum_ELBO`` computes from the guide's site ``y_unlabelled`` marked
``infer={"enumerate": "parallel"}``: all C labels in one tensor dimension left of the data
plate, no Python loop over classes. The objective over a data set is
sum_labelled [L(x, y) + a log q(y | x)] + sum_unlabelled U(x), where a = ``aux_weight``
per labelled point: without it the classifier learns from unlabelled points only. The
paper's eq. 9 weights the mean of log q(y | x) over labelled points by alpha N (N
training points, alpha = 0.1), i.e. a = alpha N / N_labelled (``paper_aux_weight``).

Labelled and unlabelled points share a batch: each site of the labelled part sits under
``poutine.mask(known)``, each of the unlabelled part under ``poutine.mask(~known)``. (A
single site ``y`` with ``obs_mask`` would not do: where y is observed, the guide's masked
enumerated site still contributes each of its C values with weight exp(0) = 1, counting
a labelled point C times.) Batches built by ``labelled_split`` spread the labelled points
evenly over every epoch's batches (``TensorDataset.spread``): each once per epoch, the
paper's rate, or repeated to a chosen share of every batch.
"""

import contextlib
import dataclasses
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule, pyro_method

from .datasets import TensorDataset, as_dataset
from .errors import ArgumentError
from .evaluation import seeded
from .guides import _check_scale, _positive
from .models import MODELS, _plate_size, build, check_sizes, likelihood_head
from .nn import GatedDense, network
from .priors import PRIORS


class LabelledNetwork(nn.Module):
    """An ``arch`` network of [v, one_hot(y)]: its first layer is computed as
    W_v v + W_y[:, y] + b, so that v goes through the large W_v once for every label y
    (v of shape (B, D) and y of shape (C, 1), enumerated, give (C, B, out))."""

    def __init__(self, arch: str, in_features: int, num_classes: int,
                 hidden: Sequence[int], out_features: int, act: str = "relu"):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.net = network(arch, in_features + num_classes, hidden, out_features, act)

    def _affine(self, layer: nn.Linear, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w_v, w_y = layer.weight[:, :self.in_features], layer.weight[:, self.in_features:]
        # one_hot(y) @ W_y^T picks W_y's columns; a matmul's gradient is deterministic on
        # every thread count, unlike indexing's scatter-add (exact resume relies on it).
        # (y == arange) is one_hot without its range check, which reads y's values on the
        # host: a recorded step (compile=True) would guard on every batch's labels.
        one_hot = y.unsqueeze(-1) == torch.arange(self.num_classes, device=y.device)
        picked = one_hot.to(w_y.dtype) @ w_y.t()
        return F.linear(v, w_v, layer.bias) + picked

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        first, *rest = self.net
        if isinstance(first, GatedDense):
            h = self._affine(first.h, v, y) * torch.sigmoid(self._affine(first.g, v, y))
        else:
            h = self._affine(first, v, y)
        for layer in rest:
            h = layer(h)
        return h


def _masked(mask: Optional[torch.Tensor]):
    return contextlib.nullcontext() if mask is None else poutine.mask(mask=mask)


class SemiSupervisedVAE(PyroModule):
    """M2 (Kingma et al. 2014) as a Pyro model/guide pair; see the module's docstring.

    ``model(x, y=None, known=None, num_data=None)``: without ``y`` every point is
    unlabelled (y summed out); with ``y`` and no ``known`` every point is labelled; with
    both, ``known`` (bool, (B,)) says which labels count (the others may hold anything).

    p(z) is any prior of ``PRIORS`` not built on the encoder (the VampPrior's components
    are q(z | u), and here q(z | x, y) needs a label too); p(x | y, z) any likelihood head.
    The classifier, q(z | x, y) and the decoder are ``arch`` networks through ``hidden``
    (the decoder mirrors it); the paper's: one layer of 500 softplus units, z_dim 50.
    ``aux_weight``: a, the weight of log q(y | x) per labelled point (0: off), in training
    mode only (``model.eval()`` leaves it out: evaluation sees the ELBO alone).
    ``scale``: how q(z | x, y)'s network gives sigma, as for ``DiagonalNormalEncoder``.
    """

    guide_modules = ("classifier", "encoder")

    #: The objective ``fit`` and ``elbo`` use unless told otherwise (``loss="auto"``): the
    #: label summed out exactly by enumeration (see ``pyro_vae.objectives.choose_elbo``).
    default_loss = "enum"

    def __init__(self, x_dim: int, z_dim: int = 50, hidden: Sequence[int] = (500,),
                 num_classes: int = 10, likelihood: Union[str, nn.Module] = "bernoulli",
                 prior: Union[str, nn.Module] = "normal", act: str = "softplus",
                 arch: str = "mlp", aux_weight: float = 0.0,
                 prior_options: Optional[Dict] = None,
                 likelihood_options: Optional[Dict] = None, scale: Optional[str] = None):
        super().__init__()
        check_sizes(x_dim, z_dim, hidden)
        if not (type(num_classes) is int and num_classes >= 2):
            raise ArgumentError("num_classes", f"must be an integer >= 2, got {num_classes!r}")
        if not (type(aux_weight) in (int, float) and 0 <= aux_weight < float("inf")):
            raise ArgumentError("aux_weight", f"must be finite and >= 0, got {aux_weight!r}")
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.aux_weight = float(aux_weight)
        hidden = tuple(hidden)
        self.scale = _check_scale(scale, arch)
        self.classifier = network(arch, x_dim, hidden, num_classes, act)
        self.encoder = LabelledNetwork(arch, x_dim, num_classes, hidden, 2 * z_dim, act)
        self.likelihood, k = likelihood_head(likelihood, likelihood_options, x_dim)
        self.decoder = LabelledNetwork(arch, z_dim, num_classes, hidden[::-1], k * x_dim, act)
        self.prior = build(prior, PRIORS, "prior", dict(z_dim=z_dim, x_dim=x_dim),
                           prior_options)
        if getattr(self.prior, "uses_encoder", False):
            raise ValueError(f"prior {prior!r} is built on the encoder q(z | x); M2's "
                             f"encoder q(z | x, y) needs a label too: choose another prior")
        self.register_buffer("class_weights", torch.full((num_classes,), 1.0 / num_classes))

    # The distributions ---------------------------------------------------------------

    def p_y(self) -> dist.Distribution:
        """p(y): the uniform Categorical over the C classes (the ``class_weights``
        buffer, 1/C each)."""
        return dist.Categorical(self.class_weights)

    def p_z(self) -> dist.Distribution:
        """p(z): the prior, event shape (z_dim,)."""
        return self.prior(None)

    def classify(self, x: torch.Tensor) -> dist.Distribution:
        """q(y | x): a Categorical with batch shape x.shape[:-1]."""
        return dist.Categorical(logits=self.classifier(x))

    def encode_z(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """q(z | x, y); y of shape (B,) or enumerated (C, 1) broadcasts against x."""
        loc, s = self.encoder(x, y).chunk(2, dim=-1)
        return dist.Normal(loc, _positive(s, self.scale, 1e-4)).to_event(1)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(x | y, z): batch shape z.shape[:-1]."""
        return self.likelihood(self.decoder(z, y))

    # Model and guide -----------------------------------------------------------------

    @pyro_method
    def model(self, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
              known: Optional[torch.Tensor] = None, num_data: Optional[int] = None):
        """p(x, y, z) of a batch: labelled points observe y (sites ``y``, ``z``, ``x``),
        unlabelled ones leave it latent (``y_unlabelled``, ``z_unlabelled``,
        ``x_unlabelled``); ``known`` says which is which (see the class). In training,
        labelled points add ``aux_weight * log q(y | x)`` (a ``pyro.factor``). ``x=None``
        generates ``num_data`` points."""
        with pyro.plate("data", _plate_size(x, num_data), subsample=x):
            if y is not None:
                with _masked(known):
                    pyro.sample("y", self.p_y(), obs=y)
                    z = pyro.sample("z", self.p_z())
                    pyro.sample("x", self.decode(z, y), obs=x)
                    if self.aux_weight and self.training:  # a training device only
                        pyro.factor("classification",
                                    self.aux_weight * self.classify(x).log_prob(y))
            if y is None or known is not None:
                with _masked(None if known is None else ~known):
                    y_u = pyro.sample("y_unlabelled", self.p_y(),
                                      infer={"enumerate": "parallel"})
                    z = pyro.sample("z_unlabelled", self.p_z())
                    pyro.sample("x_unlabelled", self.decode(z, y_u), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
              known: Optional[torch.Tensor] = None, num_data: Optional[int] = None):
        """q(z | x, y) for labelled points, and q(y | x) q(z | x, y) for the others, with
        ``y_unlabelled`` marked for enumeration (``TraceEnum_ELBO`` sums it out)."""
        with pyro.plate("data", num_data or len(x), subsample=x):
            if y is not None:
                with _masked(known):
                    pyro.sample("z", self.encode_z(x, y))
            if y is None or known is not None:
                with _masked(None if known is None else ~known):
                    y_u = pyro.sample("y_unlabelled", self.classify(x),
                                      infer={"enumerate": "parallel"})
                    pyro.sample("z_unlabelled", self.encode_z(x, y_u))

    # Optional parts of the contract ----------------------------------------------------

    def check_data(self, x: torch.Tensor, *rest, what: str = "data") -> None:
        """Raise a one-line ``ValueError`` naming ``what`` for points of the wrong width,
        labels that are not integers in [0, C), or x outside the likelihood's support."""
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"{what} has points of shape {tuple(x.shape[1:])}; the model "
                             f"takes x_dim = {self.x_dim} features per point")
        if rest and rest[0].dtype.is_floating_point:
            raise ValueError(f"{what}: labels must be integers, got {rest[0].dtype}")
        if rest and len(rest[0]) and not (0 <= int(rest[0].min()) and
                                          int(rest[0].max()) < self.num_classes):
            raise ValueError(f"{what}: labels must lie in 0..{self.num_classes - 1}")
        if hasattr(self.likelihood, "check"):
            self.likelihood.check(x, what)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Means of p(x | y, z) for y ~ p(y), z ~ p(z)."""
        y = self.p_y().sample((n,))
        return self.decode(self.p_z().sample((n,)), y).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x through the classifier's most probable label and the mean of q(z | x, y)."""
        y = self.classifier(x).argmax(-1)
        return self.decode(self.encode_z(x, y).mean, y).mean

    @torch.no_grad()
    def analogies(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's analogy figure: each x's style z = E[z | x, y = q's label], decoded
        with every label: shape (C, B, x_dim)."""
        y = self.classifier(x).argmax(-1)
        z = self.encode_z(x, y).mean
        labels = torch.arange(self.num_classes, device=x.device).unsqueeze(-1)
        return self.decode(z, labels).mean

    def metrics(self, data) -> Dict[str, float]:
        """What the trainer records per epoch besides the ELBO: the classification error
        (%) of q(y | x) on ``data``'s labels (``error``; none without labels)."""
        data = as_dataset(data)
        if data.labels is None:
            return {}
        return {"error": classification_error(self, data)}


# Labels ------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, data, batch_size: int = 1000, seed: Optional[int] = 0) -> torch.Tensor:
    """The most probable label under q(y | x) for every point of ``data``: (N,). Data
    binarized afresh for every batch (``dynamic_binarize``) are drawn once with ``seed``,
    leaving the caller's random state alone: the same images every time."""
    data = as_dataset(data)
    was = model.training
    model.eval()
    try:
        with seeded(seed, data.device):
            return torch.cat([model.classifier(batch[0]).argmax(-1)
                              for batch in data.batches(batch_size, shuffle=False)])
    finally:
        model.train(was)


def classification_error(model, data, batch_size: int = 1000, seed: Optional[int] = 0
                         ) -> float:
    """Percentage of ``data``'s points whose label q(y | x) gets wrong (most probable
    label against ``data.labels``; see ``predict``)."""
    data = as_dataset(data)
    if data.labels is None:
        raise ValueError(f"{data.name} {data.split}: no labels to measure an error on")
    wrong = predict(model, data, batch_size, seed) != data.labels.to(data.device)
    return 100.0 * wrong.double().mean().item()


def confusion_matrix(model, data, batch_size: int = 1000, seed: Optional[int] = 0
                     ) -> torch.Tensor:
    """Counts (C, C): row = true label, column = q(y | x)'s most probable label."""
    data = as_dataset(data)
    c = model.num_classes
    pairs = data.labels.to(data.device) * c + predict(model, data, batch_size, seed)
    return torch.bincount(pairs, minlength=c * c).reshape(c, c).cpu()


def choose_labelled(labels: torch.Tensor, n: int, seed: int = 0,
                    num_classes: int = 10) -> torch.Tensor:
    """Indices of ``n`` points, ``n / num_classes`` of each class, drawn by ``seed``
    (the same seed, the same points), in increasing order."""
    if n % num_classes or n <= 0:
        raise ArgumentError("labels", f"{n}: give a positive multiple of {num_classes} "
                            f"(the same number of labels per class)")
    per = n // num_classes
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(-1)
        if len(members) < per:
            raise ArgumentError("labels", f"{n} needs {per} points of class {c}; the "
                                f"training split has {len(members)}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per]])
    return torch.cat(chosen).sort().values


def labelled_split(train: TensorDataset, n: int, seed: int = 0, num_classes: int = 10,
                   share: Optional[float] = None) -> TensorDataset:
    """``train`` for semi-supervised training with the labels of ``n`` points kept
    (``choose_labelled``): batches ``(x, y, known)`` with y set to 0 wherever it is not
    known (the model never sees a discarded label), and the labelled points spread evenly
    over every epoch's batches.

    ``share``: None (the paper's rate), each labelled point once per epoch, n / N of each
    batch; or the fraction of each batch to be labelled: the labelled points are then
    repeated r times (r from ``share``, at least 1; ``repeats`` reads it back), and every
    term of a labelled point counts r times in the objective, as if each were r points.
    """
    if train.labels is None:
        raise ValueError(f"{train.name} {train.split}: the data set has no labels")
    if share is not None and not 0 < share < 1:
        raise ArgumentError("share", f"{share}: give a fraction of the batch, 0 < share < 1")
    index = choose_labelled(train.labels, n, seed, num_classes).to(train.device)
    known = torch.zeros(len(train), dtype=torch.bool, device=train.device)
    known[index] = True
    r = 1 if share is None else max(1, round(share * (len(train) - n) / ((1 - share) * n)))
    rows = torch.cat([torch.arange(len(train), device=train.device)] + [index] * (r - 1))
    part = train._map(lambda t: t[rows])
    y = torch.where(known[rows], part.labels, 0)
    return dataclasses.replace(part, extras=(y, known[rows]), spread=known[rows])


def repeats(split: TensorDataset, n: int) -> Tuple[int, int]:
    """(points of the split before repetition, r): what ``labelled_split(train, n, ...,
    share)`` made of ``train`` (its first rows are ``train``'s, in order)."""
    r = int(split.spread.sum()) // n
    return len(split) - (r - 1) * n, r


def paper_aux_weight(num_data: int, num_labelled: int, alpha: float = 0.1) -> float:
    """a = alpha N / N_labelled: the paper's eq. 9 (alpha N times the mean of
    log q(y | x) over labelled points), as in its code."""
    return alpha * num_data / num_labelled


MODELS["ssvae"] = SemiSupervisedVAE
