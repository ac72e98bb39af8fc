"""A run folder is data: a config.json that names code to import (``"prior":
"payload:P"``) is refused in one line by every reader of run folders, and nothing is
imported, unless the caller opts in (``trust_imports=True``, ``--trust-imports``). Every
other byte is untrusted too: a file that is a FIFO or a device, an oversized config.json,
part options and sizes in it, a data_dir that points elsewhere."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import pyro_vae as pv
from pyro_vae import datasets
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


# Every byte of a run folder is untrusted: reads are bounded, only regular files are read.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train_run(TrainConfig(dataset="digits", epochs=1, z_dim=3, hidden=(8,), out=str(out)),
              progress=False)
    return out


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _evaluate_cli(run, *args):
    """pyro-vae evaluate in a process of its own (a read that blocks would hang a test)."""
    return subprocess.run([sys.executable, "-m", "pyro_vae", "evaluate", str(run),
                           "--samples", "3", "--limit", "4", "--quiet", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["checkpoint.pt", "config.json"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(run, name):
    """A checkpoint that was a FIFO hung evaluate."""
    (run / name).unlink()
    os.mkfifo(run / name)
    r = _evaluate_cli(run)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"pyro-vae: error: {run / name}: a FIFO, not a regular file; "
                                f"a {name.split('.')[0] if name == 'checkpoint.pt' else name}"
                                f" must be a file")


def test_a_config_that_is_a_device_or_too_large_is_refused(run):
    """A config.json that was /dev/zero was read until memory ran out."""
    (run / "config.json").unlink()
    (run / "config.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="config.json: a character device, not a regular"):
        pv.load_run(run)
    (run / "config.json").unlink()
    (run / "config.json").write_text(" " * (1 << 20) + "{}")
    with pytest.raises(ValueError, match="config.json: more than 1048576 bytes"):
        pv.load_run(run)
    (run / "config.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match="config.json: not valid JSON \\(maximum recursion"):
        pv.load_run(run)


@pytest.mark.parametrize("options, message", [
    ({"prior": "vamp", "prior_options": {"init_mean": float("inf")}},
     "prior option init_mean must be finite, got inf"),
    ({"prior_options": {"z_dim": 3}}, "prior option z_dim is the model's own setting"),
    ({"guide_options": {"min_scale": -1}}, "guide option min_scale must be > 0, got -1"),
    ({"likelihood": "gaussian", "likelihood_options": {"scale": "abc"}},
     "likelihood option scale must be a number"),
    ({"z_dim": 10 ** 12}, "the model's weights need at least"),
    ({"seed": 2 ** 40}, "--seed must lie in 0 ... 2**32 - 1"),
], ids=["inf", "clash", "range", "kind", "size", "seed"])
def test_a_config_with_bad_part_options_or_sizes_is_one_line(run, options, message):
    """Checked when the folder is read, before any model is built: the options a run
    folder hands a part are the same input as those typed on the command line."""
    raw = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(raw, **options)))
    for read in (lambda: pv.load_run(run), lambda: pv.resume_run(run, {"epochs": 2},
                                                                 progress=False)):
        with pytest.raises(ValueError) as e:
            read()
        assert message in str(e.value) and "\n" not in str(e.value)


def test_evaluate_reads_data_from_data_dir_and_never_creates_the_runs(tmp_path,
                                                                      monkeypatch):
    """config.json's data_dir steered evaluate to create folders (and download) outside
    the run folder, and evaluate had no --data-dir to override it."""
    from test_bad_input import mnist_files

    mnist_files(tmp_path, monkeypatch)  # tmp/data/mnist: 12 training, 4 test images
    monkeypatch.setitem(datasets.SOURCES, "mnist", dict(
        datasets.SOURCES["mnist"], mirrors=[(tmp_path / "no-mirror").as_uri() + "/"]))
    config = TrainConfig(dataset="mnist", z_dim=3, hidden=(8,),
                         data_dir=str(tmp_path / "elsewhere" / "data"))
    pv.save_run(tmp_path / "run", pv.VAE(784, 3, (8,)), config)
    monkeypatch.delenv("PYRO_VAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # The run's data_dir does not exist: the default root instead (not found there).
    with pytest.raises(FileNotFoundError, match="cache/pyro_vae/mnist lacks"):
        pv.runs.evaluate_run(tmp_path / "run", samples=3, progress=False)
    results = pv.runs.evaluate_run(tmp_path / "run", samples=3, progress=False,
                                   data_dir=tmp_path / "data")
    assert results["num_points"] == 4
    assert not (tmp_path / "elsewhere").exists()
    assert pv.cli.main(["evaluate", str(tmp_path / "run"), "--samples", "3", "--quiet",
                        "--data-dir", str(tmp_path / "data")]) == 0
    assert not (tmp_path / "elsewhere").exists()
