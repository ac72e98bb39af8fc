"""``TrainConfig``: every setting of a run, flat, with the command line generated from it.

Settings come in three groups (each field's ``group``): ``data`` (what is trained on and
where results go), ``model`` (what defines p(x, z) and q(z | x): ``--init-from`` takes
these from its source run, ``--resume`` never changes them) and ``training`` (how it is
trained). Parts take their own options as ``KEY=VALUE`` pairs (``--prior-option
components=50``, ``--guide-option flow_steps=4``, ``--likelihood-option scale=0.1``),
handed to the part's constructor, so a prior of your own takes options like the built-in
ones.
"""

import dataclasses
import inspect
import json
import math
import typing
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from . import datasets
from .compiled import PRECISIONS, check_precision
from .errors import ArgumentError
from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .memory import check_fits
from .models import CONTEXT, MODELS, build, check_options, resolve
from .nn import ACTIVATIONS, ARCHS
from .objectives import AUTO, LOSSES, check_objective, make_elbo
from .priors import PRIORS
from .semisupervised import SemiSupervisedVAE, paper_aux_weight, repeats
from .arguments import MAX_SEED, check_device
from .train import OPTIMIZERS


def _opt(default, help, group="training", **kw):
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict,
                                 metadata={"help": help, "group": group, **kw})
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; the ``pyro-vae train`` options map 1:1 onto it."""

    dataset: str = _opt("digits", "data set", "data", choices=datasets.DATASETS)
    data_dir: Optional[str] = _opt(None, f"data root (default: ${datasets.ENV_VAR}, else "
                                         f"~/.cache/pyro_vae)", "data")
    download: bool = _opt(True, "download missing data files", "data")
    out: str = _opt("runs/quickstart", "run folder to write", "run")
    overwrite: bool = _opt(False, "replace a run already in --out", "run")
    limit: Optional[int] = _opt(None, "train on the first N training points only", "data")
    binarize: Optional[bool] = _opt(None, "binarize gray data (default: with the "
                                          "bernoulli likelihood)", "data")
    labels: Optional[int] = _opt(None, "ssvae: keep the labels of N training points, N/10 "
                                       "per class chosen by --seed (labels.json lists "
                                       "them); the rest are unlabelled", "data", added=True)
    labelled_share: Optional[float] = _opt(None, "ssvae: repeat the labelled points so "
                                                 "that about this fraction of every batch is "
                                                 "labelled (each repeat counts in the "
                                                 "objective); default: each once per epoch, "
                                                 "the paper's rate", "data", added=True)
    model: str = _opt("vae", "vae, hvae (two stochastic layers), or ssvae (M2, "
                             "semi-supervised: the label a latent variable; needs --labels)",
                      "model", choices=tuple(MODELS))
    arch: str = _opt("mlp", "networks: mlp, or gated (GatedDense, the VampPrior paper's)",
                     "model", choices=ARCHS)
    z_dim: Optional[int] = _opt(None, "latent dimension (default: 50 for mlp, 40 for "
                                      "gated)", "model")
    hidden: Optional[Tuple[int, ...]] = _opt(None, "hidden layer sizes of the encoder; the "
                                                   "decoder mirrors them (default: 400 for "
                                                   "mlp, 500 for ssvae, 300 300 for gated)",
                                             "model")
    act: Optional[str] = _opt(None, "hidden activation of mlp networks (default: relu; "
                                    "softplus for ssvae)", "model",
                              choices=tuple(ACTIVATIONS))
    prior: str = _opt("normal", f"p(z): one of {', '.join(PRIORS)}, or "
                                f"package.module:ClassName", "model")
    prior_options: Dict[str, Any] = _opt({}, "an option of the prior's constructor, e.g. "
                                             "components=500, pseudo_init=data, "
                                             "learn_weights=true (repeat for more)", "model")
    guide: str = _opt("diagonal", f"q(z|x): one of {', '.join(GUIDES)}, or "
                                  f"package.module:ClassName", "model")
    guide_options: Dict[str, Any] = _opt({}, "an option of the guide's constructor, e.g. "
                                             "flow_steps=4 for iaf", "model")
    likelihood: str = _opt("bernoulli", "p(x|z)", "model", choices=tuple(LIKELIHOODS))
    likelihood_options: Dict[str, Any] = _opt({}, "an option of the likelihood's "
                                                  "constructor, e.g. scale=0.1 (a fixed "
                                                  "sigma for gaussian)", "model")
    prior_guide: Optional[str] = _opt(None, "set by --init-from: guide family of the "
                                            "encoder the prior keeps from that run", "model",
                                      derived=True)
    prior_guide_options: Optional[Dict[str, Any]] = _opt(None, "set by --init-from: its "
                                                               "options", "model",
                                                         derived=True)
    init_from: Optional[str] = _opt(None, "start from this run folder's model (its model "
                                          "settings are used); a --guide other than its "
                                          "own starts fresh, the same one from its weights")
    freeze_model: bool = _opt(False, "with --init-from: train the guide only, the decoder "
                                     "and prior stay fixed")
    fresh_guide: bool = _opt(False, "with --init-from: start the guide from scratch even "
                                    "when it is that run's own family")
    loss: Optional[str] = _opt(None, "auto (chosen from the model and guide: enum for "
                                     "sites marked for enumeration, trace for a guide "
                                     "that is not mean-field, else meanfield), trace "
                                     "(Trace_ELBO), meanfield (TraceMeanField_ELBO), iwae "
                                     "(RenyiELBO, alpha=0) or enum (TraceEnum_ELBO) "
                                     "(default: auto)",
                               choices=(AUTO,) + tuple(LOSSES))
    alpha: float = _opt(0.1, "ssvae: weight of the classification term log q(y|x) on "
                             "labelled points, as the paper's alpha: each weighs alpha N / "
                             "N_labelled (0: off)", added=True)
    particles: int = _opt(1, "vectorized samples per data point (K of the IWAE bound)")
    beta: float = _opt(1.0, "weight of the KL term (beta-VAE)")
    warmup_epochs: int = _opt(0, "KL warm-up: beta rises linearly from 0 over these epochs")
    epochs: int = _opt(30, "training epochs")
    batch_size: int = _opt(128, "minibatch size")
    lr: float = _opt(1e-3, "learning rate")
    optimizer: str = _opt("adam", "adam (PyTorch's Adam, fused) or clipped_adam (Pyro's "
                                  "ClippedAdam)", choices=OPTIMIZERS)
    clip_norm: float = _opt(10.0, "clipped_adam: each gradient is clipped elementwise to "
                                  "+-clip-norm")
    skip_nonfinite: int = _opt(0, "skip up to K steps whose loss or gradient is not "
                                  "finite (each is logged), instead of stopping")
    early_stopping: int = _opt(0, "stop after N epochs without a better --monitor value; "
                                  "best.pt keeps the best epoch's model, which the "
                                  "summary, figures and evaluate use (0: off)")
    monitor: str = _opt("valid_elbo", "what --early-stopping and best.pt watch: valid_elbo "
                                      "(highest), or valid_error (lowest; ssvae's "
                                      "classification error)", choices=("valid_elbo",
                                                                         "valid_error"),
                        added=True)
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: after each epoch "
                                    "only)")
    seed: int = _opt(0, "random seed")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    compile: bool = _opt(False, "record the whole training step once and compile it with "
                                "torch.compile (seconds of compiling, once per run; CUDA "
                                "graphs on a GPU)",
                         added=True)
    precision: str = _opt("float32", "float32, or bf16: the networks' matrix products in "
                                     "bfloat16, the densities and the ELBO in float32 (a "
                                     "GPU or CPU with fast bfloat16 only)",
                          choices=PRECISIONS, added=True)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting, as its command-line option."""
        self._check_kinds()
        if not str(self.out).strip():
            raise ValueError("--out: give the run folder to write (got an empty name)")
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{flag(f.name)}: {value!r} is not one of {list(choices)}")
        for name in ("z_dim", "particles", "epochs", "batch_size", "limit", "labels"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # None: the default applies
                raise ValueError(f"--{flag(name)} must be > 0, got {value}")
        for name, low in (("lr", 0), ("clip_norm", 0), ("beta", None)):
            value = getattr(self, name)
            if not ((low is None or value > low) and 0 <= value < math.inf):
                raise ValueError(f"--{flag(name)} must be finite and "
                                 f"{'> 0' if low is not None else '>= 0'}, got {value}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"--hidden: sizes must be >= 1, got {list(self.hidden)}")
        for name in ("skip_nonfinite", "checkpoint_every", "early_stopping", "warmup_epochs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        for option in ("freeze_model", "fresh_guide"):
            if getattr(self, option) and not self.init_from:
                raise ValueError(f"--{flag(option)} needs --init-from RUN (a trained model)")
        if not 0 <= self.alpha < math.inf:
            raise ValueError(f"--alpha must be finite and >= 0, got {self.alpha}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"--seed must lie in 0 ... 2**32 - 1, got {self.seed}")
        self._check_semisupervised()
        loss = self.resolved().loss
        if loss == AUTO:  # a model may say which it takes (the rest are chosen later)
            loss = getattr(MODELS.get(self.model), "default_loss", None) or AUTO
        if loss != AUTO:
            check_objective(make_elbo(loss, self.particles), self.beta, self.warmup_epochs)
        self._check_parts()
        try:
            check_precision(self.precision, resolve_device(self.device))
        except ArgumentError as e:
            raise ValueError(e.named("--precision")) from None

    def _check_kinds(self) -> None:
        """Every setting of its type (as config.json's schema says): a Python caller's
        ``epochs="3"`` is one line, not a comparison error."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _kind_ok(hints[f.name], list(value) if isinstance(value, tuple)
                                else value)
            if expected:
                raise ValueError(f"--{flag(f.name)} must be {expected}, got {value!r}")

    def _check_parts(self) -> None:
        """Each part resolves to a class, and its options fit its constructor
        (``pyro_vae.models.check_options``): before any folder is touched."""
        parts = [("prior", self.prior, PRIORS, self.prior_options),
                 ("likelihood", self.likelihood, LIKELIHOODS, self.likelihood_options),
                 ("guide", self.guide, GUIDES, self.guide_options)]
        if self.prior_guide is not None:
            parts.append(("guide", self.prior_guide, GUIDES, self.prior_guide_options))
        for kind, name, registry, options in parts:
            check_options(resolve(name, registry, kind), name, kind, CONTEXT[kind], options)

    def _check_semisupervised(self) -> None:
        """ssvae's settings: labels of a 10-class data set, its own guide and losses."""
        if self.model != "ssvae":
            for name, value in (("labels", self.labels), ("monitor", self.monitor != "valid_elbo"),
                                ("labelled-share", self.labelled_share is not None)):
                if value:
                    raise ValueError(f"--{name} is for --model ssvae (a classifier)")
            return
        if self.labelled_share is not None and not 0 < self.labelled_share < 1:
            raise ValueError(f"--labelled-share must lie between 0 and 1, got "
                             f"{self.labelled_share}")
        if self.labels is None:
            raise ValueError("--model ssvae needs --labels N (how many training labels "
                             "to keep)")
        if self.dataset not in SEMI_SUPERVISED_DATASETS:
            raise ValueError(f"--dataset {self.dataset}: --model ssvae needs 10 classes "
                             f"of labels; choose one of {list(SEMI_SUPERVISED_DATASETS)}")
        if self.loss not in (None, AUTO, "enum", "trace"):
            raise ValueError(f"--loss {self.loss}: --model ssvae sums the label out with "
                             f"enum, or samples it with trace (a score-function gradient)")
        if self.guide != "diagonal" or self.guide_options or self.init_from:
            bad = "--init-from" if self.init_from else "--guide"
            raise ValueError(f"{bad}: --model ssvae has its own guide q(y|x) q(z|x,y)")

    def resolved(self) -> "TrainConfig":
        """A copy with the model- and arch-dependent defaults filled in (what config.json
        records)."""
        gated, m2 = self.arch == "gated", self.model == "ssvae"
        return dataclasses.replace(
            self, z_dim=self.z_dim or (40 if gated else 50),
            hidden=tuple(self.hidden or ((300, 300) if gated else (500,) if m2 else (400,))),
            act=self.act or ("softplus" if m2 else "relu"),
            loss=self.loss or AUTO)

    def group(self, name: str) -> Dict[str, Any]:
        """The settings of one group (a key of ``GROUPS``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["group"] == name}

    @property
    def binarize_data(self) -> bool:
        return self.likelihood == "bernoulli" if self.binarize is None else self.binarize


#: The groups of settings (``pyro-vae train --help`` shows them so), each in a line.
GROUPS = {
    "data": "what the model learns from: the data set, its split and its preparation",
    "model": "p(x, z) and q(z | x): the model, its parts and their sizes",
    "training": "the objective, the optimizer, the loop, and the device it runs on",
    "run": "the run folder: where it is written, how a run continues, what is printed",
}

#: Data sets with the 10 classes ``--model ssvae`` needs.
SEMI_SUPERVISED_DATASETS = ("digits", "mnist", "fashion-mnist")

MODEL_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                       if f.metadata["group"] == "model")
# What --resume may change; any other difference from the run's config.json is refused.
RESUMABLE_CHANGES = ("epochs", "early_stopping", "lr", "clip_norm", "skip_nonfinite",
                     "checkpoint_every", "device", "compile", "precision", "data_dir",
                     "download", "out", "overwrite")


def flag(name: str) -> str:
    """The command-line flag of a field, without its dashes: ``batch_size`` ->
    ``batch-size``."""
    return name.replace("_", "-")


def parse_options(pairs: Iterable[str], what: str) -> Dict[str, Any]:
    """``["components=50", "pseudo_init=data"]`` -> ``{"components": 50, "pseudo_init":
    "data"}``: each value read as JSON where it is (numbers, true/false, null), else kept
    as text. ``what`` names the option in errors (a ``ValueError`` for a pair without
    ``=`` or whose key is not a Python name).

    Example:
        >>> parse_options(["components=50", "pseudo_init=data"], "prior_options")
        {'components': 50, 'pseudo_init': 'data'}
    """
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--{flag(what)}: {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except (ValueError, RecursionError):  # not JSON (or nested or long beyond reason)
            options[key] = text
    return options


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {name!r} is not a device this package trains on "
                         f"(auto, cpu, cuda, cuda:N)")
    try:
        return check_device(name)  # CUDA there, and the device's index
    except ArgumentError as e:
        raise ValueError(f"--device: {e.message}") from None


def build_model(config: TrainConfig, x_dim: int, train=None):
    """The model a (resolved) config describes. ``train``: the training split, needed by
    VampPrior pseudo-inputs initialized from data (not when loading trained weights).

    Built on the meta device first (nothing allocated, no random number drawn): a model
    whose weights alone would not fit in memory is refused in one line. Initial weights
    that are not finite (a part's options) are refused too, before any step."""
    if not (type(x_dim) is int and x_dim >= 1):
        raise ValueError(f"x_dim must be an integer >= 1, got {x_dim!r}")
    try:
        with torch.device("meta"):
            trial = _build(config, x_dim, None)
    except ValueError:
        raise
    except Exception:  # a part that cannot be built on the meta device: no size known
        trial = None
    if trial is not None:
        tensors = list(trial.parameters()) + list(trial.buffers())
        check_fits(sum(t.numel() * t.element_size() for t in tensors), "cpu",
                   "the model's weights", "choose a smaller --z-dim, --hidden or part options")
    try:
        vae = _build(config, x_dim, train)
    except (TypeError, RuntimeError, OverflowError, MemoryError) as e:  # sizes torch refuses
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot build the model ({type(e).__name__}: {reason})") from e
    # A NaN or an infinity makes its tensor's sum non-finite (one pass, no mask).
    bad = next((name for name, t in list(vae.named_parameters()) + list(vae.named_buffers())
                if t.is_floating_point() and not torch.isfinite(t.detach().sum())), None)
    if bad is not None:
        raise ValueError(f"the model's initial {bad} holds NaN or infinite values; check "
                         f"the parts' options")
    return vae


def _build(config: TrainConfig, x_dim: int, train=None):
    prior_options = dict(config.prior_options)
    if prior_options.get("pseudo_init") == "data":
        # Loading a trained run overwrites them; any images of the right shape will do.
        prior_options["data"] = train.x if train is not None else torch.rand(
            prior_options.get("components", 500), x_dim)
    if config.model == "ssvae":
        # The weight of log q(y|x) needs the split's size; a trained model's is not used.
        aux = paper_aux_weight(repeats(train, config.labels)[0], config.labels,
                               config.alpha) if train is not None else 0.0
        return SemiSupervisedVAE(
            x_dim, config.z_dim, config.hidden, likelihood=config.likelihood,
            prior=config.prior, act=config.act, arch=config.arch, aux_weight=aux,
            prior_options=prior_options, likelihood_options=config.likelihood_options)
    swapped = config.prior_guide is not None
    vae = MODELS[config.model](
        x_dim, config.z_dim, config.hidden, likelihood=config.likelihood,
        prior=config.prior, encoder=config.prior_guide if swapped else config.guide,
        act=config.act, arch=config.arch, prior_options=prior_options,
        guide_options=config.prior_guide_options if swapped else config.guide_options,
        likelihood_options=config.likelihood_options)
    if swapped:  # a guide fitted to another run's model: the prior keeps that encoder
        vae.swap_guide(build(config.guide, GUIDES, "guide", dict(
            x_dim=x_dim, z_dim=config.z_dim, hidden=config.hidden, act=config.act,
            arch=config.arch), config.guide_options))
    return vae


# Settings of config.json files written before parts took generic options.
_OLD_FIELDS = {"components": ("prior_options", "components"),
               "pseudo_init": ("prior_options", "pseudo_init"),
               "learn_weights": ("prior_options", "learn_weights"),
               "likelihood_scale": ("likelihood_options", "scale"),
               "flow_steps": ("guide_options", "flow_steps"),
               "prior_flow_steps": ("prior_guide_options", "flow_steps")}


# Settings that may name a class by import path ("package.module:ClassName").
IMPORTABLE = ("prior", "guide", "prior_guide")


def refuse_imports(raw: dict, where: str) -> None:
    """A run folder is data: a setting naming code to import is refused in one line
    (which module it would import), unless the caller trusts the folder."""
    for name in IMPORTABLE:
        value = raw.get(name)
        if isinstance(value, str) and ":" in value:
            raise ValueError(f"{where}: {name} {value!r} would import module "
                             f"{value.partition(':')[0]!r}; run folders may name registry "
                             f"entries only: pass trust_imports=True (--trust-imports) if "
                             f"you trust that code")


CONFIG_FORMAT = 2  # 1: flat fixed part options (components, flow_steps, ...), no "format"


def config_to_dict(config: TrainConfig) -> dict:
    """What config.json holds: the format, then every setting."""
    return {"format": CONFIG_FORMAT, **dataclasses.asdict(config)}


def config_from_dict(raw: dict, where: str, trust_imports: bool = False) -> TrainConfig:
    """A ``TrainConfig`` from a config.json's content, checked against its schema (every
    setting present, of its type; one line naming the file and the field); format 1 is
    converted. An import path in it is refused unless ``trust_imports``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if not trust_imports:
        refuse_imports(raw, where)
    raw = dict(raw)
    fmt = raw.pop("format", 1)
    if fmt not in (1, CONFIG_FORMAT):
        raise ValueError(f"{where}: format {fmt!r} is not one this version reads (1, "
                         f"{CONFIG_FORMAT})")
    _legacy(raw)
    _check_schema(raw, where, fmt)
    if isinstance(raw.get("hidden"), list):
        raw["hidden"] = tuple(raw["hidden"])
    if raw["z_dim"] is None or raw["hidden"] is None:
        raise ValueError(f"{where}: z_dim and hidden must be set")
    config = TrainConfig(**raw)
    try:
        config.validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config


def _legacy(raw: dict) -> None:
    """Format 1's fixed part options, moved into the parts' option dicts."""
    for old, (field, key) in _OLD_FIELDS.items():
        value = raw.pop(old, None)
        part = {"flow_steps": "guide", "prior_flow_steps": "prior_guide"}.get(old)
        guide = raw.get(part) if isinstance(raw.get(part), str) else None  # else: schema
        if part and "flow_steps" not in inspect.signature(
                GUIDES.get(guide, object)).parameters:
            continue  # recorded for every run; only a flow guide took it
        if value is not None:
            raw[field] = dict(raw.get(field) or {}, **{key: value})
    if raw.get("prior_guide") is not None and raw.get("prior_guide_options") is None:
        raw["prior_guide_options"] = {}


def _check_schema(raw: dict, where: str, fmt: int) -> None:
    """Every setting known, present (format 1 lacks the option dicts) and of its type."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}")
    hints = typing.get_type_hints(TrainConfig)
    for name, f in fields.items():
        if name not in raw:
            added_in_2 = f.default_factory is not dataclasses.MISSING
            if f.metadata.get("derived") or f.metadata.get("added") or (
                    fmt == 1 and added_in_2):
                continue  # its default applies
            raise ValueError(f"{where}: setting {name!r} is missing")
        expected = _kind_ok(hints[name], raw[name])
        if expected:
            raise ValueError(f"{where}: {name} must be {expected}, got {raw[name]!r}")


def _kind_ok(hint, value) -> str:
    """'' if ``value`` fits the type ``hint``, else what was expected."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return ""
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        ok = isinstance(value, list) and all(type(v) is int for v in value)
        return "" if ok else "a list of integers"
    if origin is dict:
        return "" if isinstance(value, dict) else "an object of KEY: VALUE"
    if origin is float:
        return "" if type(value) in (int, float) else "a number"
    return "" if type(value) is origin else f"{'an' if origin is int else 'a'} " \
        f"{ {int: 'integer', str: 'string', bool: 'boolean (true or false)'}[origin]}"
