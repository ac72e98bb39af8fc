"""The NumPyro reference of ``train_speed.py``: the tutorial MLP VAE (784-400-50, ReLU,
standard normal prior, Bernoulli likelihood) trained by NumPyro's ``SVI`` with
``TraceMeanField_ELBO`` and Adam, one jitted epoch at a time (``lax.fori_loop`` over the
batches, dynamic binarization inside, as NumPyro's own VAE example does), waited on with
``block_until_ready``. Optional: it needs ``pip install numpyro`` (JAX on the CPU).

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


def _dense(params, prefix, x, layers):
    for i in range(layers):
        x = x @ params[f"{prefix}{i}_w"] + params[f"{prefix}{i}_b"]
        if i < layers - 1:
            x = jax.nn.relu(x)
    return x


def _linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


class NumPyroVAE:
    """NumPyro's SVI on the weights of ``vae`` (a ``pyro_vae.VAE`` with an MLP encoder
    and decoder and softplus scales), for ``epoch`` calls on gray images ``x`` (N x 784)
    in batches of ``batch_size`` (the last partial batch is dropped: a jitted loop needs
    one shape)."""

    def __init__(self, vae, x: torch.Tensor, batch_size: int, lr: float, seed: int = 0):
        self.vae, self.batch_size = vae, batch_size
        self.x = jnp.asarray(x.cpu().numpy())
        self.steps = len(x) // batch_size
        self.enc, self.dec = _linears(vae.encoder.net), _linears(vae.decoder)
        self.min_scale = vae.encoder.min_scale
        self.z_dim = vae.z_dim
        init = {}
        for prefix, layers in (("enc", self.enc), ("dec", self.dec)):
            for i, m in enumerate(layers):
                init[f"{prefix}{i}_w"] = jnp.asarray(m.weight.detach().cpu().numpy().T)
                init[f"{prefix}{i}_b"] = jnp.asarray(m.bias.detach().cpu().numpy())
        self.svi = SVI(self.model, self.guide, numpyro.optim.Adam(lr), TraceMeanField_ELBO())
        self.state = self.svi.init(random.PRNGKey(seed), self.x[:batch_size],
                                   init_params=init)
        self.key = random.PRNGKey(seed + 1)
        self._epoch = jax.jit(self._run_epoch)

    def compile(self) -> None:
        """Compile the epoch ahead of time, without running it."""
        self._epoch = self._epoch.lower(self.state, self.key).compile()

    def model(self, x):
        n_dec = len(self.dec)
        params = {f"dec{i}_{t}": numpyro.param(f"dec{i}_{t}", None)
                  for i in range(n_dec) for t in "wb"}
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", nd.Normal(0, 1).expand([self.z_dim]).to_event(1))
            logits = _dense(params, "dec", z, n_dec)
            numpyro.sample("x", nd.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        n_enc = len(self.enc)
        params = {f"enc{i}_{t}": numpyro.param(f"enc{i}_{t}", None)
                  for i in range(n_enc) for t in "wb"}
        out = _dense(params, "enc", x, n_enc)
        loc, s = out[:, :self.z_dim], out[:, self.z_dim:]
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", nd.Normal(loc, self.min_scale + jax.nn.softplus(s))
                           .to_event(1))

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
