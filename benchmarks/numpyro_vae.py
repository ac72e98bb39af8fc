"""The NumPyro reference of ``train_speed.py``: the same VAE (the tutorial MLP,
784-400-50, ReLU, standard normal prior; or the VampPrior paper's gated network with a
K = 500 VampPrior; Bernoulli likelihood) trained by NumPyro's ``SVI`` with
``TraceMeanField_ELBO`` and Adam, one jitted epoch at a time (``lax.fori_loop`` over the
batches, dynamic binarization inside, as NumPyro's own VAE example does), waited on with
``block_until_ready``. Optional: it needs ``pip install numpyro`` (JAX on the CPU).

The VampPrior is written as NumPyro users write a mixture: ``MixtureSameFamily`` of the
encoder's Gaussians at the pseudo-inputs u = Hardtanh(0, 1)(W), with uniform weights;
``TraceMeanField_ELBO`` has no closed-form KL for it and takes the Monte Carlo one, as
the package does.

Its weights start from the package model's, and come back into it for the validation
ELBO, so that both are measured by the same estimator (``pyro_vae.elbo``).
"""

import time

import numpy as np
import torch

import jax
import jax.numpy as jnp
from jax import lax, random

import numpyro
import numpyro.distributions as nd
from numpyro.infer import SVI, TraceMeanField_ELBO


def _forward(params, prefix, x, layers, gated):
    """The network ``prefix`` (its linear maps ``{prefix}{i}_w``/``_b`` in the torch
    module's order): an MLP with ReLU between the layers, or gated layers
    h * sigmoid(g) (``pyro_vae.nn.GatedDense``, whose h and g come in pairs) then a
    linear output."""
    def linear(i, x):
        return x @ params[f"{prefix}{i}_w"] + params[f"{prefix}{i}_b"]
    if gated:
        for i in range(0, layers - 1, 2):
            x = linear(i, x) * jax.nn.sigmoid(linear(i + 1, x))
        return linear(layers - 1, x)
    for i in range(layers):
        x = linear(i, x)
        if i < layers - 1:
            x = jax.nn.relu(x)
    return x


def _linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


class NumPyroVAE:
    """NumPyro's SVI on the weights of ``vae`` (a ``pyro_vae.VAE`` with MLP or gated
    networks, a standard normal or a VampPrior prior, and the Bernoulli likelihood), for
    ``epoch`` calls on gray images ``x`` (N x 784) in batches of ``batch_size`` (the
    last partial batch is dropped: a jitted loop needs one shape)."""

    def __init__(self, vae, x: torch.Tensor, batch_size: int, lr: float, seed: int = 0):
        from pyro_vae.nn import GatedMLP
        from pyro_vae.priors import VampPrior
        self.vae, self.batch_size = vae, batch_size
        self.x = jnp.asarray(x.cpu().numpy())
        self.steps = len(x) // batch_size
        self.enc, self.dec = _linears(vae.encoder.net), _linears(vae.decoder)
        self.gated = isinstance(vae.encoder.net, GatedMLP)
        self.vamp = isinstance(vae.prior, VampPrior)
        self.scale, self.min_scale = vae.encoder.scale, vae.encoder.min_scale
        self.z_dim = vae.z_dim
        init = {}
        for prefix, layers in (("enc", self.enc), ("dec", self.dec)):
            for i, m in enumerate(layers):
                init[f"{prefix}{i}_w"] = jnp.asarray(m.weight.detach().cpu().numpy().T)
                init[f"{prefix}{i}_b"] = jnp.asarray(m.bias.detach().cpu().numpy())
        if self.vamp:
            init["pseudo"] = jnp.asarray(vae.prior.pseudo_weight.detach().cpu().numpy())
        self.svi = SVI(self.model, self.guide, numpyro.optim.Adam(lr), TraceMeanField_ELBO())
        self.state = self.svi.init(random.PRNGKey(seed), self.x[:batch_size],
                                   init_params=init)
        self.key = random.PRNGKey(seed + 1)
        self._epoch = jax.jit(self._run_epoch)

    def compile(self) -> None:
        """Compile the epoch ahead of time, without running it."""
        self._epoch = self._epoch.lower(self.state, self.key).compile()

    def _params(self, prefix, layers):
        return {f"{prefix}{i}_{t}": numpyro.param(f"{prefix}{i}_{t}", None)
                for i in range(len(layers)) for t in "wb"}

    def _q(self, x):
        """q(z | x)'s location and scale (``DiagonalNormalEncoder``)."""
        out = _forward(self._params("enc", self.enc), "enc", x, len(self.enc), self.gated)
        loc, s = out[..., :self.z_dim], out[..., self.z_dim:]
        if self.scale == "softplus":
            return loc, self.min_scale + jax.nn.softplus(s)
        return loc, jnp.exp(0.5 * jnp.clip(s, -6.0, 2.0))

    def _prior(self):
        if not self.vamp:
            return nd.Normal(0, 1).expand([self.z_dim]).to_event(1)
        pseudo = jnp.clip(numpyro.param("pseudo", None), 0.0, 1.0)
        loc, scale = self._q(pseudo)  # K x z
        mixing = nd.Categorical(logits=jnp.zeros(len(pseudo)))
        return nd.MixtureSameFamily(mixing, nd.Normal(loc, scale).to_event(1))

    def model(self, x):
        decoder = self._params("dec", self.dec)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", self._prior())
            logits = _forward(decoder, "dec", z, len(self.dec), self.gated)
            numpyro.sample("x", nd.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        loc, scale = self._q(x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", nd.Normal(loc, scale).to_event(1))

    def _run_epoch(self, state, key):
        order_key, key = random.split(key)
        order = random.permutation(order_key, len(self.x))

        def body(i, carry):
            state, loss, key = carry
            key, draw = random.split(key)
            index = lax.dynamic_slice_in_dim(order, i * self.batch_size, self.batch_size)
            batch = random.bernoulli(draw, self.x[index]).astype(jnp.float32)
            state, step_loss = self.svi.update(state, batch)
            return state, loss + step_loss, key
        state, loss, _ = lax.fori_loop(0, self.steps, body, (state, 0.0, key))
        return state, loss / self.steps

    def epoch(self) -> float:
        """Seconds of one epoch (compiled on the first call, unless ``compile`` ran)."""
        self.key, key = random.split(self.key)
        start = time.perf_counter()
        self.state, loss = self._epoch(self.state, key)
        loss.block_until_ready()
        return time.perf_counter() - start

    def copy_back(self) -> None:
        """The trained weights into ``vae``."""
        params = self.svi.get_params(self.state)
        with torch.no_grad():
            for prefix, layers in (("enc", self.enc), ("dec", self.dec)):
                for i, m in enumerate(layers):
                    m.weight.copy_(torch.from_numpy(np.asarray(params[f"{prefix}{i}_w"]).T))
                    m.bias.copy_(torch.from_numpy(np.asarray(params[f"{prefix}{i}_b"])))
            if self.vamp:
                self.vae.prior.pseudo_weight.copy_(
                    torch.from_numpy(np.asarray(params["pseudo"])))
