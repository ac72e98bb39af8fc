"""One training step: Pyro's ELBO for the loss and its gradients, one PyTorch optimizer
for every parameter, and a finite check that never waits for the device unless asked.
``pyro_vae.train.Trainer`` runs it over epochs."""

import contextlib
import logging
from typing import Dict, Optional, Sequence, Tuple

import torch

import pyro
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.optim.clipped_adam import ClippedAdam

from .compiled import TraceError
from .contract import guide_parameters
from .distributed import World
from .objectives import kl_weight

logger = logging.getLogger("pyro_vae")

OPTIMIZERS = ("adam", "clipped_adam")


class _Loss(torch.nn.Module):
    """Pyro's ELBO as a module: ``forward`` returns its ``differentiable_loss`` (what
    Pyro's ``ELBOModule`` does), so that ``DistributedDataParallel`` can wrap it. The
    networks are used without ``param`` sites where the model offers it
    (``unregistered``): the parameters were found once, by ``trained_parameters``."""

    def __init__(self, module, model_fn, objective, beta_sites=None):
        super().__init__()
        self.module, self.model_fn, self.objective = module, model_fn, objective
        self.beta_sites = beta_sites

    def forward(self, *batch, num_data=None, beta: float = 1.0) -> torch.Tensor:
        unregistered = getattr(self.module, "unregistered", contextlib.nullcontext)
        with unregistered(), kl_weight(beta, self.beta_sites):
            return self.objective.differentiable_loss(self.model_fn, self.module.guide,
                                                      *batch, num_data=num_data)


class Step:
    """One training step: Pyro's ELBO gives the loss and its gradients; one PyTorch
    optimizer updates every trained parameter, unless the loss or a gradient is not
    finite, in which case nothing changes.

    This is ``SVI.step`` with two changes. Pyro's ``PyroOptim`` keeps one optimizer per
    parameter tensor and traces the step to find them; here the parameters are found
    once, and a single fused Adam updates them all (``make_optimizer``). The loss is the
    ELBO's ``differentiable_loss`` (``_Loss``, under ``DistributedDataParallel`` when
    several processes train), or for an ELBO that has none (``RenyiELBO``,
    ``TraceGraph_ELBO``) its ``loss_and_grads``.

    The finite check never waits for the device unless asked (``check``): the fused Adam
    kernel skips the update on the device itself when told the step was not finite.

    ``traced`` (set by ``fit(compile=True)``): the step recorded and compiled, as a
    ``pyro_vae.compiled.TracedLoss`` (loss and gradients; the update as above) or a
    ``pyro_vae.fused.TracedStep`` (the update, the finite check and the batch draw in
    the same graph), for batches of the size recorded.
    """

    def __init__(self, module, objective: ELBO, params: Dict[str, torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, world: Optional[World] = None,
                 model_fn=None, beta_sites=None):
        self.module, self.objective = module, objective
        self.model_fn = model_fn or module.model
        self.params, self.optimizer = params, optimizer
        self.world, self.beta_sites = world or World(), beta_sites
        self.differentiable = hasattr(objective, "differentiable_loss")
        if not self.differentiable:
            self.guide_fn = _with_param_sites(module.guide, params)
        if self.differentiable:
            self.loss = _Loss(module, self.model_fn, objective, beta_sites)
            if self.world.size > 1:
                trained = {id(p) for p in params.values()}
                self.loss = self.world.wrap(self.loss, ignore=[
                    "module." + name for name, p in module.named_parameters()
                    if id(p) not in trained])
        self.device_skip = (isinstance(optimizer, torch.optim.Adam)
                            and bool(optimizer.defaults.get("fused")))
        # Set by fit(compile=True): a TracedLoss (pyro_vae.compiled; the update stays
        # eager), or a TracedStep (pyro_vae.fused: the update made by it too).
        self.traced = None

    def __call__(self, batch: Sequence[torch.Tensor], weight: float = 1.0, check: bool = True,
                 num_data: Optional[int] = None, beta: float = 1.0
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[str]]:
        """Returns the loss (times ``weight``) and whether it and every gradient were
        finite, both as tensors on the device; and, if the step was checked on the host
        (``check``, or an optimizer that cannot skip on the device), the first
        non-finite quantity ("loss", "gradient of decoder.0.weight") or None."""
        if self._recorded(batch, update=True):
            try:
                return self._whole_step(batch, weight, check, num_data, beta)
            except TraceError as e:
                self._eager_from_here(e)
        loss = self._loss_and_grads(batch, weight, num_data, beta)
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        # One sum per gradient: a NaN or an infinity anywhere makes the total non-finite
        # (so does a sum beyond the float range, which a norm's squares reach far sooner).
        finite = torch.isfinite(torch.stack([loss.float()] + [g.sum().float() for g in grads])
                                .sum())
        finite = self.world.all_true(finite)  # every process takes the same decision
        bad = None
        if check or not self.device_skip:
            if not finite:  # waits for the device
                bad = self._first_nonfinite(loss)
            else:
                self.optimizer.step()
        else:
            self.optimizer.found_inf = (~finite).float()  # read by the fused Adam kernel
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return loss, finite, bad

    def _recorded(self, batch, update: bool) -> bool:
        """Whether the recorded step takes ``batch``, with (``update``) or without the
        update in its graph."""
        # Distribution checks read values, so they are not in a recorded step; nor is a
        # batch of another size (the last one of an epoch).
        return self.traced is not None and \
            getattr(self.traced, "updates", False) == update and \
            self.traced.takes(batch) and not is_validation_enabled()

    def _eager_from_here(self, e: TraceError) -> None:
        logger.warning("the step runs eagerly from here: %s", e)
        self.traced = None

    def _whole_step(self, batch, weight, check, num_data, beta):
        """The step as one compiled call (``pyro_vae.fused.TracedStep``): the update was
        made in it where the step was finite."""
        loss, finite, sums = self.traced.step(batch, weight, num_data, beta)
        self.traced.update.commit(finite)
        bad = None
        if check and not finite:  # waits for the device
            names = ["loss"] + [f"gradient of {name}" for name in self.params]
            bad = next((name for name, ok in zip(names, torch.isfinite(sums).tolist())
                        if not ok), "sum of the gradients")
        return loss, finite, bad

    def dry_run(self, batch, num_data: Optional[int] = None, beta: float = 1.0) -> None:
        """A step on ``batch`` that changes nothing (no update; the gradients are
        dropped): to compile, or to time."""
        if self._recorded(batch, update=True):
            self.traced.step(batch, 1.0, num_data, beta, dry=True)
        else:
            self._loss_and_grads(batch, 1.0, num_data, beta)
            self.optimizer.zero_grad(set_to_none=True)

    def _loss_and_grads(self, batch, weight, num_data, beta) -> torch.Tensor:
        if self._recorded(batch, update=False):
            try:
                loss, grads = self.traced(batch, weight, num_data, beta)
            except TraceError as e:
                self._eager_from_here(e)
                return self._eager_loss_and_grads(batch, weight, num_data, beta)
            for p, g in zip(self.params.values(), grads):
                p.grad = g
            return loss
        return self._eager_loss_and_grads(batch, weight, num_data, beta)

    def _eager_loss_and_grads(self, batch, weight, num_data, beta) -> torch.Tensor:
        if self.differentiable:
            loss = self.loss(*batch, num_data=num_data, beta=beta)
            if weight != 1:
                loss = loss * weight
            loss.backward()
            return loss.detach()
        with kl_weight(beta, self.beta_sites):
            loss = self.objective.loss_and_grads(self.model_fn, self.guide_fn, *batch,
                                                 num_data=num_data)
        return torch.tensor(torch_item(loss), device=batch[0].device)

    def _first_nonfinite(self, loss: torch.Tensor) -> str:
        if not torch.isfinite(loss):
            return "loss"
        return next((f"gradient of {name}" for name, p in self.params.items()
                     if p.grad is not None and not torch.isfinite(p.grad).all()),
                    "sum of the gradients" if self.world.size == 1 else
                    "loss of another process")


def _with_param_sites(guide, params: Dict[str, torch.nn.Parameter]):
    """``guide`` that first shows ``params`` as ``param`` sites: an ELBO's
    ``loss_and_grads`` backpropagates only where its traces hold some, and a model that
    registers nothing with Pyro (a plain module, methods without ``pyro_method``) would
    otherwise not train."""
    def guide_fn(*args, **kwargs):
        for name, p in params.items():
            pyro.param("_fit." + name, p)
        return guide(*args, **kwargs)
    return guide_fn


def trained_parameters(module, objective: ELBO, batch: Sequence[torch.Tensor],
                       guide_only: bool = False, model_fn=None) -> Dict[str, torch.nn.Parameter]:
    """The parameters of ``module`` that the loss depends on (one probe of its gradient
    on ``batch``), by name, in ``module``'s order: with ``guide_only``, those of the
    modules ``module.guide_modules`` names. Parameters registered with ``pyro.param``
    outside the module are refused: ``fit`` trains module parameters only."""
    model_fn = model_fn or module.model
    with poutine.trace(param_only=True) as capture, torch.no_grad(), \
            pyro.validation_enabled(False):
        poutine.replay(model_fn, trace=poutine.trace(module.guide).get_trace(*batch))(*batch)
    owned = {id(p) for p in module.parameters()}
    if any(id(_unconstrained(site["value"])) not in owned
           for site in capture.trace.nodes.values()):
        raise ValueError("the model or guide has Pyro parameters outside the module "
                         "(pyro.param); fit trains module parameters only")
    named = guide_parameters(module) if guide_only else dict(module.named_parameters())
    named = {k: p for k, p in named.items() if p.requires_grad}
    probe = objective if hasattr(objective, "differentiable_loss") else Trace_ELBO(
        max_plate_nesting=objective.max_plate_nesting)
    with pyro.validation_enabled(False):
        loss = probe.differentiable_loss(model_fn, module.guide, *batch)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True) \
        if named and loss.requires_grad else [None] * len(named)
    return {k: p for (k, p), g in zip(named.items(), grads) if g is not None}


def _unconstrained(value: torch.Tensor) -> torch.Tensor:
    """The leaf tensor behind a ``param`` site's value."""
    return value.unconstrained() if hasattr(value, "unconstrained") else value


def make_optimizer(name: str, params, lr: float = 1e-3,
                   clip_norm: float = 10.0) -> torch.optim.Optimizer:
    """One optimizer over ``params``: PyTorch's ``Adam`` (fused kernel), or Pyro's
    ``ClippedAdam`` (each gradient clipped to ``clip_norm`` elementwise, as
    ``pyro.optim.ClippedAdam`` does)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "clipped_adam":
        return ClippedAdam(params, lr=lr, clip_norm=clip_norm)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
