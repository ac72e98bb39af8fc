"""Reproduce Table 2 of Tomczak & Welling (2018), "VAE with a VampPrior": MNIST, Caltech
101 Silhouettes and Frey Faces.

Four configurations, each a run folder trained by the package's own ``train_run`` /
``resume_run`` with the paper's protocol: the gated networks (300-300 hidden units,
z = 40; z1 = z2 = 40 for the HVAE), K = 500 pseudo-inputs, Adam lr 5e-4, batches of 100,
KL warm-up over 100 epochs, up to 2000 epochs with early stopping after 50 epochs without
a better validation ELBO, and the best-validation model evaluated by importance sampling
with 5000 samples on the whole test set.

    # train every configuration for (at most) 20 more epochs, resuming where each stopped
    python benchmarks/reproduce_vampprior.py train --data-dir path/to/data --epochs 20
    # evaluate every run folder and print the table
    python benchmarks/reproduce_vampprior.py evaluate --data-dir path/to/data

``--dataset binarized-mnist`` (statically binarized), ``mnist`` (dynamically
binarized), ``caltech101`` (Caltech 101 Silhouettes: a seeded split of the papers' sizes,
not their split file) or ``frey-faces`` (the discretized logistic likelihood on 8-bit
gray faces; the table adds bits per dimension). ``--runs`` is the root of the run folders
(``ROOT/DATASET/CONFIG``); run it again to go on training in pieces: each piece resumes
exactly from the run's checkpoint. ``--warmup-epochs`` and ``--max-epochs`` change the
protocol (a capped run with a shorter warm-up is a different protocol: say so).

``evaluate`` writes each run's ``eval.json`` (``pyro-vae evaluate``'s), the table, and
``ROOT/DATASET/valid_curves.png``: the validation ELBO of every configuration against
epoch, to see whether a capped run was still improving. The table's "valid gain" column
says the same in one number: the best validation ELBO of the last 10 epochs minus the
best before them (positive: still improving when it stopped).
"""

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from pyro_vae.plots import plt  # pyplot with the file-only (Agg) backend
from pyro_vae.config import TrainConfig, resolve_device
from pyro_vae.runs import RunFolder, evaluate_run, read_config, resume_run, train_run
from pyro_vae.hooks import best_epoch

CONFIGS = {  # name: (model, prior)
    "vae-standard": ("vae", "normal"),
    "vae-vampprior": ("vae", "vamp"),
    "hvae-standard": ("hvae", "normal"),
    "hvae-vampprior": ("hvae", "vamp"),
}
# The paper's Table 2 figures (test log-likelihood, nats), where read from the paper.
PAPER = {"binarized-mnist": {"vae-standard": -88.56, "vae-vampprior": -85.57,
                             "hvae-standard": -86.05, "hvae-vampprior": -83.19}}
# What differs by data set, as in the paper's code (utils/load_data.py): the likelihood
# (binary data: Bernoulli; 8-bit gray Frey Faces: the discretized logistic) and the
# pseudo-inputs' initialization N(mean, std) (0.05, 0.01 is the VampPrior's default).
DATASETS = {
    "binarized-mnist": ("bernoulli", {}),
    "mnist": ("bernoulli", {}),
    "caltech101": ("bernoulli", {}),
    "frey-faces": ("discretized_logistic", {"init_mean": 0.2, "init_std": 0.05}),
}


def protocol(name: str, args) -> TrainConfig:
    model, prior = CONFIGS[name]
    likelihood, pseudo = DATASETS[args.dataset]
    return TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, out=str(run_dir(name, args)),
        model=model, arch="gated", z_dim=40, hidden=(300, 300), prior=prior,
        prior_options={"components": 500, **pseudo} if prior == "vamp" else {},
        likelihood=likelihood, epochs=args.max_epochs, batch_size=100, lr=5e-4,
        loss="meanfield",  # the protocol's ELBO (what "auto" chooses here, pinned)
        warmup_epochs=args.warmup_epochs, early_stopping=args.patience, seed=args.seed,
        device=args.device, download=False, limit=args.train_limit)


def run_dir(name: str, args) -> Path:
    return Path(args.runs) / args.dataset / name


def epochs_done(folder: Path) -> int:
    if not (folder / "checkpoint.pt").exists():
        return 0
    return RunFolder(folder).training_state()[1].epochs_done


def train(args) -> None:
    fixed = ("warmup_epochs", "early_stopping", "lr", "batch_size", "model", "prior",
             "dataset", "limit", "likelihood")
    for name in args.configs:
        train_piece(run_dir(name, args), protocol(name, args), fixed, args, name)


def train_piece(folder: Path, config: TrainConfig, fixed, args, name: str) -> None:
    """Train the run in ``folder`` for at most ``args.epochs`` more epochs (up to
    ``args.max_epochs``): from the start, or resumed exactly from its checkpoint, refusing
    a change of the ``fixed`` settings."""
    done = epochs_done(folder)
    target = min(done + args.epochs, args.max_epochs)
    start = time.perf_counter()
    if done == 0:
        train_run(dataclasses.replace(config, epochs=target, overwrite=True),
                  progress=not args.quiet)
    else:
        saved = read_config(folder / "config.json")
        for field in fixed:
            if getattr(saved, field) != getattr(config, field):
                option = "train-limit" if field == "limit" else field.replace("_", "-")
                raise SystemExit(f"{folder}: --{option} is "
                                 f"{getattr(saved, field)} there; it cannot change")
        try:
            resume_run(folder, {"epochs": target, "device": args.device,
                                "data_dir": args.data_dir}, progress=not args.quiet)
        except ValueError as e:  # finished, or stopped early
            print(f"{name}: {e}")
            return
    print(f"{name}: epochs {done} -> {epochs_done(folder)} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)


def machine(device: str) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, CPU only"


def valid_gain(history, last: int = 10):
    """Best validation ELBO of the last ``last`` epochs minus the best before them (None
    for a run of ``last`` epochs or fewer)."""
    valid = [r["valid_elbo"] for r in history]
    if len(valid) <= last:
        return None
    return max(valid[-last:]) - max(valid[:-last])


def plot_curves(histories, path: Path, title: str) -> None:
    """Validation ELBO against epoch, one line per configuration; the y-axis leaves out
    the first quarter of the epochs (warm-up) so that the end of the curves is visible."""
    fig, ax = plt.subplots(figsize=(6, 4))
    low = []
    for name, history in histories.items():
        epochs = [r["epoch"] for r in history]
        valid = [r["valid_elbo"] for r in history]
        ax.plot(epochs, valid, label=name)
        low += valid[len(valid) // 4:]
    if low:
        ax.set_ylim(min(low) - 1, max(low) + 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO per data point (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def evaluate(args) -> None:
    rows, histories = [], {}
    for name in args.configs:
        folder = run_dir(name, args)
        if not (folder / "checkpoint.pt").exists():
            print(f"{name}: no run in {folder}")
            continue
        history = [json.loads(line) for line in
                   (folder / "metrics.jsonl").read_text().splitlines()]
        histories[name] = history
        result = evaluate_run(folder, samples=args.samples, limit=args.limit,
                              device=args.device, progress=not args.quiet)
        seconds = sorted(r["seconds"] for r in history)[len(history) // 2]
        rows.append((name, len(history), best_epoch(history), result,
                     PAPER.get(args.dataset, {}).get(name), seconds, valid_gain(history)))
    if histories:
        figure = Path(args.runs) / args.dataset / "valid_curves.png"
        plot_curves(histories, figure, f"{args.dataset}: validation ELBO")
        print(f"validation curves: {figure}")
    print(f"\n{args.dataset}, {args.samples} importance samples, "
          f"{rows[0][3]['num_points'] if rows else 0} test points, "
          f"machine: {machine(args.device)}")
    print("| configuration | epochs trained (best) | test log-likelihood | bits/dim | "
          "paper | test ELBO | valid gain, last 10 epochs | s/epoch |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, epochs, best, r, paper, seconds, gain in rows:
        bits = r.get("log_likelihood_bits_per_dim")
        print(f"| {name} | {epochs} ({best}) | {r['log_likelihood']:.2f} ± "
              f"{r['log_likelihood_stderr']:.2f} | "
              f"{'n/a' if bits is None else f'{bits:.3f}'} | "
              f"{'not read' if paper is None else f'{paper:.2f}'} | {r['test_elbo']:.2f} | "
              f"{'n/a' if gain is None else f'{gain:+.2f}'} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("train", "evaluate"))
    parser.add_argument("--data-dir")
    parser.add_argument("--dataset", default="binarized-mnist", choices=list(DATASETS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--runs", default="runs/reproduce", help="root of the run folders")
    parser.add_argument("--epochs", type=int, default=20,
                        help="train: at most this many more epochs per configuration")
    parser.add_argument("--max-epochs", type=int, default=2000)
    parser.add_argument("--train-limit", type=int,
                        help="train on the first N training points only (a quick check)")
    parser.add_argument("--warmup-epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=50, help="early stopping")
    parser.add_argument("--samples", type=int, default=5000, help="evaluate: S")
    parser.add_argument("--limit", type=int, help="evaluate: the first N test points")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    (train if args.action == "train" else evaluate)(args)


if __name__ == "__main__":
    main()
