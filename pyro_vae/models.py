"""VAE models: one top-level PyroModule each, with ``model(x)`` and ``guide(x)``.

Both follow the package's model contract (``pyro_vae.contract``): ``model(x=None,
num_data=None)`` and ``guide(x, num_data=None)``, nothing more. Model and guide are methods
of the same module, so every parameter has exactly one name in Pyro's parameter store.
Child networks are plain ``nn.Module`` objects; PyroModule registers them (``pyro.module``)
whenever ``model`` or ``guide`` touches them. The KL weight beta is not an argument: the
trainer applies it to the latent sites of any model (``pyro_vae.objectives.scale_latents``).
"""

import collections.abc
import contextlib
import importlib
import inspect
import math
import typing
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule, pyro_method

from .errors import ArgumentError
from .guides import GUIDES, DiagonalNormalEncoder, location
from .likelihoods import LIKELIHOODS
from .nn import network
from .priors import PRIORS


def resolve(name: str, registry: dict, kind: str):
    """A class from ``registry`` by name, or from ``"package.module:ClassName"``; one line
    for anything else, or for an import path that names no ``nn.Module`` class."""
    if isinstance(name, str) and ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"cannot load {kind} {name!r}: {e}") from None
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
            raise ValueError(f"{kind} {name!r} is not a {kind} class (a subclass of "
                             f"torch.nn.Module)")
        return cls
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}, "
                         f"or 'package.module:ClassName'") from None


#: The arguments a model hands each kind of part (a part takes those its constructor
#: names); an option of the same name is refused (it is the model's own setting).
CONTEXT = {"prior": ("z_dim", "x_dim"), "likelihood": ("x_dim",),
           "guide": ("x_dim", "z_dim", "hidden", "act", "arch")}


def build(part, registry: dict, kind: str, context: Dict, options: Optional[Dict] = None):
    """``part`` if it is a module; else its class built with the ``context`` arguments its
    constructor names (z_dim, x_dim, ...) and every one of ``options``, after
    ``check_options``."""
    if isinstance(part, nn.Module):
        return part
    cls = resolve(part, registry, kind)
    options = check_options(cls, part, kind, tuple(context), options)
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in context.items() if k in params or takes_all}
    return cls(**kwargs, **options)


def check_options(cls, part, kind: str, context: Sequence[str],
                  options: Optional[Dict]) -> Dict:
    """``options`` for ``cls``'s constructor, checked before it runs: a dict of names it
    takes (not one of the ``context`` arguments the model passes itself), each value of
    the kind its annotation says (``int``, ``float``, ``bool``, ``str``, a sequence, a
    tensor; ``Optional`` allows None), numbers finite, and within the ranges the class
    declares in ``option_ranges`` (``{"min_scale": (">", 0)}``, or several conditions:
    ``{"bins": ((">=", 2), ("<=", 65536))}``; a range applies to each element of a
    sequence). One line naming the part and the option otherwise."""
    if options is None:
        return {}
    if not (isinstance(options, dict) and all(isinstance(k, str) for k in options)):
        raise ValueError(f"{kind} options must be a dict of name: value, got "
                         f"{type(options).__name__}")
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    clash = [k for k in options if k in context]
    if clash:
        raise ValueError(f"{kind} option {clash[0]} is the model's own setting, which it "
                         f"hands the {kind}; set it there, not as a {kind} option")
    refused = [k for k in options if k not in params and not takes_all]
    if refused:
        raise ValueError(f"{kind} {part!r} takes no option {', '.join(refused)}; it takes "
                         f"{sorted(k for k in params if k not in context) or 'none'}")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not resolve: kinds are not checked
        hints = {}
    ranges = getattr(cls, "option_ranges", {})
    for name, value in options.items():
        problem = (_kind_problem(hints.get(name), value) or _finite_problem(value)
                   or _range_problem(ranges.get(name), value))
        if problem:
            raise ValueError(f"{kind} option {name} {problem}, got {_shown(value)}")
    return dict(options)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind_problem(hint, value) -> str:
    """'' if ``value`` fits the annotation ``hint`` (or there is none), else what it
    must be."""
    if hint is None:
        return ""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return ""
        if len(args) != 1:
            return ""  # a union of several kinds: left to the constructor
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return "" if isinstance(value, bool) else "must be true or false"
    if origin is int:
        return "" if type(value) is int else "must be an integer"
    if origin is float:
        return "" if type(value) in (int, float) else "must be a number"
    if origin is str:
        return "" if isinstance(value, str) else "must be text"
    if origin in (tuple, list, collections.abc.Sequence):
        inner = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        bad = next((_kind_problem(inner[0], v) for v in value if inner
                    and inner[0] is not Ellipsis and _kind_problem(inner[0], v)), "")
        return bad and f"must be a list whose items {bad[5:]}"
    if inspect.isclass(origin) and not isinstance(value, origin):
        return f"must be a {origin.__name__}, which an option value cannot give"
    return ""


def _finite_problem(value) -> str:
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        return "must be finite"
    return ""


_COMPARE = {">": (lambda a, b: a > b), ">=": (lambda a, b: a >= b),
            "<": (lambda a, b: a < b), "<=": (lambda a, b: a <= b)}


def _range_problem(declared, value) -> str:
    """'' if ``value`` (each element of a list) meets the declared condition, one
    ``(op, bound)`` or a tuple of them; else the condition it fails."""
    if declared is None or value is None:
        return ""
    conditions = declared if isinstance(declared[0], tuple) else (declared,)
    values = value if isinstance(value, (list, tuple)) else [value]
    for op, bound in conditions:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and _COMPARE[op](v, bound) for v in values):
            return f"must be {op} {bound}"
    return ""


def check_sizes(x_dim, z_dim, hidden) -> None:
    """One line naming the argument for a size that is not an integer >= 1."""
    for name, value in (("x_dim", x_dim), ("z_dim", z_dim)):
        if not (type(value) is int and value >= 1):
            raise ArgumentError(name, f"must be an integer >= 1, got {value!r}")
    if isinstance(hidden, (str, bytes)) or not all(
            type(h) is int and h >= 1 for h in _iterable(hidden)):
        raise ArgumentError("hidden", f"must be a sequence of integers >= 1, got {hidden!r}")


def _iterable(value):
    try:
        return list(value)
    except TypeError:
        return [None]


def _plate_size(x: Optional[torch.Tensor], num_data: Optional[int]) -> int:
    if x is None and num_data is None:
        raise ValueError("model(None) generates data: give num_data, the number of points")
    return num_data or len(x)


class _LatentModel(PyroModule):
    """What VAE and HierarchicalVAE share: the prior is built on an encoder, by default
    the guide's own (the VampPrior's components are the guide's posteriors)."""

    #: The child modules that make the guide q(z | x) (see ``pyro_vae.contract``).
    guide_modules = ("encoder",)

    def __getattr__(self, name: str):
        # Inside ``unregistered()`` a child network is returned as it is. Otherwise
        # PyroModule registers it with Pyro's parameter store (``pyro.module``: one
        # ``param`` site per tensor) at every access, ~0.6 ms of a 7 ms MLP step.
        if self.__dict__.get("_unregistered"):
            module = self.__dict__["_modules"].get(name)
            if module is not None and not isinstance(module, PyroModule):
                return module
        return super().__getattr__(name)

    @contextlib.contextmanager
    def unregistered(self):
        """Within this block ``model`` and ``guide`` use their networks without emitting
        ``param`` sites for them. ``fit`` steps in it: it has found the parameters once,
        and the ELBOs' ``differentiable_loss`` does not look at ``param`` sites. (SVI
        and ``loss_and_grads`` do: they find what to train from those sites.)"""
        self.__dict__["_unregistered"] = True
        try:
            yield self
        finally:
            self.__dict__["_unregistered"] = False

    @property
    def prior_encoder(self) -> nn.Module:
        """The encoder p(z) is built on: the guide's, unless ``swap_guide`` kept the old."""
        kept = self._modules.get("kept_encoder")
        return self.encoder if kept is None else kept

    def p_z(self) -> dist.Distribution:
        """The prior p(z) (of the top layer for the HVAE). The encoder is handed to priors
        that use it (``uses_encoder``, the VampPrior) only, so the model's trace shows no
        encoder parameters under any other prior."""
        uses = getattr(self.prior, "uses_encoder", False)
        return self.prior(self.prior_encoder if uses else None)

    def swap_guide(self, encoder: nn.Module) -> None:
        """Replace the guide's encoder by ``encoder`` (any guide family with the same
        z_dim), keeping the model p(x, z) as it is: the old encoder stays, as
        ``kept_encoder``, what the prior is built on, so a VampPrior does not change.
        With ``fit(..., freeze_model=True)`` only the new guide then trains."""
        _check_encoder(encoder, self.x_dim, self.z_dim)
        if "kept_encoder" not in self._modules:
            self.kept_encoder = self.encoder
        self.encoder = encoder

    def check_data(self, x: torch.Tensor, *rest, what: str = "data") -> None:
        """One-line errors for points of the wrong width or outside the likelihood's
        support (see ``pyro_vae.contract``)."""
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise ValueError(f"{what} has dtype {x.dtype}; the model's parameters are "
                             f"{dtype} (convert the data with x.to({dtype}))")
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"{what} has points of shape {tuple(x.shape[1:])}; the model "
                             f"takes x_dim = {self.x_dim} features per point")
        if hasattr(self.likelihood, "check"):  # optional for a head of your own
            self.likelihood.check(x, what)


def likelihood_and_decoder(likelihood, options: Optional[Dict], x_dim: int, arch: str,
                           in_features: int, hidden: Sequence[int], act: str):
    """The likelihood head p(x | .) and an ``arch`` decoder network from ``in_features``
    through ``hidden`` sized for it: the head's
    ``outputs_per_feature`` (k, default 1) times x_dim outputs (``likelihood_head``)."""
    head, k = likelihood_head(likelihood, options, x_dim)
    return head, network(arch, in_features, hidden, k * x_dim, act)


def likelihood_head(likelihood, options: Optional[Dict], x_dim: int):
    """The likelihood head p(x | .) and k, its ``outputs_per_feature`` (default 1): the
    decoder gives it k * x_dim features per point. A head whose distribution, given those,
    is not over x_dim features is refused in one line (see ``pyro_vae.likelihoods``)."""
    head = build(likelihood, LIKELIHOODS, "likelihood", dict(x_dim=x_dim), options)
    k = getattr(head, "outputs_per_feature", 1)
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"likelihood {type(head).__name__}: outputs_per_feature must be "
                         f"an integer >= 1, got {k!r}")
    name = likelihood if isinstance(likelihood, str) else type(head).__name__
    try:
        with torch.no_grad(), dist.validation_enabled(False):
            device = next(head.parameters(), torch.zeros(())).device
            d = head(torch.zeros(2, k * x_dim, device=device))
            shape = (tuple(d.batch_shape), tuple(d.event_shape))
    except Exception as e:
        raise ValueError(f"likelihood {name!r} cannot take {k} x {x_dim} decoder outputs "
                         f"per point (outputs_per_feature = {k}; {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if shape != ((2,), (x_dim,)):
        raise ValueError(f"likelihood {name!r} turns {k} x {x_dim} decoder outputs for each "
                         f"of 2 points into batch shape {shape[0]}, event shape {shape[1]}; "
                         f"expected (2,), ({x_dim},): declare outputs_per_feature (decoder "
                         f"outputs per feature of x) on the head, and .to_event(1)")
    return head, k


def _check_encoder(encoder: nn.Module, x_dim: int, z_dim: int) -> None:
    """Refuse, in one line, a guide whose q(z | x) is not over ``z_dim`` dimensions."""
    try:
        with torch.no_grad():
            device = next(encoder.parameters(), torch.zeros(())).device
            shape = tuple(encoder(torch.zeros(2, x_dim, device=device)).event_shape)
    except Exception as e:
        raise ValueError(f"swap_guide: the encoder cannot take points of {x_dim} features "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from None
    if shape != (z_dim,):
        raise ValueError(f"swap_guide: the encoder's q(z | x) has event shape {shape}; this "
                         f"model's z has {z_dim} dimensions")


class VAE(_LatentModel):
    """Variational autoencoder (Kingma & Welling 2014) as a Pyro model/guide pair.

    ::

        Model:  z_n ~ p(z),  x_n ~ p(x | decoder(z_n))      for n in the "data" plate
        Guide:  z_n ~ q(z | x_n) = encoder(x_n)

    ``prior``, ``likelihood`` and ``encoder`` are registry names (see ``PRIORS``,
    ``LIKELIHOODS``, ``GUIDES``), ``"package.module:ClassName"``, or ready-made modules.
    ``prior_options``, ``guide_options`` and ``likelihood_options`` go to the parts'
    constructors (e.g. ``{"components": 500}``, ``{"flow_steps": 4}``, ``{"scale": 0.1}``).
    ``hidden`` gives the encoder's hidden sizes; the decoder mirrors them. ``arch`` is
    ``"mlp"`` (activation ``act``) or ``"gated"`` (GatedDense, the VampPrior paper's).
    """

    def __init__(self, x_dim: int, z_dim: int = 50, hidden: Sequence[int] = (400,),
                 likelihood: Union[str, nn.Module] = "bernoulli",
                 prior: Union[str, nn.Module] = "normal",
                 encoder: Union[str, nn.Module] = "diagonal",
                 act: str = "relu", arch: str = "mlp",
                 prior_options: Optional[Dict] = None, guide_options: Optional[Dict] = None,
                 likelihood_options: Optional[Dict] = None):
        super().__init__()
        check_sizes(x_dim, z_dim, hidden)
        self.x_dim, self.z_dim = x_dim, z_dim
        hidden = tuple(hidden)
        self.encoder = build(encoder, GUIDES, "guide", dict(
            x_dim=x_dim, z_dim=z_dim, hidden=hidden, act=act, arch=arch), guide_options)
        self.likelihood, self.decoder = likelihood_and_decoder(
            likelihood, likelihood_options, x_dim, arch, z_dim, hidden[::-1], act)
        self.prior = build(prior, PRIORS, "prior", dict(z_dim=z_dim, x_dim=x_dim),
                           prior_options)

    @pyro_method
    def model(self, x: Optional[torch.Tensor] = None,
              num_data: Optional[int] = None) -> torch.Tensor:
        """p(x, z). ``num_data`` is the full data set size N: the minibatch's log-density
        is scaled by N / len(x), so the loss estimates the ELBO of the whole data set.
        ``model(None, num_data=n)`` draws n points (``pyro.infer.Predictive``)."""
        with pyro.plate("data", _plate_size(x, num_data), subsample=x):
            z = pyro.sample("z", self.p_z())
            pyro.sample("x", self.decode(z), obs=x)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """q(z | x), amortized by the encoder."""
        with pyro.plate("data", num_data or len(x), subsample=x):
            return pyro.sample("z", self.encoder(x))

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x): batch shape (B,), event shape (z_dim,)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z): batch shape z.shape[:-1], event shape (x_dim,)."""
        return self.likelihood(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Mean of p(x | z) for n draws z ~ p(z): shape (n, x_dim)."""
        z = self.p_z().sample((n,))
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the posterior mean z = E_q[z | x]: shape of x."""
        return self.decode(location(self.encode(x))).mean


class HierarchicalVAE(_LatentModel):
    """Two stochastic layers (the VampPrior paper's HVAE, L = 2; Tomczak & Welling 2018).

    ::

        Model:  z2 ~ p(z2),  z1 ~ p(z1 | z2),  x ~ p(x | z1, z2)
        Guide:  z2 ~ q(z2 | x),  z1 ~ q(z1 | x, z2)

    p(z2) is any prior of ``PRIORS``; built on q(z2 | .), ``"vamp"`` gives the paper's
    model. q(z2 | x) is any guide family (``encoder``, as for the VAE); the other
    conditionals are diagonal Gaussians from ``arch`` networks with ``hidden`` layers;
    their inputs are concatenated ([x, z2] and [z1, z2]). Both layers have ``z_dim``
    dimensions.
    """

    def __init__(self, x_dim: int, z_dim: int = 40, hidden: Sequence[int] = (300, 300),
                 likelihood: Union[str, nn.Module] = "bernoulli",
                 prior: Union[str, nn.Module] = "normal",
                 encoder: Union[str, nn.Module] = "diagonal",
                 act: str = "relu", arch: str = "gated",
                 prior_options: Optional[Dict] = None, guide_options: Optional[Dict] = None,
                 likelihood_options: Optional[Dict] = None):
        super().__init__()
        check_sizes(x_dim, z_dim, hidden)
        self.x_dim, self.z_dim = x_dim, z_dim
        hidden = tuple(hidden)
        conditional = self._conditional = dict(hidden=hidden, act=act, arch=arch)
        self.encoder = build(encoder, GUIDES, "guide", dict(                  # q(z2|x)
            x_dim=x_dim, z_dim=z_dim, **conditional), guide_options)
        self.encoder_z1 = DiagonalNormalEncoder(x_dim + z_dim, z_dim, **conditional)
        self.p_z1 = DiagonalNormalEncoder(z_dim, z_dim, **conditional)          # p(z1|z2)
        self.likelihood, self.decoder = likelihood_and_decoder(
            likelihood, likelihood_options, x_dim, arch, 2 * z_dim, hidden[::-1], act)
        self.prior = build(prior, PRIORS, "prior", dict(z_dim=z_dim, x_dim=x_dim),
                           prior_options)

    guide_modules = ("encoder", "encoder_z1")

    @pyro_method
    def model(self, x: Optional[torch.Tensor] = None,
              num_data: Optional[int] = None) -> torch.Tensor:
        with pyro.plate("data", _plate_size(x, num_data), subsample=x):
            z2 = pyro.sample("z2", self.p_z())
            z1 = pyro.sample("z1", self.p_z1(z2))
            pyro.sample("x", self.decode(z1, z2), obs=x)
        return z1, z2

    @pyro_method
    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        with pyro.plate("data", num_data or len(x), subsample=x):
            z2 = pyro.sample("z2", self.encoder(x))
            z1 = pyro.sample("z1", self.encode_z1(x, z2))
        return z1, z2

    def swap_guide(self, encoder: nn.Module) -> None:
        """As ``VAE.swap_guide`` for q(z2 | x); q(z1 | x, z2), the rest of the guide,
        starts afresh too."""
        super().swap_guide(encoder)
        old = self.encoder_z1
        self.encoder_z1 = DiagonalNormalEncoder(old.x_dim, old.z_dim, **self._conditional
                                                ).to(next(old.parameters()).device)

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z2 | x), the top layer."""
        return self.encoder(x)

    def encode_z1(self, x: torch.Tensor, z2: torch.Tensor) -> dist.Distribution:
        """q(z1 | x, z2); x broadcasts over leading particle dimensions of z2."""
        x = x.expand(z2.shape[:-1] + x.shape[-1:])
        return self.encoder_z1(torch.cat([x, z2], dim=-1))

    def decode(self, z1: torch.Tensor, z2: torch.Tensor) -> dist.Distribution:
        return self.likelihood(self.decoder(torch.cat([z1, z2], dim=-1)))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        z2 = self.p_z().sample((n,))
        z1 = self.p_z1(z2).sample()
        return self.decode(z1, z2).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        z2 = location(self.encoder(x))
        return self.decode(self.encode_z1(x, z2).mean, z2).mean


MODELS = {
    "vae": VAE,
    "hvae": HierarchicalVAE,
}
# pyro_vae.semisupervised adds "ssvae" (M2), built on this module's parts.
