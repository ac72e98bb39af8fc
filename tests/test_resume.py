"""Exact resume: SIGKILL at any point, ``pyro-vae train --resume``, bitwise the same run."""

import contextlib
import dataclasses
import json

import pytest
import torch

from pyro_vae import TrainConfig, VAE, fit, read_checkpoint, resume_run, train_run
from pyro_vae.datasets import load
from pyro_vae.runs import read_config, resume_config
from pyro_vae.hooks import Checkpointer
from pyro_vae.train import TrainingDiverged

from test_train import KeepStates

import kill_resume
from test_train import _FaultAtStep


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("reference") / "run"
    kill_resume.train_uninterrupted(out, data_root)
    return out


@pytest.mark.parametrize("kill_at, mode, resumed_from", [
    # Before step 10: the last checkpoint is the one after step 8 (epoch 2, 2 steps in).
    (10, "step", (2, 2)),
    # Half-way through writing the step-16 checkpoint: the step-12 one (the end of
    # epoch 2) is intact and the torn temporary file is ignored.
    (13, "write", (3, 0)),
])
def test_killed_run_resumes_bitwise(tmp_path, reference, data_root, kill_at, mode,
                                    resumed_from):
    out = tmp_path / "run"
    left = kill_resume.kill_and_resume(out, kill_at, mode, data_root)
    assert (left["position"]["epoch"], left["position"]["step"]) == resumed_from
    assert len(left["tmp_files"]) == (mode == "write")
    assert kill_resume.differences(reference, out) == []
    assert not list(out.glob("*.tmp"))  # the resumed run cleared the torn write


def test_a_killed_compiled_run_resumes_bitwise(tmp_path, data_root):
    """The same with ``--compile`` (the whole step, update and batch draw included, one
    compiled graph; the resumed process compiles again): killed before step 10, resumed
    from the checkpoint after step 8, bitwise the uninterrupted compiled run."""
    reference = tmp_path / "reference"
    kill_resume.train_uninterrupted(reference, data_root, ["--compile"])
    out = tmp_path / "run"
    left = kill_resume.kill_and_resume(out, 10, "step", data_root, ["--compile"])
    assert (left["position"]["epoch"], left["position"]["step"]) == (2, 2)
    assert kill_resume.differences(reference, out) == []


def _quick(tmp_path, name, **kw):
    return TrainConfig(**{**dict(dataset="digits", epochs=2, z_dim=4, hidden=(16,),
                                 out=str(tmp_path / name)), **kw})


def _final(out):
    state = read_checkpoint(out / "checkpoint.pt")
    metrics = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    return state, metrics


def test_resume_trains_on_exactly_as_a_longer_run_and_takes_a_new_lr(tmp_path):
    train_run(_quick(tmp_path, "short", epochs=2), progress=False)
    resume_run(tmp_path / "short", {"epochs": 3}, progress=False)
    train_run(_quick(tmp_path, "long", epochs=3), progress=False)
    (a, ma), (b, mb) = _final(tmp_path / "short"), _final(tmp_path / "long")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert ma == mb and len(ma) == 3
    assert json.loads((tmp_path / "short" / "config.json").read_text())["epochs"] == 3

    # A lower learning rate on resume replaces the saved one in the optimizer state.
    train_run(_quick(tmp_path, "slow", epochs=2), progress=False)
    resume_run(tmp_path / "slow", {"epochs": 3, "lr": 1e-4}, progress=False)
    slow = read_checkpoint(tmp_path / "slow" / "checkpoint.pt")
    assert [g["lr"] for g in slow["training"]["optimizer"]["state"]["param_groups"]] == [1e-4]
    assert not torch.equal(slow["model"]["decoder.0.weight"], b["model"]["decoder.0.weight"])


def test_same_seed_twice_is_bitwise_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_run(_quick(tmp_path, name, seed=seed, checkpoint_every=3), progress=False)
    (a, ma), (b, mb), (c, mc) = (_final(tmp_path / n) for n in "abc")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert ma == mb
    assert not any(torch.equal(a["model"][k], c["model"][k]) for k in a["model"]
                   if k.endswith("weight"))
    assert all(x["train_elbo"] != y["train_elbo"] for x, y in zip(ma, mc))


def test_a_nonfinite_step_leaves_a_checkpoint_of_the_state_before_it(tmp_path):
    """NaN loss injected at step 5 of epoch 2: the run stops naming that step, and the
    checkpoint on disk holds finite parameters equal to those before the step; resuming
    from it (the fault gone) retries that batch and trains on."""
    train, _, _ = load("digits")
    steps = -(-len(train) // 64)
    head = _FaultAtStep(64, at=steps + 5)
    vae = VAE(64, 4, (16,), likelihood=head)
    head.owner.append(vae)
    path = tmp_path / "checkpoint.pt"

    with pytest.raises(TrainingDiverged, match="at epoch 2, step 5;"):
        fit(vae, train, epochs=3, batch_size=64, progress=False,
            hooks=[Checkpointer(path, vae)])
    saved = read_checkpoint(path)
    assert saved["model"].keys() == head.before.keys()
    assert all(torch.equal(saved["model"][k], v) for k, v in head.before.items())
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    position = saved["training"]["position"]
    assert (position["epoch"], position["step"]) == (2, 4)

    head.at = -1  # the fault is gone
    vae.load_state_dict(saved["model"])
    history = fit(vae, train, epochs=3, batch_size=64, progress=False,
                  resume=saved["training"])
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_resume_state_for_other_data_is_refused(tmp_path):
    train, _, _ = load("digits")
    states, vae = [], VAE(64, 4, (16,))
    fit(vae, train, epochs=1, batch_size=64, progress=False, hooks=[KeepStates(states)])
    with pytest.raises(ValueError, match="saved training on 1297 points in batches of 64, "
                                         "not 1297 in batches of 32"):
        fit(vae, train, epochs=2, batch_size=32, progress=False, resume=states[-1])


def test_resume_config_keeps_the_runs_settings(tmp_path):
    train_run(_quick(tmp_path, "run", epochs=1), progress=False)
    saved = read_config(tmp_path / "run" / "config.json")
    # Options equal to the run's own are no change; --epochs is one that may change.
    got = resume_config(tmp_path / "run", {"epochs": 5, "z_dim": 4, "hidden": [16]})
    assert got == dataclasses.replace(saved, epochs=5)


@contextlib.contextmanager
def _sigint_handled_by(handler):
    """SIGINT's handler set to ``handler`` inside the block, and put back after it."""
    import signal
    before = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("compile", [False, True])
def test_sigint_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_bitwise(tmp_path,
                                                                              compile):
    """SIGINT during training (sent here by a hook after epoch 1) stops at the next step
    boundary with TrainingInterrupted, after a checkpoint of the state there; resumed from
    that checkpoint, the run ends bitwise as the uninterrupted one; eager, and with the
    whole step compiled."""
    import os
    import signal

    from pyro_vae.train import TrainingInterrupted

    train, valid, _ = load("digits")
    torch.manual_seed(0)
    reference = VAE(64, 4, (16,))
    history = fit(reference, train, valid, epochs=3, batch_size=64, progress=False,
                  compile=compile)
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,))
    path = tmp_path / "checkpoint.pt"
    sent = lambda record, history, model: record["epoch"] == 1 and os.kill(  # noqa: E731
        os.getpid(), signal.SIGINT)
    # Python's own handler, whatever the process was started with (a shell's background
    # job starts with SIGINT ignored, and fit leaves an ignored signal ignored).
    with _sigint_handled_by(signal.default_int_handler):
        with pytest.raises(TrainingInterrupted,
                           match="stopped by SIGINT after epoch 2, step 1;"):
            fit(vae, train, valid, epochs=3, batch_size=64, progress=False,
                compile=compile, hooks=[sent, Checkpointer(path, vae)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    saved = read_checkpoint(path)
    assert (saved["training"]["position"]["epoch"], saved["training"]["position"]["step"]) \
        == (2, 1)
    torch.manual_seed(1)
    resumed = VAE(64, 4, (16,))
    resumed.load_state_dict(saved["model"])
    again = fit(resumed, train, valid, epochs=3, batch_size=64, progress=False,
                resume=saved["training"], compile=compile)
    assert all(torch.equal(v, resumed.state_dict()[k])
               for k, v in reference.state_dict().items())
    assert [r["valid_elbo"] for r in again] == [r["valid_elbo"] for r in history]


def test_an_ignored_sigint_stays_ignored():
    """With SIGINT ignored (SIG_IGN, as in a shell script's background job), a SIGINT
    during training changes nothing: the run ends as the one without it, and SIGINT is
    still ignored after."""
    import os
    import signal

    train, valid, _ = load("digits")
    torch.manual_seed(0)
    reference = VAE(64, 4, (16,))
    history = fit(reference, train, valid, epochs=2, batch_size=64, progress=False)
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,))
    sent = lambda record, history, model: record["epoch"] == 1 and os.kill(  # noqa: E731
        os.getpid(), signal.SIGINT)
    with _sigint_handled_by(signal.SIG_IGN):
        again = fit(vae, train, valid, epochs=2, batch_size=64, progress=False,
                    hooks=[sent])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert [r["valid_elbo"] for r in again] == [r["valid_elbo"] for r in history]
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in reference.state_dict().items())


def _sigint_as_python_starts_it():
    """For a child process: SIGINT at its default, whatever this process has (a shell's
    background job starts with it ignored, and a child inherits that), so that the child
    Python installs its own handler as it does when started from a terminal."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_the_command_line_is_one_line_and_resumable(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "pyro_vae", "train", "--dataset",
                              "digits", "--epochs", "200", "--out", str(out), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_sigint_as_python_starts_it)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and child.poll() is None
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert err.strip().count("\n") == 0, err
    assert "pyro-vae: stopped by SIGINT after epoch" in err
    assert f"continue with: pyro-vae train --resume {out}" in err
    position = read_checkpoint(out / "checkpoint.pt")["training"]["position"]
    assert position["epoch"] >= 2 and position["step"] >= 1


# A child that signals itself: the first SIGINT at step 3, a second one while the first is
# handled (at the checkpoint it takes), a third while the interpreter shuts down.
_THREE_SIGINTS = """
import atexit, os, signal, sys, time
from pyro_vae import cli, train

calls, step, checkpoint = 0, train.Step.__call__, train.Trainer._checkpoint

def counted(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, *args, **kwargs)

def checkpointed(self, running=False):
    if running and self.signals:
        os.kill(os.getpid(), signal.SIGINT)
    return checkpoint(self, running)

def at_exit():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)

train.Step.__call__, train.Trainer._checkpoint = counted, checkpointed
atexit.register(at_exit)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_while_stopping_is_ignored_in_one_line(tmp_path):
    """A second Ctrl-C 50 ms after the first printed an 'Exception ignored in atexit
    callback ... KeyboardInterrupt' traceback. Each later signal is one line now, and the
    run still resumes bitwise."""
    import subprocess
    import sys

    args = ["train", "--dataset", "digits", "--epochs", "2", "--z-dim", "3", "--hidden", "8",
            "--quiet"]
    r = subprocess.run([sys.executable, "-c", _THREE_SIGINTS, *args, "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       preexec_fn=_sigint_as_python_starts_it)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines() == [
        "WARNING pyro_vae: SIGINT ignored: already stopping at the end of this step",
        "pyro-vae: stopped by SIGINT after epoch 1, step 3; the checkpoint holds the state "
        f"there; continue with: pyro-vae train --resume {tmp_path / 'run'}",
        "pyro-vae: SIGINT ignored: already stopping"]
    resume_run(tmp_path / "run", progress=False)
    train_run(TrainConfig(dataset="digits", epochs=2, z_dim=3, hidden=(8,),
                          out=str(tmp_path / "whole")), progress=False)
    (resumed, _), (whole, _) = _final(tmp_path / "run"), _final(tmp_path / "whole")
    assert all(torch.equal(v, whole["model"][k]) for k, v in resumed["model"].items())
