"""Where a compiled training step's time goes: a per-step breakdown of one epoch of
``fit(compile=True)`` (``torch.profiler``), and the matrix-product floor of the step (its
matrix products alone, timed with ``torch.mm`` at the step's shapes).

    python benchmarks/step_profile.py --data-dir ../shared/data [--config mlp gated-vamp]
        [--precision float32 bf16] [--threads 1] [--steps 100] [--kernels]

For each configuration (``train_speed.py``'s) and precision, ``fit`` trains two epochs of
``--steps`` steps; the second is profiled (with inductor's kernel names) and split into:

- ``matrix products``: the matrix-product kernels the graph calls (``mm``, ``addmm``);
- ``optimizer update``: the graph's kernel that holds Adam's update (named for its
  ``lerp``; PyTorch's ``_fused_adam_`` where the update is eager);
- ``batch draw``: the key of the batch's binarization noise (``random_``, drawn from the
  data generator; ``uniform_`` and ``bernoulli_`` where uniforms are drawn) and the
  gather with the binarization's hash (kernels named for ``index_select``; one that also
  computes the likelihood counts under other kernels);
- ``other kernels``: every other kernel and operator (the likelihood, the KL, the
  finite check's sums, the sampler's ``normal_``, ...);
- ``Python and calls``: the rest of the epoch's time: the trainer's Python between
  steps, the graph's wrapper and calls, the profiler's own cost.

With ``--kernels``, each kernel of the step (the graph's kernels, its matrix products, the
fused Adam update) in the order the step calls it, with its median and its fastest time
over the profiled steps.

The floor: the step's matrix products (their shapes, layouts and dtypes, as an eager step
runs them) timed back to back with ``torch.mm``, best of 30 repeats; with their FLOP count
it gives the rate this core reaches on them. Where JAX is installed, the same float32
products are also timed as one ``jax.jit`` (XLA's matrix kernels, which NumPyro's step
calls), best of 30. Run it on a quiet machine: the profile measures wall time.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyro

import pyro_vae as pv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_speed import CONFIGS, _cpu_model, _threads  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aoti_torch_cpu_mm_out",
           "aoti_torch_cpu_addmm_out", "aoti_torch_cpu_bmm_out")


def category(name: str) -> str:
    if name in MATMULS:
        return "matrix products"
    if "lerp" in name or "_fused_adam" in name or name.startswith("Optimizer."):
        return "optimizer update"
    if name in ("aten::random_", "aten::randint", "aten::uniform_", "aten::bernoulli_",
                "aten::index_select"):
        return "batch draw"
    if "index_select" in name:  # a kernel that gathers the batch, alone or with more
        return "batch draw" if "softplus" not in name else "other kernels"
    return "other kernels"


class _Profile(pv.Hook):
    """Profiles epoch 2: from its first checkpoint (epoch 2, step 0) to its end."""

    def __init__(self):
        self.prof, self.seconds = None, None

    def on_checkpoint(self, state):
        if (state.position.epoch, state.position.step) == (2, 0) and self.prof is None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_epoch_end(self, record, history, model):
        if record["epoch"] == 2:
            self.prof.__exit__(None, None, None)
            self.seconds = record["seconds"]


def breakdown(events, seconds: float, steps: int) -> dict:
    """ms per step by category (self times; top-level Python is the rest)."""
    spent = defaultdict(float)
    for e in events:
        if e.key.startswith(("## Call CompiledFxGraph", "Torch-Compiled Region",
                              "AOTDispatcher", "TorchDynamo", "## ")):
            continue  # wrappers: their own time falls in "Python and calls"
        spent[category(e.key)] += e.self_cpu_time_total / 1e3  # ms
    total = 1e3 * seconds
    spent["Python and calls"] = max(total - sum(spent.values()), 0.0)
    return {k: v / steps for k, v in spent.items()}


def kernels(events, steps: int) -> list | None:
    """Each kernel of a step in the order the step calls them (the graph's kernels, its
    matrix products and the fused Adam update), with its median and its fastest time
    over the profiled steps, in ms: ``[(name, median, fastest), ...]``; None when the
    steps did not all call the same kernels."""
    calls = sorted((e for e in events if e.name in MATMULS or e.name.startswith("graph_")
                    or "_fused_adam" in e.name), key=lambda e: e.time_range.start)
    per_step = len(calls) // steps
    if not calls or per_step * steps != len(calls):
        return None
    rows = []
    for i in range(per_step):
        seen = [calls[k * per_step + i] for k in range(steps)]
        if len({e.name for e in seen}) != 1:
            return None
        times = [e.cpu_time_total / 1e3 for e in seen]
        rows.append((seen[0].name, statistics.median(times), min(times)))
    return rows


class _Matmuls(TorchDispatchMode):
    """The matrix products an eager step runs: (a's shape and strides, b's, dtype)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ops = torch.ops.aten
        if func in (ops.mm.default, ops.addmm.default):
            a, b = args[-2], args[-1]
            self.seen.append(((tuple(a.shape), a.stride()), (tuple(b.shape), b.stride()),
                              a.dtype))
        return func(*args, **(kwargs or {}))


def matmul_floor(vae, batch, num_data: int, bf16: bool) -> dict:
    """The step's matrix products, timed alone with ``torch.mm``."""
    from pyro_vae.step import _Loss
    from pyro_vae.objectives import make_elbo
    loss = _Loss(vae, vae.model, make_elbo("meanfield", 1))
    record = _Matmuls()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.no_grad()
    with pyro.validation_enabled(False), record:
        if bf16:
            with context:
                value = loss(*batch, num_data=num_data)
        else:
            value = loss(*batch, num_data=num_data)
        value.backward()
    vae.zero_grad(set_to_none=True)

    def operand(shape, stride, dtype):
        return torch.empty_strided(shape, stride, dtype=dtype).normal_()
    products = [(operand(*a, dtype), operand(*b, dtype)) for a, b, dtype in record.seen]
    outs = [torch.empty(a.shape[0], b.shape[1], dtype=a.dtype) for a, b in products]
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in products)
    best = math.inf
    for _ in range(30):
        start = time.perf_counter()
        for (a, b), out in zip(products, outs):
            torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    floor = {"products": len(products), "mflop": flops / 1e6, "ms": 1e3 * best,
             "gflops": flops / best / 1e9}
    xla = None if bf16 else xla_floor(products)
    if xla is not None:
        floor.update(xla_ms=1e3 * xla, xla_gflops=flops / xla / 1e9)
    return floor


def xla_floor(products) -> float | None:
    """Seconds XLA takes for the same float32 products (one ``jax.jit`` of them all, the
    transposed operands transposed inside it, as NumPyro's step has them), best of 30;
    None where JAX is not installed."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None

    def stored(t):  # the array as it lies in memory; whether the product reads it transposed
        transposed = t.stride(0) == 1 and t.shape[1] > 1
        return jnp.asarray((t.t() if transposed else t).contiguous().numpy()), transposed

    operands = [(stored(a), stored(b)) for a, b in products]
    flags = tuple((ta, tb) for (_, ta), (_, tb) in operands)
    arrays = [(a, b) for (a, _), (b, _) in operands]

    @jax.jit
    def run(arrays):
        return [(a.T if ta else a) @ (b.T if tb else b)
                for (a, b), (ta, tb) in zip(arrays, flags)]

    jax.block_until_ready(run(arrays))
    best = math.inf
    for _ in range(30):
        start = time.perf_counter()
        jax.block_until_ready(run(arrays))
        best = min(best, time.perf_counter() - start)
    return best


def run(name: str, train, precision: str, steps: int) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    vae = pv.VAE(784, cfg["z_dim"], cfg["hidden"], arch=cfg["arch"], prior=cfg["prior"],
                 prior_options=cfg["prior_options"])
    data = train.subset(steps * cfg["batch_size"])
    hook = _Profile()
    pv.fit(vae, data, epochs=2, batch_size=cfg["batch_size"], lr=cfg["lr"], compile=True,
           precision=precision, hooks=[hook], progress=False)
    parts = breakdown(hook.prof.key_averages(), hook.seconds, steps)
    each = kernels(hook.prof.events(), steps)
    batch = next(data.batches(cfg["batch_size"], generator=torch.Generator().manual_seed(0)))
    floor = matmul_floor(vae, tuple(batch), len(data), precision == "bf16")
    return {"config": name, "precision": precision, "steps": steps,
            "ms_per_step": 1e3 * hook.seconds / steps, "breakdown": parts,
            "matmul_floor": floor, "kernels": each}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--precision", nargs="+", default=["float32", "bf16"],
                        choices=["float32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
    parser.add_argument("--kernels", action="store_true",
                        help="also each kernel of the step, in order: median and fastest ms")
    args = parser.parse_args()
    _threads(args.threads)
    torch._inductor.config.cpp.enable_kernel_profile = True  # kernels by name
    train, _, _ = pv.datasets.load("mnist", args.data_dir)
    info = dict(threads=torch.get_num_threads(), torch=torch.__version__,
                fast_bf16=pv.compiled.fast_bf16("cpu"), load_average=os.getloadavg(),
                machine=platform.machine(), **_cpu_model())
    print(json.dumps(info), flush=True)
    results = []
    for name in args.config:
        for precision in args.precision:
            if precision == "bf16" and not info["fast_bf16"]:
                print(f"{name} bf16: refused (no fast bfloat16 here)")
                continue
            results.append(run(name, train, precision, args.steps))
            print(json.dumps(results[-1]), flush=True)
    print(f"\nms per step (1 thread, {info['cpu']}, load average "
          f"{info['load_average'][0]:.2f} before, {os.getloadavg()[0]:.2f} after)\n")
    parts = ["matrix products", "optimizer update", "batch draw", "other kernels",
             "Python and calls"]
    print("| configuration | step | " + " | ".join(parts) + " | matrix-product floor |")
    print("|---|---|" + "---|" * len(parts) + "---|")
    for r in results:
        f = r["matmul_floor"]
        cells = [f"{r['breakdown'].get(p, 0.0):.2f}" for p in parts]
        xla = (f"; XLA {f['xla_ms']:.2f} ({f['xla_gflops']:.0f} GFLOP/s)"
               if "xla_ms" in f else "")
        print(f"| {r['config']}, {r['precision']} | {r['ms_per_step']:.2f} | "
              + " | ".join(cells) + f" | {f['ms']:.2f} ({f['products']} products, "
              f"{f['mflop']:.0f} MFLOP, {f['gflops']:.0f} GFLOP/s{xla}) |")
    for r in results if args.kernels else []:
        print(f"\n{r['config']}, {r['precision']}: each kernel of a step, in order, over "
              f"{r['steps']} steps (ms)\n\n| kernel | median | fastest |\n|---|---|---|")
        for name, median, fastest in r["kernels"] or []:
            print(f"| {name[:70]} | {median:.3f} | {fastest:.3f} |")
        if r["kernels"] is None:
            print("| (the steps did not all call the same kernels) | | |")


if __name__ == "__main__":
    raise SystemExit(main())
