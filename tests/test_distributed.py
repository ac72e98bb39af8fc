"""Training on several processes (torchrun, gloo on the CPU) against one process."""

import os
import subprocess
import sys

import torch

from kill_resume import differences

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "ddp_worker.py")
# 400 MNIST points with dynamic binarization, batches of 100 split 50 + 50: 12 steps.
COMMON = ["--dataset", "mnist", "--limit", "400", "--batch-size", "100", "--epochs", "3",
          "--z-dim", "3", "--hidden", "16", "--quiet"]


def _run(out, data_root, *extra, processes=1, kill_at=None, check=True):
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"]
    cmd += [WORKER] + (["--kill-at", str(kill_at)] if kill_at else [])
    cmd += ["--", "train", *COMMON, "--data-dir", str(os.path.abspath(data_root)), "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stderr[-3000:]}")
    return r


def _model(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_two_processes_take_the_steps_of_one_with_the_same_global_batches(tmp_path,
                                                                          data_root):
    # No noise (a point-mass guide), a learned prior: every parameter's gradient is an
    # average of the two halves' and must match the whole batch's.
    # 405 points: the last batch of each epoch, 5 points, splits 3 + 2.
    extra = ["--guide", "__main__:DeltaEncoder", "--prior", "mog", "--prior-option", "components=3",
             "--limit", "405"]
    _run(tmp_path / "one", data_root, *extra)
    _run(tmp_path / "two", data_root, *extra, processes=2)
    one, two = _model(tmp_path / "one"), _model(tmp_path / "two")
    start = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert start["training"]["position"]["epoch"] == 4  # all 15 steps were taken
    assert set(one) == set(two)
    for name in one:
        # float32 sums in another order, through 12 Adam steps of lr 1e-3
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"largest difference: {moved:.3g}")


def test_two_process_run_killed_and_resumed_ends_bitwise_as_the_uninterrupted(tmp_path,
                                                                            data_root):
    # The Gaussian guide: each process draws its own noise, restored on resume.
    extra = ["--prior", "vamp", "--prior-option", "components=5", "--checkpoint-every", "5"]
    _run(tmp_path / "whole", data_root, *extra, processes=2)
    killed = _run(tmp_path / "cut", data_root, *extra, processes=2, kill_at=8, check=False)
    assert killed.returncode != 0
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["training"]
    assert (saved["position"]["epoch"], saved["position"]["step"]) == (2, 1)  # step 5
    assert len(saved["rng"]["ranks"]) == 2
    _run(tmp_path / "cut", data_root, "--resume", str(tmp_path / "cut"), "--quiet",
         processes=2)
    assert differences(tmp_path / "whole", tmp_path / "cut") == []
