"""Tutorial 9: training on a GPU and on several processes
======================================================

Training on a GPU, and on several processes with ``torchrun``.

Run it::

    python tutorials/09_scaling_up.py --data-dir path/to/data [--device cuda]
        [--epochs 5] [--processes 2] [--limit 10000]

The ideas
---------
On a GPU (``--device cuda``; ``auto`` picks one when present) ``pv.fit`` keeps the whole
data set in GPU memory, cuts and binarizes the batches there, and keeps the loss and the
finite check of each step on the device, reading them every ``check_every`` steps
(50 by default on a GPU, every step on the CPU): the package's part of a step never
waits for the GPU. (Pyro's ELBOs themselves read the loss once or twice per step.)

On several processes, ``torchrun`` starts one copy of the command per process::

    torchrun --standalone --nproc_per_node 4 -m pyro_vae train --dataset mnist --out runs/ddp

Every process draws the same global batch of ``--batch-size`` points and trains on its
share of it under ``torch.nn.parallel.DistributedDataParallel``, which averages the
gradients: the run is that of one process with the same batches, and process 0 alone
writes the run folder. On several machines it is the same command with torchrun's
``--nnodes``, ``--node_rank`` and ``--master_addr`` (see the user guide's page on GPUs
and several processes, ``docs/guide/scaling.md``).

What to look at
---------------
- Seconds per epoch of ``fit`` on the chosen device (and on CUDA too, if there is one).
- The validation ELBO of a one-process and a ``--processes``-process run of the same
  training, side by side (``processes.png``): the curves agree up to the Monte Carlo
  noise of training (each process draws its own noise). Seconds per epoch of both:
  several processes pay off when each has its own cores or GPU; on a small CPU they
  share the same cores and the gradient averaging only adds work.
"""

import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import torch

import pyro_vae as pv
from _common import mnist, options, save_figure

args = options(__doc__, "tutorial09", epochs=5, extra=[
    ("--processes", dict(type=int, default=2, help="processes of the torchrun run")),
    ("--limit", dict(type=int, default=10000, help="training points of the two runs"))])
if args.smoke:
    args.limit = 400
    print("--smoke: one epoch on 1 000 (and 400) points: the timings and ELBOs below "
          "are not meaningful")

# %%
# 1. One process, on the device
# -----------------------------
train, valid, test = mnist(args)
devices = [args.device]
if torch.cuda.is_available() and args.device.type == "cpu":
    devices.append(torch.device("cuda"))
for device in devices:
    torch.manual_seed(0)
    vae = pv.VAE(784, 20, (400,))
    history = pv.fit(vae, train, valid, epochs=args.epochs, device=device, progress=False)
    per_epoch = sorted(r["seconds"] for r in history)[len(history) // 2]
    print(f"fit on {device}: {per_epoch:.2f} s per epoch of {len(train)} points (median), "
          f"valid ELBO {history[-1]['valid_elbo']:.2f}")

# %%
# 2. One process and several
# --------------------------
# The same training by the command line, on one process and on several.
common = ["train", "--dataset", "mnist", "--limit", str(args.limit), "--epochs",
          str(args.epochs), "--z-dim", "20", "--device", "cpu", "--overwrite", "--quiet"]
if args.data_dir:
    common += ["--data-dir", args.data_dir]
runs = {1: args.out / "one_process", args.processes: args.out / f"{args.processes}_processes"}
for n, folder in runs.items():
    launcher = [sys.executable, "-m", "pyro_vae"] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={n}", "-m", "pyro_vae"]
    command = launcher + common + ["--out", str(folder)]
    print("\n$ " + " ".join(command[1:]))
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        sys.exit(f"the run failed:\n{done.stderr[-2000:]}")

fig, ax = plt.subplots(figsize=(5, 3.5))
for n, folder in runs.items():
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    seconds = sorted(r["seconds"] for r in records)[len(records) // 2]
    print(f"{n} process{'es' if n > 1 else ''}: valid ELBO {records[-1]['valid_elbo']:.2f}, "
          f"{seconds:.2f} s per epoch (median)")
    ax.plot([r["epoch"] for r in records], [r["valid_elbo"] for r in records], marker="o",
            label=f"{n} process{'es' if n > 1 else ''}")
ax.set_xlabel("epoch")
ax.set_ylabel("validation ELBO (nats per image)")
ax.set_title(f"the same training on 1 and {args.processes} processes")
ax.grid(alpha=0.3)
ax.legend()
save_figure(fig, args.out / "processes.png")
print(f"figure in {args.out}/")
