"""The model contract: what ``fit``, ``elbo``, ``log_likelihood`` and run folders need of
a model, and what they use when it is there.

Required is Pyro's own contract and nothing more: an object (a ``PyroModule``, or an
``nn.Module`` holding every parameter) with::

    model(*batch, num_data=None)     # p(x, z): observes the batch's tensors
    guide(*batch, num_data=None)     # q(z | x): samples every latent site the model does
                                     # not sum out

where ``batch`` is one minibatch of a data set's tensors (images, labels, a mask, ...),
all sites of one data point sit in ``pyro.plate("data", num_data or len(x),
subsample=x)`` (so a minibatch estimates the whole data set's ELBO; ``fit`` refuses a
model whose loss ignores ``num_data``), and distributions broadcast over a particle
dimension left of that plate (vectorized particles, the log-likelihood estimator).
Sites marked for enumeration (``config_enumerate``) are summed out by
``TraceEnum_ELBO``, which ``fit`` then chooses.

So that plain ``pyro.infer.SVI`` trains the same model as ``fit`` (``fit`` finds the
parameters by their gradients; SVI by the ``param`` sites Pyro sees), write it the
way Pyro's own examples do: a ``PyroModule`` whose ``model`` and ``guide`` are decorated
with ``@pyro.nn.pyro_method`` (its plain ``nn`` children are then registered with Pyro's
parameter store), or whose networks are ``PyroModule`` children, or an ``nn.Module``
that calls ``pyro.module(name, self)`` in both. ``fit`` says in one line when Pyro would
not see a parameter it trains (``hidden_from_pyro``).

Everything else is optional and discovered (``hasattr``); ``LatentVariableModel`` lists it
with its meaning. A model without a piece simply does not get what needs it: ``sample``
and ``reconstruct`` for figures, ``encode``/``decode``/``p_z`` for ELBO surgery and active
units, ``guide_modules`` for freezing the model and starting a fresh guide, ``metrics``
for validation numbers beside the ELBO (a classifier's error), ``default_loss`` for the
objective it trains with unless told otherwise.

The package's ``VAE`` and ``HierarchicalVAE`` take parts with contracts of their own; the
likelihood head is the one that shapes the model: it declares ``outputs_per_feature`` (the
decoder's outputs per feature of x) and ``discrete`` (a probability, so evaluation gives
bits per dimension too), see ``pyro_vae.likelihoods``. A model of your own with a
``likelihood`` attribute gets the same bits per dimension from ``discrete``.
"""

import logging
from typing import (ContextManager, Dict, List, Optional, Protocol, Sequence, Union,
                    runtime_checkable)

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule

from .compiled import rng_untouched
from .datasets import as_dataset
from .errors import ArgumentError
from .objectives import is_latent

logger = logging.getLogger("pyro_vae")


@runtime_checkable
class PyroModel(Protocol):
    """The required part: a Pyro model/guide pair on one module.

    Any object with these two methods is one (``isinstance(obj, PyroModel)`` checks
    for them); nothing needs to inherit from it."""

    def model(self, *batch: Optional[torch.Tensor], num_data: Optional[int] = None):
        """p(x, z) of a minibatch; with ``num_data`` = N the plate scales it by N / B.
        ``model(None, ..., num_data=n)`` should generate n points (Pyro's idiom)."""

    def guide(self, *batch: torch.Tensor, num_data: Optional[int] = None):
        """q(z | x) of the same minibatch, under the same plate."""


class LatentVariableModel(PyroModel, Protocol):
    """The optional parts, each used where present (the package's ``VAE`` and
    ``HierarchicalVAE`` have all of them)."""

    #: Names of the child modules that make the guide (``("encoder",)``): a fresh guide
    #: re-initializes them, ``freeze_model`` trains them alone.
    guide_modules: Sequence[str]

    #: The objective ``fit``, ``elbo`` and ``log_likelihood`` use for ``loss="auto"``
    #: (their default): a name of ``pyro_vae.objectives.LOSSES`` or a ``pyro.infer.ELBO``
    #: object. Without it the ELBO is chosen from the model and guide
    #: (``pyro_vae.objectives.choose_elbo``).
    default_loss: Union[str, "pyro.infer.ELBO"]

    def check_data(self, *tensors: torch.Tensor, what: str = "data") -> None:
        """Raise a one-line ``ValueError`` naming ``what`` for data the model cannot take
        (wrong width, outside the likelihood's support). Called before training."""

    def sample(self, n: int) -> torch.Tensor:
        """n generated points (e.g. means of p(x | z), z ~ p(z)), for figures."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x passed through the guide and the decoder, for figures."""

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x) with batch shape (B,) and event shape (z_dim,): ELBO surgery, active
        units."""

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z): ELBO surgery."""

    def p_z(self) -> dist.Distribution:
        """The prior p(z): ELBO surgery, active units."""

    def metrics(self, data) -> dict:
        """Numbers to record per epoch on the validation data beside its ELBO, e.g.
        ``{"error": 3.1}``: ``fit`` adds them as ``valid_error``, which early stopping
        and keep-best may watch (``monitor``)."""

    def unregistered(self) -> ContextManager:
        """A block in which ``model`` and ``guide`` emit no ``param`` sites (faster
        steps; ``fit`` finds the parameters once)."""


def guide_parameters(model: nn.Module) -> dict:
    """The parameters of the modules ``model.guide_modules`` names, by name in ``model``;
    a one-line error when the model declares none."""
    names = getattr(model, "guide_modules", None)
    if not names:
        raise ValueError(f"{type(model).__name__} does not say which modules make its "
                         f"guide: give it a guide_modules attribute (e.g. ('encoder',))")
    prefixes = tuple(n + "." for n in names)
    return {k: p for k, p in model.named_parameters() if k.startswith(prefixes)}


def check_data(model, *splits, batch_size: Optional[int] = None) -> None:
    """One-line errors for data the model cannot take (an empty split, non-finite
    values, what the model's ``check_data`` refuses), and for a batch size larger than the
    first split, before anything is trained or written."""
    splits = [as_dataset(s) for s in splits if s is not None]
    for data in splits:
        what = f"the {data.split} split of {data.name!r}"
        if len(data) == 0:
            raise ValueError(f"{what} is empty")
        if hasattr(model, "check_data"):
            model.check_data(*data.support_view(), what=what)
        for t in data.tensors:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{what} has NaN or infinite values")
    if batch_size is not None and splits and batch_size > len(splits[0]):
        first = splits[0]
        raise ArgumentError("batch_size", f"{batch_size} is larger than the {first.split} "
                            f"split of {first.name!r} ({len(first)} points)")


def hidden_from_pyro(module, params: Dict[str, nn.Parameter], batch: Sequence[torch.Tensor],
                     model_fn=None) -> List[str]:
    """The names of ``params`` (what ``fit`` trains) for which Pyro sees no ``param``
    site in one run of guide and model on ``batch``: plain ``pyro.infer.SVI`` would not
    train them. Logs one line saying what to add when there are any (``fit`` trains them
    all the same: it finds parameters by their gradients)."""
    model_fn = model_fn or module.model
    with poutine.trace(param_only=True) as capture, torch.no_grad(), \
            pyro.validation_enabled(False):
        poutine.replay(model_fn, trace=poutine.trace(module.guide).get_trace(*batch))(*batch)
    seen = set()
    for site in capture.trace.nodes.values():
        value = site["value"]
        seen.add(id(value.unconstrained() if hasattr(value, "unconstrained") else value))
    hidden = [name for name, p in params.items() if id(p) not in seen]
    if hidden:
        fix = ("decorate model and guide with @pyro.nn.pyro_method (or make its networks "
               "PyroModule children)" if isinstance(module, PyroModule) else
               f"call pyro.module({type(module).__name__.lower()!r}, self) at the start of "
               f"model and guide")
        logger.warning("Pyro sees no param site for %d of the %d parameters trained (%s%s): "
                       "plain pyro.infer.SVI would not train them; %s. fit trains them all "
                       "the same", len(hidden), len(params), ", ".join(hidden[:3]),
                       ", ..." if len(hidden) > 3 else "", fix)
    return hidden


def check_num_data(module, objective, batch: Sequence[torch.Tensor], num_data: int,
                   model_fn=None) -> None:
    """Refuse, in one line, a model whose loss does not scale with ``num_data``: the same
    batch's loss on the same draws is computed with ``num_data`` N and 2N, and a model
    whose plate ignores it gives equal losses (``fit`` would then report ELBOs off by a
    factor B / N). Also refuse a model or guide that takes no ``num_data``."""
    model_fn = model_fn or module.model
    losses = []
    for n in (num_data, 2 * num_data):
        with rng_untouched(batch[0].device), torch.no_grad(), pyro.validation_enabled(False):
            torch.manual_seed(0)
            try:
                losses.append(float(objective.loss(model_fn, module.guide, *batch,
                                                   num_data=n)))
            except TypeError as e:
                if "num_data" not in str(e):
                    raise
                raise TypeError(f"{type(module).__name__}: model and guide must take "
                                f"num_data=None (the training set's size N, for the data "
                                f"plate: pyro.plate('data', num_data or len(x), "
                                f"subsample=x)); {e}") from None
    if losses[0] == losses[1] and losses[0] != 0:
        raise ValueError(
            f"{type(module).__name__} ignores num_data: its loss is the same for N = "
            f"{num_data} and 2N, so a minibatch is not scaled to the data set; put each "
            f"data point's sites in pyro.plate('data', num_data or len(x), subsample=x)")


def check_model(model) -> None:
    """One line (naming the argument) for an object that is not a model: the contract
    needs an ``nn.Module`` with ``model`` and ``guide`` methods."""
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", f"must be a torch.nn.Module with model and guide "
                                     f"methods (pyro_vae.contract), got "
                                     f"{type(model).__name__}")
    missing = [name for name in ("model", "guide") if not callable(getattr(model, name, None))]
    if missing:
        raise ArgumentError("model", f"{type(model).__name__} has no {' and no '.join(missing)}"
                                     f" method; fit needs model(*batch, num_data=None) and "
                                     f"guide(*batch, num_data=None) on one module")


def check_model_guide(model, data, model_fn=None, validate: bool = True) -> None:
    """The model/guide pair on the first two points of ``data``, before training: the
    data's floating tensors have the parameters' dtype, the guide and the model run
    (with Pyro's distribution checks where ``validate``: a part's options that give
    invalid parameters show here), the guide's latent values have that dtype, and every
    latent site of the model has a site in the guide or is enumerated. One line naming
    the tensor or the site otherwise. Draws from a stream of its own and uses a parameter
    store of its own (the caller's random state and store are left as they were)."""
    data = as_dataset(data)
    batch = tuple(t[:2] for t in data.support_view())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    what = f"the {data.split} split of {data.name!r}"
    for i, t in enumerate(batch):
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            name = "x" if i == 0 else f"tensor {i + 1}"
            raise ValueError(f"{what}: {name} has dtype {t.dtype}; the model's parameters are "
                             f"{dtype} (convert the data with .to({dtype}))")
    # An empty parameter store of its own: a PyroModule takes a same-named entry left in
    # the store (by an earlier model) over its own parameter, so the caller's store is
    # neither read nor changed.
    with rng_untouched(data.device), torch.no_grad(), pyro.validation_enabled(validate), \
            pyro.get_param_store().scope():
        guide = _trace(model.guide, batch, "guide")
        trace = _trace(poutine.replay(model_fn or model.model, trace=guide), batch, "model")
    sampled = [name for name, site in guide.nodes.items() if is_latent(site)]
    for name in sampled:
        value = guide.nodes[name]["value"]
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            raise ValueError(f"the guide's site {name!r} samples {value.dtype} values; the "
                             f"model's parameters are {dtype}")
    for name, site in trace.nodes.items():
        if is_latent(site) and name not in guide.nodes and not site["infer"].get("enumerate"):
            raise ValueError(f"the model's latent site {name!r} has no site in the guide (it "
                             f"samples {sampled}): sample {name!r} in the guide, or mark it for "
                             f"enumeration in the model (TraceEnum_ELBO then sums it out)")


def _trace(fn, batch, what: str):
    try:
        return poutine.trace(fn).get_trace(*batch)
    except Exception as e:  # the user's code: say where, keep the cause chained
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"the {what} fails on the first batch ({type(e).__name__}: "
                         f"{reason})") from e
