"""A run folder is data: a config.json that names code to import (``"prior":
"payload:P"``) is refused in one line by every reader of run folders, and nothing is
imported, unless the caller opts in (``trust_imports=True``, ``--trust-imports``)."""

import json
import subprocess
import sys

import pytest

import pyro_vae as pv
from pyro_vae.runs import TrainConfig, train_run

from conftest import REPO

PAYLOAD = """import pathlib
pathlib.Path(__file__).with_name("MARK").write_text("the payload ran")
from pyro_vae.priors import StandardNormal as P
"""


@pytest.fixture
def poisoned(tmp_path):
    """A trained run in ``work/run`` whose config names ``payload:P``, with payload.py
    beside it in ``work`` (importable from there: ``python -m`` puts the working folder
    on sys.path)."""
    work = tmp_path / "work"
    run = work / "run"
    train_run(TrainConfig(dataset="digits", epochs=1, z_dim=3, hidden=(16,), out=str(run)),
              progress=False)
    (work / "payload.py").write_text(PAYLOAD)
    config = json.loads((run / "config.json").read_text())
    config["prior"] = "payload:P"
    (run / "config.json").write_text(json.dumps(config))
    return work, run


def _cli(work, *args):
    return subprocess.run([sys.executable, "-m", "pyro_vae", *args], cwd=work,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


REFUSED = "prior 'payload:P' would import module 'payload'; run folders may name registry"


def _contents(run):
    """Every file's bytes (run.lock: its presence; it holds its last holder's PID)."""
    return {p.name: p.name == "run.lock" or p.read_bytes() for p in run.iterdir()}


@pytest.mark.parametrize("args", [
    ["evaluate", "run", "--samples", "5", "--limit", "5", "--quiet"],
    ["train", "--resume", "run", "--epochs", "2", "--quiet"],
    ["train", "--init-from", "run", "--out", "other", "--epochs", "1", "--quiet"],
], ids=["evaluate", "resume", "init-from"])
def test_the_cli_never_imports_what_a_run_folder_names(poisoned, args):
    work, run = poisoned
    before = _contents(run)
    r = _cli(work, *args)
    assert r.returncode == 2, r.stderr
    assert REFUSED in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (work / "MARK").exists()
    assert _contents(run) == before
    assert not (work / "other").exists()


def test_trusting_the_folder_imports_it(poisoned):
    work, run = poisoned
    r = _cli(work, "evaluate", "run", "--samples", "5", "--limit", "5", "--quiet",
             "--trust-imports")
    assert r.returncode == 0, r.stderr
    assert (work / "MARK").read_text() == "the payload ran"  # the gate was real


def test_load_run_refuses_import_paths_unless_trusted(poisoned, monkeypatch):
    work, run = poisoned
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.delitem(sys.modules, "payload", raising=False)
    with pytest.raises(ValueError, match=REFUSED):
        pv.load_run(run)
    config = json.loads((run / "config.json").read_text())
    for name in ("sys:exit", "os:abort"):  # would end the process if called
        (run / "config.json").write_text(json.dumps(dict(config, prior=name)))
        with pytest.raises(ValueError, match=f"prior '{name}' would import module "
                                             f"'{name.split(':')[0]}'"):
            pv.load_run(run)
    assert not (work / "MARK").exists()
    (run / "config.json").write_text(json.dumps(config))
    vae, saved = pv.load_run(run, trust_imports=True)
    assert (work / "MARK").exists() and saved.prior == "payload:P"
    monkeypatch.delitem(sys.modules, "payload", raising=False)
