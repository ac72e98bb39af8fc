"""Files a run writes behave like any other tool's: the user's umask, one line for a full
disk or a refused permission, the previous file intact; and in a run folder, whatever it
holds, no write goes through a link or lands outside it, and one writer at a time."""

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import pyro_vae as pv
from pyro_vae import VAE, plots, save_checkpoint
from pyro_vae.checkpoints import atomic_write
import pyro_vae.checkpoints as checkpoints
from pyro_vae.runs import RunFolder


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.pt", VAE(4, 2, (3,)))
        atomic_write(tmp_path / "a.json", lambda f: f.write("{}"), binary=False)
    finally:
        os.umask(old)
    for name in ("c.pt", "a.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def _failing_save(error):
    def save(obj, f):
        f.write(b"half")
        raise error
    return save


@pytest.mark.parametrize("error, free, message", [
    (OSError(errno.ENOSPC, "No space left on device"), 10 ** 9, "the disk is full"),
    # torch.save reports a full disk as this RuntimeError; the free space tells.
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"), 0,
     "the disk is full"),
    (OSError(errno.EACCES, "Permission denied"), 10 ** 9, "permission denied"),
], ids=["ENOSPC", "torch-disk-full", "EACCES"])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, error,
                                                          free, message):
    path = tmp_path / "c.pt"
    save_checkpoint(path, VAE(4, 2, (3,)))
    good = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save(error))
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda p: type("U", (), {"free": free})())
    with pytest.raises(OSError) as e:
        save_checkpoint(path, VAE(4, 2, (3,)))
    assert str(e.value).startswith(f"{path}: not written, {message}")
    assert "\n" not in str(e.value)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["c.pt"]


# Files the package writes in a run folder: never through a link, never elsewhere.


def _train(out, **kw):
    return pv.train_run(pv.TrainConfig(**dict(dict(dataset="digits", epochs=1, z_dim=3,
                                                   hidden=(8,), out=str(out)), **kw)),
                        progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    _train(out)
    return out


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _evaluate(run, **kw):
    return pv.runs.evaluate_run(run, samples=3, limit=4, progress=False, **kw)


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(run, tmp_path):
    """evaluate truncated the link's target and wrote its PID there."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (run / "run.lock").unlink()
    (run / "run.lock").symlink_to(victim)
    with pytest.raises(OSError) as e:
        _evaluate(run)
    assert str(e.value) == (f"{run / 'run.lock'}: a symbolic link; files in a run folder are "
                            f"written in place only, remove the link")
    assert victim.read_text() == "keep" and not (run / "eval.json").exists()


@pytest.mark.parametrize("name", ["elbo_surgery.png", "eval.json"])
def test_evaluate_replaces_a_link_in_the_folder_and_writes_nothing_through_it(run, tmp_path,
                                                                            name):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (run / name).symlink_to(victim)
    _evaluate(run)
    assert victim.read_text() == "keep"
    assert not (run / name).is_symlink() and (run / name).stat().st_size > 0


def test_overwrite_removes_dangling_links_and_creates_nothing_outside(run, tmp_path):
    """A dangling link named like a figure was not removed (it did not 'exist'), and
    the figure was written where it pointed: outside the run folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("samples.png", "metrics.jsonl", "summary.json"):
        (run / name).unlink()
        (run / name).symlink_to(outside / name)
    _train(run, overwrite=True)
    assert list(outside.iterdir()) == []
    assert not any(p.is_symlink() for p in run.iterdir())


def test_metrics_are_never_appended_through_a_link_or_a_hard_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    writer = pv.MetricsWriter(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError, match="metrics.jsonl: a symbolic link"):
        writer.on_epoch_end({"epoch": 1}, [], None)
    (tmp_path / "metrics.jsonl").unlink()
    os.link(victim, tmp_path / "metrics.jsonl")
    with pytest.raises(OSError, match="metrics.jsonl: has 2 names"):
        writer.on_epoch_end({"epoch": 1}, [], None)
    assert victim.read_text() == "keep\n"


def test_a_run_folder_that_is_a_link_is_resolved_once_and_said(tmp_path, caplog):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with caplog.at_level("INFO", logger="pyro_vae"):
        _train(tmp_path / "link")
    assert f"run folder {tmp_path / 'link'} is a symbolic link: writing in {real}" in caplog.text
    assert (real / "checkpoint.pt").is_file()


def test_save_run_refuses_an_empty_folder_name(tmp_path, monkeypatch):
    """pv.save_run("", ..., overwrite=True) cleared the working folder's files named like
    run files."""
    monkeypatch.chdir(tmp_path)
    for name in ("config.json", "metrics.jsonl", "samples.png"):
        Path(name).write_text("mine")
    config = pv.TrainConfig(z_dim=3, hidden=(8,))
    with pytest.raises(ValueError, match="run_dir must name the run folder, got ''"):
        pv.save_run("", pv.VAE(64, 3, (8,)), config, overwrite=True)
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["mine"] * 3


def test_save_run_takes_the_lock_and_writes_what_load_run_reads(tmp_path):
    config = pv.TrainConfig(z_dim=3, hidden=(8,), early_stopping=2)
    vae = pv.VAE(64, 3, (8,))
    with RunFolder(tmp_path / "run").lock():
        with pytest.raises(RuntimeError, match="another process .* is writing this run"):
            pv.save_run(tmp_path / "run", vae, config)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]
    pv.save_run(tmp_path / "run", vae, config)  # early stopping: load_run reads best.pt
    loaded, _ = pv.load_run(tmp_path / "run")
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_evaluate_holds_the_lock_until_its_results_are_written(run, monkeypatch):
    """An evaluate that started before a train --overwrite of the same folder wrote the
    old model's eval.json into the new run: the folder is now held throughout."""
    from pyro_vae import runs

    tried = []

    def overwrite_meanwhile(*args, **kwargs):
        with pytest.raises(RuntimeError, match="is writing this run folder"):
            _train(run, overwrite=True)
        tried.append(True)
        return log_likelihood(*args, **kwargs)

    log_likelihood = runs.log_likelihood
    monkeypatch.setattr(runs, "log_likelihood", overwrite_meanwhile)
    _evaluate(run)
    assert tried == [True]


def test_a_full_disk_while_writing_a_figure_names_the_file(tmp_path, monkeypatch):
    import matplotlib.figure

    def full(self, f, **kwargs):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "elbo.png").write_bytes(b"old")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(OSError) as e:
        plots.plot_elbo([{"epoch": 1, "train_elbo": -1.0, "valid_elbo": None}],
                        tmp_path / "elbo.png")
    assert str(e.value).startswith(f"{tmp_path / 'elbo.png'}: not written, the disk is full")
    assert os.listdir(tmp_path) == ["elbo.png"]
    assert (tmp_path / "elbo.png").read_bytes() == b"old"
