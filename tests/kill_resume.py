"""Kill a training run with SIGKILL at a chosen step, resume it, compare with a run that
was never interrupted.

As a script, repeats the check at random steps:

    python tests/kill_resume.py --trials 20 --data-dir ../shared/data [--compile]

Kill points: just before training step k (``step``), or halfway through writing the
first checkpoint due at or after step k (``write``: half the bytes are in the temporary
file when the process dies). The resumed run must end with the same parameters, optimizer
state and metrics (except wall-clock seconds), bitwise. ``--compile``: every run trains
with ``--compile`` (the whole step, update included, one compiled graph).
"""

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# MNIST with dynamic binarization (the data order and the binarization draws both come
# from the run's generator), a VampPrior (pseudo-inputs), every-4-steps checkpoints.
LIMIT, BATCH, EPOCHS = 600, 100, 3
STEPS = EPOCHS * (LIMIT // BATCH)
TRAIN_ARGS = ["--dataset", "mnist", "--limit", str(LIMIT), "--batch-size", str(BATCH),
              "--epochs", str(EPOCHS), "--z-dim", "4", "--hidden", "32", "--prior", "vamp",
              "--prior-option", "components=10", "--checkpoint-every", "4", "--quiet"]


def _child(out: str, kill_at: int, mode: str, data_dir: str, *extra: str) -> None:
    """Run ``pyro-vae train`` in this process and SIGKILL it at the chosen point."""
    from pyro_vae import cli, train

    calls, kill_at = 0, int(kill_at)
    step_call, save = train.Step.__call__, torch.save

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def step(*args, **kwargs):
        nonlocal calls
        calls += 1
        if mode == "step" and calls == kill_at:
            die()
        return step_call(*args, **kwargs)

    def half_save(obj, f):
        if mode == "write" and calls >= kill_at:
            buffer = io.BytesIO()
            save(obj, buffer)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            die()
        save(obj, f)

    train.Step.__call__, torch.save = step, half_save
    cli.main(["train", *TRAIN_ARGS, *extra, "--data-dir", data_dir, "--out", out])


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    if check and r.returncode != 0:
        raise RuntimeError(f"{args} exited {r.returncode}: {r.stderr[-2000:]}")
    return r


def train_uninterrupted(out: Path, data_dir, extra=()) -> None:
    """The reference run (``extra``: more ``pyro-vae train`` options, e.g. --compile)."""
    _cli("-m", "pyro_vae", "train", *TRAIN_ARGS, *extra, "--data-dir", str(data_dir),
         "--out", str(out))


def kill_and_resume(out: Path, kill_at: int, mode: str, data_dir, extra=()) -> dict:
    """Train into ``out`` until killed, then resume with ``--resume``; returns what the
    killed run left: its checkpoint's position and any temporary files."""
    r = _cli(__file__, "--child", str(out), str(kill_at), mode, str(data_dir), *extra,
             check=False)
    if r.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run was not killed (exit {r.returncode}): {r.stderr[-2000:]}")
    left = {"tmp_files": sorted(p.name for p in out.iterdir() if p.suffix == ".tmp"),
            "position": torch.load(out / "checkpoint.pt", weights_only=True)
            ["training"]["position"]}
    _cli("-m", "pyro_vae", "train", "--resume", str(out), "--quiet")
    return left


def differences(a: Path, b: Path) -> list:
    """What differs between the final states of runs ``a`` and ``b`` (empty: bitwise
    equal parameters, optimizer state and metrics other than wall-clock times:
    ``seconds``, and ``compile_seconds``, which a resumed compiled run records again)."""
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    diff = [k for k in ca["model"] if not torch.equal(ca["model"][k], cb["model"][k])]
    oa, ob = ca["training"]["optimizer"], cb["training"]["optimizer"]
    if oa["parameters"] != ob["parameters"]:
        diff.append("optimizer parameters")
    for i, name in enumerate(oa["parameters"]):
        for key, value in oa["state"]["state"][i].items():
            if not torch.equal(value, ob["state"]["state"][i][key]):
                diff.append(f"optimizer {name} {key}")

    def metrics(run):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    if metrics(a) != metrics(b):
        diff.append("metrics.jsonl")
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="picks the kill points")
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA"))
    parser.add_argument("--compile", action="store_true", help="train with --compile")
    args = parser.parse_args()
    extra = ["--compile"] if args.compile else []
    if not args.data_dir:
        parser.error("give --data-dir (a folder holding mnist/) or set PYRO_VAE_DATA")
    picker = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference"
        train_uninterrupted(reference, args.data_dir, extra)
        for trial in range(args.trials):
            kill_at, mode = picker.randint(1, STEPS), picker.choice(["step", "write"])
            out = Path(tmp) / f"trial{trial}"
            left = kill_and_resume(out, kill_at, mode, args.data_dir, extra)
            diff = differences(reference, out)
            failures += bool(diff)
            p = left["position"]
            print(f"trial {trial + 1:2}: killed {'before step' if mode == 'step' else 'writing the checkpoint after step'} "
                  f"{kill_at:2} of {STEPS}; resumed from epoch {p['epoch']} step {p['step']}"
                  f"{' (temporary file left: ' + left['tmp_files'][0] + ')' if left['tmp_files'] else ''}: "
                  f"{'bitwise equal' if not diff else 'DIFFERS: ' + ', '.join(diff[:5])}")
    print(f"{args.trials - failures} of {args.trials} resumed runs bitwise equal to the "
          f"uninterrupted run")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        sys.exit(main())
