"""Every tutorial runs with --smoke on MNIST, writes its figures and prints what its text
promises (the numbers of a one-epoch run on 1 000 points mean little; the checks are on
what holds at any training length)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO

TUTORIALS = {p.name: p for p in sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))}

FIGURES = {
    "01_vae.py": ["samples.png", "reconstructions.png", "elbo.png", "latent_2d.png",
                  "manifold_2d.png"],
    "02_closed_form_kl.py": ["gradient_variance.png", "training_curves.png"],
    "03_beta_vae.py": ["rate_distortion.png", "kl_per_dim.png", "traversals_beta1.png",
                       "traversals_beta4.png"],
    "04_vampprior.py": ["pseudo_inputs.png", "samples_normal.png", "samples_mog.png",
                        "samples_vamp.png"],
    "05_elbo_surgery.py": ["elbo_surgery.png"],
    "06_custom_model.py": ["cvae_samples.png", "style_transfer.png"],
    "07_swapping_guides.py": ["gaps.png"],
    "08_hierarchical_vampprior.py": ["samples_hvae.png", "samples_vae.png",
                                     "pseudo_inputs.png"],
    "09_scaling_up.py": ["processes.png"],
}


def run(name, out, data_root):
    r = subprocess.run([sys.executable, str(TUTORIALS[name]), "--smoke", "--data-dir",
                        str(data_root.resolve()), "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    missing = [f for f in FIGURES[name]
               if not (out / f).is_file() or (out / f).stat().st_size == 0]
    assert not missing, f"{name} did not write {missing}"
    return r.stdout + r.stderr


def test_every_tutorial_is_tested_and_listed():
    assert sorted(TUTORIALS) == sorted(FIGURES)
    listing = (REPO / "tutorials" / "README.md").read_text()
    assert all(name in listing for name in TUTORIALS)


@pytest.mark.slow
def test_01_vae(tmp_path, data_root):
    text = run("01_vae.py", tmp_path, data_root)
    line = next(l for l in text.splitlines() if l.startswith("TraceMeanField_ELBO loss"))
    pyro_loss, by_hand = float(line.split()[2]), float(line.split()[-1])
    assert pyro_loss == pytest.approx(by_hand, rel=1e-5)
    assert "scale 62.50 = 1000 / 16" in text


@pytest.mark.slow
def test_02_closed_form_kl(tmp_path, data_root):
    text = run("02_closed_form_kl.py", tmp_path, data_root)
    rows = dict(re.findall(r"^(encoder|decoder)\s+\S+\s+\S+\s+(\S+)", text, re.M))
    assert float(rows["encoder"]) > 1  # the closed-form KL's gradient varies less
    assert "identical draw by draw" in text  # the decoder's gradient is the same


@pytest.mark.slow
def test_03_beta_vae(tmp_path, data_root):
    text = run("03_beta_vae.py", tmp_path, data_root)
    rows = {float(m[0]): [float(v) for v in m[1:]] for m in re.findall(
        r"^\s*(\d+\.\d)\s+(\S+)\s+(\S+)\s+(\S+)\s+\d+ of 10$", text, re.M)}
    assert set(rows) == {1.0, 4.0}
    for distortion, rate, elbo in rows.values():
        assert elbo == pytest.approx(-(distortion + rate), abs=0.02)  # -ELBO = D + R
        assert rate > 0


@pytest.mark.slow
def test_04_and_05_priors_and_elbo_surgery(tmp_path, data_root):
    text = run("04_vampprior.py", tmp_path / "04", data_root)
    assert {"normal.pt", "mog.pt", "vamp.pt"} <= {p.name for p in (tmp_path / "04").iterdir()}
    assert len(re.findall(r"^(standard normal|mixture of Gaussians|VampPrior)\s+-\d+\.\d+",
                          text, re.M)) == 3
    text = run("05_elbo_surgery.py", tmp_path / "05", data_root)
    assert text.count("valid ELBO") == 3  # no --models here: it trained the three itself
    log_n = float(re.search(r"log N = (\S+)\):", text).group(1))
    rows = re.findall(r"^(?:standard normal|mixture of Gaussians|VampPrior)"
                      r"((?:\s+-?\d+\.\d+){5})$", text, re.M)
    assert len(rows) == 3
    for values in rows:
        recon, info, marginal, avg_kl, elbo = map(float, values.split())
        assert 0 <= info <= log_n + 1e-6 and marginal >= 0
        assert avg_kl == pytest.approx(info + marginal, abs=0.02)
        assert elbo == pytest.approx(recon - avg_kl, abs=0.02)


@pytest.mark.slow
def test_06_custom_model(tmp_path, data_root):
    text = run("06_custom_model.py", tmp_path, data_root)
    assert "no closed-form KL(Independent(Normal) || Independent(StudentT))" in text
    assert "model graph" in text  # drawn, or skipped with the reason


@pytest.mark.slow
def test_07_swapping_guides(tmp_path, data_root):
    text = run("07_swapping_guides.py", tmp_path, data_root)
    assert [m for m in re.findall(r"^(diagonal|fullrank|iaf)\s", text, re.M)] == [
        "diagonal", "fullrank", "iaf"]


@pytest.mark.slow
def test_08_hierarchical_vampprior(tmp_path, data_root):
    text = run("08_hierarchical_vampprior.py", tmp_path, data_root)
    assert re.search(r"^two layers \(HVAE\)\s+-\d+\.\d+", text, re.M)


@pytest.mark.slow
def test_09_scaling_up(tmp_path, data_root):
    text = run("09_scaling_up.py", tmp_path, data_root)
    assert "2 processes: valid ELBO" in text
    assert (tmp_path / "2_processes" / "checkpoint.pt").exists()
