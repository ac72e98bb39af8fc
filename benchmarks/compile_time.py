"""Seconds ``fit(compile=True)`` takes to compile its step, cold (an empty inductor cache)
and warm (the cache the cold run filled), against NumPyro's JIT of the same model.

Inductor keeps the C++ headers it precompiles outside its cache, in the temporary
directory (``$TMPDIR/torchinductor_$USER/precompiled_headers``): they depend only on
torch, the compiler and its flags, so one machine builds them once, at its first compile,
for every later model and run. ``first`` is that first compile: a cold one in a new
temporary directory, headers included. ``cold`` takes the headers a first compile built.

    python benchmarks/compile_time.py --data-dir ../shared/data [--threads 1]
        [--models mlp gated-vamp m2 user] [--repeat 1]

Each measurement runs in a new process (so nothing compiled stays in memory): one epoch
of ``fit`` on a few batches of MNIST, whose first record gives ``compile_seconds`` (the
step recorded, compiled and run once, before the epoch's clock).

The compilers' own imports are timed apart, on both sides alike: ``fit`` imports
inductor's modules at its first compile (so its ``compile_seconds`` holds them), while
a NumPyro user has imported JAX and NumPyro before the JIT. Each child first imports
the compiler (inductor's modules; JAX and NumPyro), timed as ``import``, then compiles.
The table gives the compile alone, and in parentheses with its import.

Models: ``mlp`` and ``gated-vamp`` (``train_speed.py``'s), ``m2``
(``SemiSupervisedVAE``, the paper's 500-unit networks, 100 labels, ``TraceEnum_ELBO``),
``user`` (a VAE written as a new user writes it: a ``PyroModule`` with its own networks,
``Trace_ELBO``). NumPyro's JIT (``numpyro_vae.py``: ``SVI.init`` and the epoch's
ahead-of-time compilation, on the same networks) for ``mlp`` and ``gated-vamp``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def _import_compiler(numpyro: bool) -> float:
    """Seconds to import the compiler a compile needs: inductor's modules (which ``fit``
    would import at its first compile), or JAX and NumPyro."""
    start = time.perf_counter()
    if numpyro:
        import numpyro_vae  # noqa: F401 - jax, numpyro
    else:
        import torch._functorch.aot_autograd  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401
        import torch._inductor.codegen.cpp  # noqa: F401
        import torch._inductor.codegen.cpp_wrapper_cpu  # noqa: F401
        import torch.fx.experimental.proxy_tensor  # noqa: F401
    return time.perf_counter() - start


def child(model: str, data_dir: str, threads: int) -> dict:
    """One compile, in this process: {"seconds": ..., "import_seconds": ...}."""
    import torch
    from torch import nn
    import torch.nn.functional as F
    import pyro
    import pyro.distributions as dist
    from pyro.nn import PyroModule
    import pyro_vae as pv
    sys.path.insert(0, HERE)
    from train_speed import CONFIGS, NumPyro, _threads
    _threads(threads)
    train, _, _ = pv.datasets.load("mnist", data_dir)
    torch.manual_seed(0)
    imported = _import_compiler(model.startswith("numpyro-"))
    if model.startswith("numpyro-"):
        cfg = CONFIGS[model[len("numpyro-"):]]
        vae = pv.VAE(784, cfg["z_dim"], cfg["hidden"], arch=cfg["arch"], prior=cfg["prior"],
                     prior_options=cfg["prior_options"])
        return {"seconds": NumPyro(vae, train.subset(50_000), cfg, 0).compile_seconds,
                "import_seconds": imported}
    options = {}
    if model in CONFIGS:
        cfg = CONFIGS[model]
        net = pv.VAE(784, cfg["z_dim"], cfg["hidden"], arch=cfg["arch"], prior=cfg["prior"],
                     prior_options=cfg["prior_options"])
        data, options = train.subset(4 * cfg["batch_size"]), {"batch_size": cfg["batch_size"]}
    elif model == "m2":
        from pyro_vae.semisupervised import SemiSupervisedVAE, choose_labelled
        net = SemiSupervisedVAE(784)
        known = torch.zeros(len(train), dtype=torch.bool)
        known[choose_labelled(train.labels, 100)] = True
        data, options = train.with_labels(known).subset(400), {"batch_size": 100}
    else:
        class UserVAE(PyroModule):
            """A VAE as a new user writes it (see ``pyro_vae.contract``)."""

            def __init__(self, z=20, hidden=256):
                super().__init__()
                self.enc = nn.Sequential(nn.Linear(784, hidden), nn.Tanh(),
                                         nn.Linear(hidden, 2 * z))
                self.dec = nn.Sequential(nn.Linear(z, hidden), nn.Tanh(),
                                         nn.Linear(hidden, 784))
                self.z = z

            def model(self, x=None, num_data=None):
                pyro.module("dec", self.dec)
                with pyro.plate("data", num_data or len(x), subsample=x):
                    z = pyro.sample("z", dist.Normal(torch.zeros(self.z), 1.0).to_event(1))
                    pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

            def guide(self, x, num_data=None):
                pyro.module("enc", self.enc)
                loc, s = self.enc(x).chunk(2, -1)
                with pyro.plate("data", num_data or len(x), subsample=x):
                    pyro.sample("z", dist.Normal(loc, F.softplus(s) + 1e-3).to_event(1))
        net, data = UserVAE(), train.subset(512)
        options = {"batch_size": 128, "loss": "trace"}
    history = pv.fit(net, data, epochs=1, compile=True, progress=False, **options)
    return {"seconds": history[0]["compile_seconds"], "import_seconds": imported}


def measure(model: str, data_dir: str, threads: int, cache: str,
            tmp: Optional[str] = None) -> dict:
    """Seconds to compile ``model`` in a new process, with inductor's cache in ``cache``
    (and the temporary directory ``tmp``, if given), and to import its compiler before:
    {"seconds": ..., "import_seconds": ...}."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    if tmp is not None:
        env["TMPDIR"] = tmp
    out = subprocess.run([sys.executable, __file__, "--child", model, data_dir, str(threads)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(m: Optional[dict]) -> str:
    """A table cell: the compile's seconds, then with its import in parentheses;
    empty for no measurement."""
    if m is None:
        return ""
    return f"{m['seconds']:.1f} ({m['seconds'] + m['import_seconds']:.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["mlp", "gated-vamp", "m2", "user"],
                        choices=["mlp", "gated-vamp", "m2", "user"])
    parser.add_argument("--repeat", type=int, default=1, help="cold/warm pairs per model")
    args = parser.parse_args()
    print(json.dumps({"load_average": os.getloadavg(), "threads": args.threads}), flush=True)
    rows = []
    for model in args.models:
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as tmp:
                first = measure(model, args.data_dir, args.threads, cache, tmp)
            with tempfile.TemporaryDirectory() as cache:
                cold = measure(model, args.data_dir, args.threads, cache)
                warm = measure(model, args.data_dir, args.threads, cache)
            numpyro = None
            if model in ("mlp", "gated-vamp"):
                with tempfile.TemporaryDirectory() as cache:
                    numpyro = measure("numpyro-" + model, args.data_dir, args.threads, cache)
            rows.append({"model": model, "first": first, "cold": cold, "warm": warm,
                         "numpyro_jit": numpyro})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ncompile seconds ({args.threads} thread(s); load average "
          f"{os.getloadavg()[0]:.2f} after); each: the compile alone (with its compiler's "
          f"import)\n\n| model | first | cold | warm | NumPyro JIT |\n|---|---|---|---|---|")
    for r in rows:
        cells = [_cell(r[k]) for k in ("first", "cold", "warm", "numpyro_jit")]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        raise SystemExit(main())
