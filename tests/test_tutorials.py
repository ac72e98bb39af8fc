"""Every tutorial runs end to end, and prints what its text promises."""

import re
import subprocess
import sys

import pytest

from conftest import REPO

TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))


def run(path, *args):
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_all_tutorials_are_tested():
    assert [p.name for p in TUTORIALS] == ["01_vae_in_pyro.py", "02_your_own_parts.py",
                                           "03_priors_and_objectives.py",
                                           "04_swapping_guides.py"]


def test_01_vae_in_pyro(tmp_path):
    text = run(TUTORIALS[0], "--epochs", "5", "--out", str(tmp_path))
    # The hand-written mean-field ELBO matches Pyro's to the printed 4 decimals.
    line = next(l for l in text.splitlines() if l.startswith("TraceMeanField_ELBO loss"))
    pyro_loss, by_hand = float(line.split()[2]), float(line.split()[-1])
    assert pyro_loss == pytest.approx(by_hand, abs=1e-3)
    assert "scale 81.06 = 1297 / 16" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elbo.png", "reconstructions.png",
                                                          "samples.png"]


def test_02_your_own_parts(tmp_path):
    text = run(TUTORIALS[1], "--epochs", "3", "--out", str(tmp_path))
    assert "Bernoulli on gray data -> ValueError: likelihood 'bernoulli' needs x in" in text
    assert text.count("one-sample Monte Carlo estimate of the KL") == 1
    assert (tmp_path / "samples.png").exists()


def test_03_priors_and_objectives():
    text = run(TUTORIALS[2], "--epochs", "8")
    rows = {}
    for line in text.splitlines():
        m = re.match(r"(.+?)\s+test ELBO\s+(\S+)\s+recon\s+(\S+)\s+KL\s+(\S+)\s+"
                     r"IWAE\(K=50\)\s+(\S+)$", line)
        if m:
            rows[m.group(1).strip()] = [float(v) for v in m.groups()[1:]]
    assert set(rows) == {"normal prior", "VampPrior (K = 50)", "normal prior, beta = 4",
                         "normal prior, IWAE K=5"}
    for name, (elbo, recon, kl, iwae) in rows.items():
        assert kl > 0 and recon > elbo, name
        assert iwae > elbo, name  # the IWAE bound is tighter than the ELBO
    # beta = 4 buys a smaller KL with a worse reconstruction.
    assert rows["normal prior, beta = 4"][2] < rows["normal prior"][2]
    assert rows["normal prior, beta = 4"][1] < rows["normal prior"][1]
    assert "beta per epoch: [0.0, 2.0, 4.0, 4.0, 4.0, 4.0] ..." in text
    assert text.count("one-sample Monte Carlo estimate of the KL") == 1  # VampPrior, once


def test_04_swapping_guides():
    text = run(TUTORIALS[3], "--epochs", "10", "--guide-epochs", "10", "--samples", "300")
    rows = {}
    for line in text.splitlines():
        m = re.match(r"(diagonal|fullrank|iaf)\s+(\S+)\s+(\S+)\s+(\S+)$", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[1:]]
    assert set(rows) == {"diagonal", "fullrank", "iaf"}
    log_px = [r[1] for r in rows.values()]
    # One frozen model: its log p(x) does not depend on the guide (Monte Carlo spread).
    assert max(log_px) - min(log_px) < 0.5, rows
    for elbo, lpx, gap in rows.values():
        assert gap == pytest.approx(lpx - elbo, abs=2e-3) and gap > 0
