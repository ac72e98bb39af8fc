"""Files a run writes behave like any other tool's: the user's umask, one line for a full
disk or a refused permission, the previous file intact."""

import errno
import os
import stat

import pytest
import torch

from pyro_vae import VAE, save_checkpoint
from pyro_vae.checkpoints import atomic_write
import pyro_vae.checkpoints as checkpoints


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
