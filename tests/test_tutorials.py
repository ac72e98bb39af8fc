"""Every tutorial runs with --smoke on MNIST (tutorial 12 on Frey Faces), writes its
figures and prints what its text promises (the numbers of a one-epoch run on 1 000 points
mean little; the checks are on what holds at any training length). Each runs in its own
temporary folder: nothing in the working folder is read or written."""

import math
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
    "10_your_own_model.py": ["samples.png", "samples_per_component.png",
                             "test_images_per_component.png"],
    "11_semi_supervised.py": ["analogies.png", "confusion.png", "error.png"],
    "12_continuous_data.py": ["reconstructions.png", "samples.png", "sigma_start.png"],
}

SMOKE_NOTE = "--smoke: one epoch on 1 000 points: the numbers below are not meaningful"
NUMBER = r"-?\d+\.\d+"


def run(name, tmp_path, data_root, *options, out=None):
    """Run tutorial ``name`` with --smoke (and ``options``) in the folder ``tmp_path``,
    its figures going to ``out`` (default ``tmp_path``); its stdout and stderr."""
    out = tmp_path if out is None else out
    r = subprocess.run([sys.executable, str(TUTORIALS[name]), "--smoke", "--data-dir",
                        str(data_root.resolve()), "--device", "cpu", "--out", str(out),
                        *options],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
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
    models = tmp_path / "04"
    text = run("04_vampprior.py", tmp_path, data_root, out=models)
    assert SMOKE_NOTE in text  # its ranking of the priors is arbitrary after one epoch
    assert {"normal.pt", "mog.pt", "vamp.pt"} <= {p.name for p in models.iterdir()}
    assert len(re.findall(r"^(standard normal|mixture of Gaussians|VampPrior)\s+-\d+\.\d+",
                          text, re.M)) == 3
    # Tutorial 5 on tutorial 4's models, named explicitly: nothing else is read.
    text = run("05_elbo_surgery.py", tmp_path, data_root, "--models", str(models),
               out=tmp_path / "05")
    loaded = re.findall(r"^(?:standard normal|mixture of Gaussians|VampPrior): loaded (.+)$",
                        text, re.M)
    assert sorted(loaded) == sorted(str(models / f) for f in ("normal.pt", "mog.pt",
                                                              "vamp.pt"))
    assert "valid ELBO" not in text  # loaded, not trained
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
    valid, test = map(float, re.search(
        rf"^conditional VAE, Student-t prior: valid ELBO ({NUMBER}) after 1 epochs; "
        rf"test ELBO ({NUMBER})$", text, re.M).groups())
    assert all(math.isfinite(v) and v < 0 for v in (valid, test))
    # The graph is drawn (and the file is there), or skipped with graphviz named as why.
    drawn = re.findall(r"^model graph: (.+)$", text, re.M)
    skipped = re.findall(r"^model graph skipped: pyro\.render_model needs graphviz "
                         r"\(\w+: .*\)$", text, re.M)
    assert len(drawn) + len(skipped) == 1, text
    if drawn:
        assert drawn[0] == str(tmp_path / "model.png") and (tmp_path / "model.png").is_file()


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


@pytest.mark.slow
def test_10_your_own_model(tmp_path, data_root):
    text = run("10_your_own_model.py", tmp_path, data_root)
    assert (tmp_path / "checkpoint.pt").is_file()
    # Stopped after epoch 1 of 2 and resumed: bitwise the uninterrupted run on the CPU.
    resumed = re.search(rf"^stopped after epoch 1 of 2, .* weights (\S+); valid ELBO "
                        rf"({NUMBER}) and ({NUMBER})$", text, re.M)
    assert resumed, text
    assert float(resumed.group(1)) == 0.0
    assert resumed.group(2) == resumed.group(3)
    # The ELBO (c summed out) <= log p(x) (c summed out: the IWAE bound with S = 50 against
    # S = 1 on the same proposal), and summing c out beats drawing it (Rao-Blackwell): in
    # expectation; 1 nat covers the Monte Carlo noise of 100 points.
    elbo = float(re.search(rf"^  ELBO, c summed out\s+({NUMBER})$", text, re.M).group(1))
    drawn, drawn_se = map(float, re.search(
        rf"^  log p\(x\), c drawn from p\(c\)\s+({NUMBER}) \+- (\d+\.\d+)", text,
        re.M).groups())
    summed, summed_se = map(float, re.search(
        rf"^  log p\(x\), c summed out\s+({NUMBER}) \+- (\d+\.\d+)", text,
        re.M).groups())
    assert all(math.isfinite(v) and v < 0 for v in (elbo, drawn, summed))
    assert drawn_se > 0 and summed_se > 0
    assert summed >= elbo - 1.0
    assert summed >= drawn - 1.0
    # q(c | x): six rows of K = 10 probabilities (rounded to 0.01) that sum to 1.
    rows = re.findall(r"^\s*\d\s+((?:\s+\d\.\d\d){10})\s+c = \d$", text, re.M)
    assert len(rows) == 6
    for row in rows:
        assert sum(map(float, row.split())) == pytest.approx(1.0, abs=0.06)
    # infer_discrete and the sum by hand pick the same component for every image.
    same, total = map(int, re.search(r"for (\d+) of (\d+) test images", text).groups())
    assert same == total == 500
    # Every test image is in one component; counting each component as its most common
    # digit is right at least as often as the most common digit alone (>= 1/10).
    sizes = [int(n) for n in re.findall(r"^  \d: +(\d+), digit \d", text, re.M)]
    assert sum(sizes) == 500
    agreement = float(re.search(r"cluster-label agreement .*: (\d+\.\d)% of 500", text)
                      .group(1))
    assert 10.0 <= agreement <= 100.0


@pytest.mark.slow
def test_11_semi_supervised(tmp_path, data_root):
    text = run("11_semi_supervised.py", tmp_path, data_root)
    assert SMOKE_NOTE in text
    assert "1000 training images, 100 of them labelled (10 per class" in text
    # Enumerated: the ten labels in one dimension; drawn: one label per image, scored.
    assert "y_unlabelled enumerated: shape (10, 1)" in text
    assert ("y_unlabelled drawn: shape (100,), one per image; rsample: False; "
            "score function: yes") in text
    # The gradient table: at initialization and after 2 smoke epochs of 10 steps, each
    # estimator's time, total variance and mean +- se along the mean gradient; the
    # batch's ELBO (nats per image) below each model's name.
    rows = re.findall(rf"^(at initialization|after 20 steps|\(ELBO -\d+\))\s+"
                      rf"y (summed|drawn) \(\w+\)\s+(\d+\.\d)\s+(\S+)\s+({NUMBER})"
                      rf" \+-\s+(\d+\.\d)$", text, re.M)
    assert [r[1] for r in rows] == ["summed", "drawn"] * 2, text
    assert [rows[0][0], rows[2][0]] == ["at initialization", "after 20 steps"]
    for summed, drawn in (rows[0:2], rows[2:4]):
        assert float(drawn[3]) > 10 * float(summed[3]) > 0  # REINFORCE's variance
        assert all(float(r[5]) > 0 for r in (summed, drawn))
    ratios = [float(v) for v in re.findall(r"drawn / summed: variance x (\S+),", text)]
    assert len(ratios) == 2 and min(ratios) > 10
    # Both unbiased: the means agree (a loose bound: 20 heavy-tailed draws).
    apart = [float(v) for v in re.findall(r"; means (\d+\.\d+) se apart$", text, re.M)]
    assert len(apart) == 2 and max(apart) < 4
    # The alpha table: a = alpha N / N_labelled = 0.1 x 1000 / 100 = 1; errors are
    # percentages and entropies at most log 10.
    table = {m[0]: m[1:] for m in re.findall(
        rf"^(alpha = 0|alpha = 0\.1|classifier alone)\s+(\S+)\s+({NUMBER})%\s+"
        rf"({NUMBER})\s", text, re.M)}
    assert sorted(table) == ["alpha = 0", "alpha = 0.1", "classifier alone"], text
    assert [table["alpha = 0"][0], table["alpha = 0.1"][0]] == ["0", "1"]
    for _, error, h in table.values():
        assert 0 <= float(error) <= 100 and 0 <= float(h) <= math.log(10) + 1e-3
    decoder = re.findall(rf"^alpha = 0(?:\.1)?\s+({NUMBER})\s+({NUMBER})$", text, re.M)
    assert len(decoder) == 2 and all(float(v) >= 0 for row in decoder for v in row)
    mistakes = re.search(r"^most common test mistakes \(alpha = 0\.1\): (.+)$", text,
                         re.M).group(1)
    assert len(re.findall(r"\d as \d \(\d+\)", mistakes)) == 3


@pytest.mark.slow
def test_12_continuous_data(tmp_path, data_root):
    if not (data_root / "frey-faces").is_dir():
        pytest.skip(f"Frey Faces not found: {data_root}/frey-faces/ (not downloaded)")
    text = run("12_continuous_data.py", tmp_path, data_root)
    assert "--smoke: one epoch on 500 points: the numbers below are not meaningful" in text
    assert "500 train, 100 valid, 100 test images of 28 x 20" in text
    heads = ["continuous_bernoulli", "discretized_logistic", "gaussian_decoded"]
    # Per head: what its log p(x) is of, the test ELBO, log p(x) +- se and bits/dim.
    rows = {m[0]: m[1:] for m in re.findall(
        rf"^({'|'.join(heads)})\s+(density|probability)\s+({NUMBER})\s+({NUMBER}) \+-"
        rf"\s+(\d+\.\d+)\s+(-|\d+\.\d+)$", text, re.M)}
    assert sorted(rows) == heads, text
    for name, (of, elbo, ll, se, bits) in rows.items():
        discrete = name == "discretized_logistic"
        assert of == ("probability" if discrete else "density")
        assert all(math.isfinite(float(v)) for v in (elbo, ll, se)) and float(se) > 0
        if discrete:  # a log-probability: <= 0, and bits/dim from the printed nats
            assert float(ll) < 0 and float(elbo) < 0
            assert float(bits) == pytest.approx(-float(ll) / (560 * math.log(2)),
                                                abs=1e-3)
        else:
            assert bits == "-"
    # Per head: the KL term (>= 0: a Gaussian KL in closed form), the codes' spread and
    # the reconstruction error; the mean face's error.
    codes = {m[0]: [float(v) for v in m[1:]] for m in re.findall(
        rf"^({'|'.join(heads)})\s+({NUMBER})\s+(\d+\.\d+)\s+(\d+\.\d+)$", text, re.M)}
    assert sorted(codes) == heads, text
    for kl, spread, recon in codes.values():
        assert kl >= 0 and spread > 0 and recon > 0
    mean_face = float(re.search(r"^the mean face\s+(\d+\.\d+)   \(the training", text,
                                re.M).group(1))
    assert 0 < mean_face < 0.1
    # sigma started at 1 is still above sigma started at 0.1 after any number of epochs.
    sigmas = {m[0]: float(m[1]) for m in re.findall(
        r"^(1\.0|0\.1 \(default\))\s+(\d+\.\d+)\s+\d+\.\d+$", text, re.M)}
    assert sigmas.keys() == {"1.0", "0.1 (default)"}, text
    assert sigmas["1.0"] > sigmas["0.1 (default)"] > 0
    by_epoch = re.findall(r"^  sigma start (?:1\.0|0\.1 \(default\))\s+(\d+\.\d+)$",
                          text, re.M)
    assert len(by_epoch) == 2  # one epoch: one column
