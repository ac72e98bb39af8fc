import hashlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from pyro_vae import VAE, elbo, fit, load_run, read_checkpoint, save_run
from pyro_vae.config import build_model
from pyro_vae.datasets import load
from pyro_vae.runs import RUN_FILES, TrainConfig, from_source, read_config, train_run

from conftest import REPO


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyro_vae", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)


def _digests(folder):
    """Every file's digest; run.lock holds the PID of its last holder, so its presence
    counts, not its content."""
    return {p.name: p.name == "run.lock" or hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.iterdir()}


def test_train_on_digits_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--dataset", "digits", "--epochs", "3", "--z-dim", "8",
                "--hidden", "64", "32", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(["run.lock"] + [f for f in RUN_FILES if f not in (
        "eval.json", "elbo_surgery.png",  # written by pyro-vae evaluate
        "labels.json", "analogies.png", "confusion.png", "error.png")])  # by ssvae runs
    import pyro_vae.runs
    for name in RUN_FILES + ("run.lock",):  # each documented where the folder is
        assert f"``{name}``" in pyro_vae.runs.__doc__, name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all({"epoch", "train_elbo", "valid_elbo", "seconds"} <= set(m) for m in metrics)
    config = read_config(out / "config.json")
    assert config == TrainConfig(dataset="digits", epochs=3, z_dim=8, hidden=(64, 32),
                                 out=str(out), act="relu", loss="auto")
    for png in ("samples.png", "reconstructions.png", "elbo.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The last line is the test ELBO, of the last epoch's weights (no early stopping);
    # reloading the run reproduces it.
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("test ELBO: ") and last.endswith(
        "; 250 test points; the last epoch's weights (epoch 3))")
    printed = float(last.split()[2])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["weights"], summary["weights_epoch"]) == ("last", 3)
    assert all(m["loss"] == "TraceMeanField_ELBO" for m in metrics)
    # nats per 8 x 8 image of binary pixels (a probability), and the same in bits/dim
    bits = float(re.search(r"nats per image \(log-probability, (\S+) bits/dim", last)[1])
    assert bits == pytest.approx(-printed / (64 * math.log(2)), abs=1e-4)
    vae, config = load_run(out)
    test = load("digits", seed=config.seed)[2]
    assert printed == pytest.approx(elbo(vae, test, config.loss, seed=config.seed), abs=1e-3)
    assert json.loads((out / "summary.json").read_text())["test_elbo"] == pytest.approx(printed,
                                                                                       abs=1e-3)

    # A second run into the same folder is refused, and the first run is untouched.
    before = _digests(out)
    again = run_cli("train", "--dataset", "digits", "--epochs", "1", "--out", str(out))
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0
    assert "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert _digests(out) == before


def test_overwrite_replaces_a_run(tmp_path):
    """--overwrite replaces every file of the old run, its evaluation included: the new
    run never shows the old model's eval.json or ELBO-surgery figure."""
    out = tmp_path / "run"
    assert run_cli("train", "--epochs", "1", "--out", str(out), "--quiet").returncode == 0
    assert run_cli("evaluate", str(out), "--samples", "5", "--limit", "5",
                   "--quiet").returncode == 0
    assert (out / "eval.json").exists() and (out / "elbo_surgery.png").exists()
    r = run_cli("train", "--epochs", "2", "--out", str(out), "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / "eval.json").exists() and not (out / "elbo_surgery.png").exists()


@pytest.mark.slow
def test_train_on_real_mnist(tmp_path, data_root):
    out = tmp_path / "mnist"
    r = run_cli("train", "--dataset", "mnist", "--data-dir", str(data_root), "--limit",
                "5000", "--epochs", "2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    test_elbo = float(r.stdout.strip().splitlines()[-1].split()[2])
    # 80 steps from about -545 nats (untrained); the full run reaches about -102.
    assert -250 < test_elbo < -100
    assert "; 10000 test points; the last epoch's weights (epoch" in r.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["valid_elbo"] > metrics[0]["valid_elbo"]


def test_hvae_vamp_gated_with_warmup_end_to_end(tmp_path):
    out = tmp_path / "hvae"
    r = run_cli("train", "--model", "hvae", "--prior", "vamp", "--prior-option",
                "components=10", "--arch", "gated", "--beta", "2", "--warmup-epochs", "2", "--epochs", "3",
                "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "no closed-form KL" in r.stderr and "'z2'" in r.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["beta"] for m in metrics] == [0.0, 1.0, 2.0]
    config = json.loads((out / "config.json").read_text())
    assert (config["z_dim"], config["hidden"], config["prior_options"]) == (
        40, [300, 300], {"components": 10})
    model, _ = load_run(out)
    assert type(model).__name__ == "HierarchicalVAE"
    assert model.prior.pseudo_inputs.shape == (10, 64)
    # The reloaded model reproduces the printed test ELBO (beta = 1, fixed seed).
    printed = float(r.stdout.strip().splitlines()[-1].split()[2])
    test = load("digits")[2]
    assert elbo(model, test, "meanfield", seed=0) == pytest.approx(printed, abs=1e-3)


def test_iwae_run_reports_both_bounds(tmp_path):
    out = tmp_path / "iwae"
    r = run_cli("train", "--loss", "iwae", "--particles", "4", "--epochs", "2",
                "--z-dim", "8", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    match = re.fullmatch(r"test IWAE bound \(K = 4\): (-?[\d.]+) nats per data point", lines[-2])
    assert match, lines[-2]
    iwae = float(match.group(1))
    elbo_value = float(lines[-1].split()[2])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_iwae"] == pytest.approx(iwae, abs=1e-3)
    assert iwae > elbo_value  # the K = 4 bound is tighter than the ELBO


def test_user_prior_by_import_path(tmp_path):
    out = tmp_path / "user"
    r = run_cli("train", "--prior", "test_priors:ShiftedNormal", "--epochs", "1",
                "--z-dim", "4", "--out", str(out), "--quiet",
                env={"PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 0, r.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert state["prior.mu"].shape == (4,)


@pytest.mark.parametrize("args, message", [
    (["--loss", "iwae", "--beta", "4"], "the IWAE bound has none"),
    (["--prior", "nope"], "unknown prior 'nope'"),
    (["--prior", "normal", "--prior-option", "components=5"],
     "prior 'normal' takes no option components; it takes none"),
    (["--prior", "vamp", "--prior-option", "pseudo_init=zeros"],
     "unknown pseudo_init 'zeros'; choose 'normal' or 'data'"),
    (["--prior-option", "components"], "--prior-option: 'components' is not KEY=VALUE"),
])
def test_bad_prior_and_objective_options(tmp_path, args, message):
    out = tmp_path / "run"
    r = run_cli("train", "--out", str(out), "--epochs", "1", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert not out.exists()


def test_evaluate_a_run(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--epochs", "2", "--z-dim", "6", "--hidden", "64", "--out",
                   str(out), "--quiet").returncode == 0
    r = run_cli("evaluate", str(out), "--samples", "200", "--chunk", "50", "--limit", "60",
                "--quiet")
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "eval.json").read_text())
    for key in ("test_elbo", "log_likelihood", "log_likelihood_stderr", "num_samples",
                "reconstruction", "avg_kl", "mutual_information", "marginal_kl",
                "active_units"):
        assert key in result, key
    assert result["num_samples"] == 200 and result["num_points"] == 60
    # Every number is what the library computes on the same points with the same seed.
    from pyro_vae.evaluation import active_units, log_likelihood
    vae, _ = load_run(out)
    test = load("digits")[2].subset(60)
    assert result["log_likelihood"] == pytest.approx(
        log_likelihood(vae, test, 200, 50, seed=0).mean().item(), rel=1e-6)
    assert result["test_elbo"] == pytest.approx(elbo(vae, test, "meanfield", seed=0), rel=1e-6)
    units = active_units(vae, test)
    assert result["active_units"] == units["active_units"] == sum(
        a > 0.01 for a in result["activity"])
    # The printed decomposition adds up, and is labelled apart from the ELBO estimate.
    assert result["surgery_elbo"] == pytest.approx(
        result["reconstruction"] - result["avg_kl"], abs=1e-9)
    assert result["avg_kl"] == pytest.approx(
        result["mutual_information"] + result["marginal_kl"], abs=1e-9)
    lines = r.stdout.splitlines()
    assert lines[:2] == [f"model:           the last epoch's weights (epoch 2)",
                         f"ELBO:            {result['test_elbo']:.4f}   "
                         f"(TraceMeanField_ELBO, 60 test points)"]
    assert f"eval.json and elbo_surgery.png in {out}" in lines
    assert f"  reconstruction - average KL: {result['surgery_elbo']:.4f}" in lines
    ll, bits = r.stdout.strip().splitlines()[-2:]
    assert ll.startswith(f"log-likelihood: {result['log_likelihood']:.4f} +- ")
    assert ll.endswith(f"nats per image (log-probability; 60 test points, S = 200)")
    assert bits.split()[:2] == ["=", f"{result['log_likelihood_bits_per_dim']:.4f}"]
    assert result["log_likelihood_bits_per_dim"] == pytest.approx(
        -result["log_likelihood"] / (64 * math.log(2)), rel=1e-9)
    assert (result["units"], result["likelihood_of"], result["dims"]) == (
        "nats per image", "probability", 64)

    bad = run_cli("evaluate", str(out), "--split", "nope")
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr
    # The library names its arguments, the command line its options.
    bad = run_cli("evaluate", str(out), "--surgery-points", "0")
    assert bad.stderr == "pyro-vae: error: --surgery-points must be an integer >= 1, got 0\n"
    from pyro_vae.runs import evaluate_run
    with pytest.raises(ValueError, match=r"^surgery_points must be an integer >= 1, got 0$"):
        evaluate_run(out, surgery_points=0)
    with pytest.raises(ValueError, match=r"^split 'nope' is not one of"):
        evaluate_run(out, split="nope")
    missing = run_cli("evaluate", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "config.json: no such file" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0


def test_a_model_trained_in_python_becomes_a_run_folder(tmp_path):
    config = TrainConfig(dataset="digits", z_dim=3, hidden=(16,), prior="mog",
                         prior_options={"components": 3})
    train, valid, test = load("digits")
    vae = build_model(config.resolved(), 64)
    fit(vae, train, valid, epochs=1, progress=False)
    save_run(tmp_path / "py", vae, config)
    loaded, saved = load_run(tmp_path / "py")
    assert saved.out == str(tmp_path / "py") and saved.prior_options == {"components": 3}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())
    r = run_cli("evaluate", str(tmp_path / "py"), "--samples", "20", "--limit", "30",
                "--quiet")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "py" / "eval.json").read_text())
    assert result["test_elbo"] == pytest.approx(elbo(vae, test.subset(30), seed=0), rel=1e-6)
    with pytest.raises(ValueError, match="save_run: the model is not what config describes"):
        save_run(tmp_path / "bad", VAE(64, 5, (16,)), config)
    assert not (tmp_path / "bad").exists()


def test_swap_guide_on_a_trained_run_keeps_the_model_fixed(tmp_path):
    """pyro-vae train --init-from RUN --guide iaf --freeze-model: the decoder, the prior
    (VampPrior pseudo-inputs and the encoder its components come from) are RUN's, bit for
    bit; only the new guide trained; the run loads and evaluates like any other."""
    base, new = tmp_path / "base", tmp_path / "iaf"
    r = run_cli("train", "--dataset", "digits", "--epochs", "2", "--z-dim", "4",
                "--hidden", "32", "--prior", "vamp", "--prior-option", "components=10",
                "--out", str(base), "--quiet")
    assert r.returncode == 0, r.stderr
    before = _digests(base)
    r = run_cli("train", "--init-from", str(base), "--guide", "iaf", "--guide-option",
                "flow_steps=2",
                "--freeze-model", "--epochs", "2", "--out", str(new), "--quiet")
    assert r.returncode == 0, r.stderr
    assert _digests(base) == before  # the source run is untouched
    config = read_config(new / "config.json")
    assert (config.guide, config.prior_guide, config.prior, config.z_dim) == (
        "iaf", "diagonal", "vamp", 4)
    old_vae, _ = load_run(base)
    new_vae, _ = load_run(new)
    old_state, new_state = old_vae.state_dict(), new_vae.state_dict()
    kept = {k: v for k, v in new_state.items() if not k.startswith("encoder.")}
    expected = {k.replace("encoder.", "kept_encoder.", 1) if k.startswith("encoder.") else k: v
                for k, v in old_state.items()}
    assert kept.keys() == expected.keys()
    assert all(torch.equal(kept[k], expected[k]) for k in kept)
    assert any(k.startswith("encoder.flows.") for k in new_state)
    # The model's p(z) is the source's: same VampPrior density at any z.
    z = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(new_vae.p_z().log_prob(z), old_vae.p_z().log_prob(z))
    r = run_cli("evaluate", str(new), "--samples", "20", "--limit", "30", "--quiet")
    assert r.returncode == 0, r.stderr
    results = json.loads((new / "eval.json").read_text())
    assert results["log_likelihood"] >= results["test_elbo"] - 0.5  # IWAE(20) vs ELBO
    # Continuing the same guide family starts from its weights, unless --fresh-guide.
    r = run_cli("train", "--init-from", str(new), "--guide", "iaf", "--epochs", "1",
                "--out", str(tmp_path / "more"), "--quiet")
    assert r.returncode == 0, r.stderr
    for fresh in (False, True):
        config, start = from_source(TrainConfig(init_from=str(base), freeze_model=True,
                                                fresh_guide=fresh))
        assert config.prior_guide == "diagonal"
        guide_keys = [k for k in start if k.startswith("encoder.")]
        assert bool(guide_keys) is not fresh
        assert all(torch.equal(start[k], old_state[k]) for k in guide_keys)


def test_a_fresh_guide_for_an_hvae_run_is_both_its_encoders(tmp_path):
    """The HVAE's guide is q(z2|x) and q(z1|x, z2) (its guide_modules): --fresh-guide
    starts both afresh, the prior keeps RUN's q(z2|.) as kept_encoder, the model (p(z1|z2),
    decoder, prior) is RUN's."""
    base = tmp_path / "hvae"
    train_run(TrainConfig(dataset="digits", model="hvae", arch="mlp", z_dim=3, hidden=(16,),
                          epochs=1, out=str(base)), progress=False)
    state = read_checkpoint(base / "checkpoint.pt")["model"]
    config, start = from_source(TrainConfig(init_from=str(base), fresh_guide=True,
                                            freeze_model=True))
    assert (config.model, config.prior_guide) == ("hvae", "diagonal")
    assert not any(k.startswith(("encoder.", "encoder_z1.")) for k in start)
    model = {k: v for k, v in state.items() if not k.startswith(("encoder.", "encoder_z1."))}
    kept = {"kept_encoder." + k[len("encoder."):]: v for k, v in state.items()
            if k.startswith("encoder.")}
    assert start.keys() == model.keys() | kept.keys()
    assert all(torch.equal(start[k], v) for k, v in {**model, **kept}.items())


@pytest.mark.parametrize("args, message", [
    (["--freeze-model"], "--freeze-model needs --init-from RUN"),
    (["--fresh-guide"], "--fresh-guide needs --init-from RUN"),
    (["--init-from", "{tmp}/nowhere"], "nowhere/config.json: no such file"),
    (["--init-from", "{tmp}/base", "--out", "{tmp}/base", "--overwrite"],
     "is the --init-from run"),
    (["--guide", "nope"], "unknown guide 'nope'"),
    (["--guide", "iaf", "--guide-option", "flow_steps=0"], "flow_steps must be >= 1, got 0"),
])
def test_guide_options_bad_input(tmp_path, args, message):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    before = _digests(base)
    args = [a.format(tmp=tmp_path) for a in args]
    r = run_cli("train", "--dataset", "digits", "--epochs", "1", "--out",
                str(tmp_path / "out"), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert _digests(base) == before and not (tmp_path / "out").exists()


def test_early_stopping_keeps_the_best_epoch_for_summary_and_evaluation(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--dataset", "digits", "--epochs", "40", "--lr", "3e-2", "--early-stopping",
               "2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(metrics, key=lambda m: m["valid_elbo"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["epochs_trained"] == len(metrics) == best["epoch"] + 2
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["epoch"] == best["epoch"] and saved["valid_elbo"] == best["valid_elbo"]
    vae, _ = load_run(out)
    assert all(torch.equal(v, saved["model"][k]) for k, v in vae.state_dict().items())
    again = run_cli("train", "--resume", str(out), "--quiet")
    assert again.returncode == 2 and "stopped early" in again.stderr
    # --init-from takes the model the run stands for: its best epoch's, as load_run does.
    _, start = from_source(TrainConfig(init_from=str(out)))
    last = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(start[k], v) for k, v in saved["model"].items())
    assert not all(torch.equal(last[k], v) for k, v in saved["model"].items())


def test_early_stopping_given_on_resume_keeps_the_earlier_best_epoch(tmp_path):
    """A run trained without early stopping, resumed with --early-stopping: when no
    resumed epoch beats the earlier best, best.pt still holds that epoch (kept by every
    run), and the summary and evaluation use it."""
    out = tmp_path / "run"
    r = run_cli("train", "--dataset", "digits", "--epochs", "6", "--lr", "3e-2",
                "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(metrics, key=lambda m: m["valid_elbo"])
    # A learning rate of 1e-9 leaves the weights as they are: no resumed epoch is better
    # than the best by more than validation noise; the check below says which happened.
    # Patience 6: the run has not stopped early after 6 epochs, wherever its best is.
    r = run_cli("train", "--resume", str(out), "--epochs", "9", "--early-stopping", "6",
                "--lr", "1e-9", "--quiet")
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(metrics, key=lambda m: m["valid_elbo"]) == best  # the earlier one
    summary = json.loads((out / "summary.json").read_text())
    saved = torch.load(out / "best.pt", weights_only=True)
    assert summary["best_epoch"] == saved["epoch"] == best["epoch"] <= 6
    assert (summary["weights"], summary["weights_epoch"]) == ("best", best["epoch"])
    assert f"the best epoch's weights (epoch {best['epoch']}))" in r.stdout
    vae, _ = load_run(out)
    assert all(torch.equal(v, saved["model"][k]) for k, v in vae.state_dict().items())
    # which= picks either: the last epoch's weights are checkpoint.pt's.
    last, _ = load_run(out, which="last")
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, final[k]) for k, v in last.state_dict().items())
    assert not all(torch.equal(v, saved["model"][k]) for k, v in last.state_dict().items())
    with pytest.raises(ValueError, match=r"^which must be one of \['best', 'last'\] \(or "
                                         r"None: the run's own\), got 'first'$"):
        load_run(out, which="first")
    e = run_cli("evaluate", str(out), "--samples", "5", "--limit", "20", "--weights",
                "last", "--quiet")
    assert e.returncode == 0, e.stderr
    assert e.stdout.splitlines()[0] == f"model:           the last epoch's weights (epoch " \
                                       f"{len(metrics)})"
    assert json.loads((out / "eval.json").read_text())["weights"] == "last"


def test_resume_finishes_a_run_stopped_before_its_summary(tmp_path):
    """A run killed after its last checkpoint but before its summary and figures (a
    temporary file of the summary's write left behind): --resume writes them, the same
    as the uninterrupted run's, and removes the leftover."""
    out = tmp_path / "run"
    r = run_cli("train", "--dataset", "digits", "--epochs", "2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    for name in ("summary.json", "samples.png", "elbo.png"):
        (out / name).unlink()
    (out / "summary.json.x1y2z3.tmp").write_text("{")
    r = run_cli("train", "--resume", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "summary.json").read_text())
    assert again["test_elbo"] == summary["test_elbo"] and again["epochs_trained"] == 2
    assert (out / "samples.png").stat().st_size > 0 and (out / "elbo.png").stat().st_size > 0
    assert not list(out.glob("*.tmp"))
    finished = run_cli("train", "--resume", str(out), "--quiet")  # nothing left to do
    assert finished.returncode == 2 and "has finished its 2 epochs" in finished.stderr


def test_one_writer_per_run_folder(tmp_path):
    """While one process holds a run folder (here: this test, through the lock that train,
    --resume, --overwrite and evaluate take), a second writer is refused in one line
    naming its PID and the folder is untouched; a killed holder leaves no stale lock."""
    out = tmp_path / "run"
    assert run_cli("train", "--dataset", "digits", "--epochs", "1", "--out", str(out),
                   "--quiet").returncode == 0
    before = _digests(out)
    from pyro_vae.runs import RunFolder
    with RunFolder(out).lock():
        for args in (["train", "--resume", str(out), "--epochs", "2"],
                     ["train", "--dataset", "digits", "--out", str(out), "--overwrite"],
                     ["train", "--dataset", "digits", "--out", str(out)],
                     ["evaluate", str(out), "--samples", "5", "--limit", "5"]):
            r = run_cli(*args, "--quiet")
            assert r.returncode == 2, args
            assert (f"{out}: another process (PID {os.getpid()}) is writing this run "
                    f"folder" in r.stderr) and r.stderr.strip().count("\n") == 0, r.stderr
        assert _digests(out) == before
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pyro_vae.runs import RunFolder\n"
        "with RunFolder(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(60)"),
        str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    r = run_cli("train", "--resume", str(out), "--epochs", "2", "--quiet")
    assert r.returncode == 0, r.stderr


def test_train_help_is_grouped_by_data_model_training_and_run_folder(capsys):
    """pyro-vae train --help: a section per group of settings, each with its one-line
    description, each option in the section of its group."""
    import dataclasses

    from pyro_vae.cli import _flag_of, main
    from pyro_vae.config import GROUPS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    sections = re.split(r"^(\w+) options:\n", text, flags=re.M)
    found = dict(zip(sections[1::2], sections[2::2]))
    assert list(found) == list(GROUPS)
    for name, about in GROUPS.items():
        assert found[name].lstrip().startswith(about), name
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("derived"):
            assert re.search(rf"^  {_flag_of(f.name)}\b", found[f.metadata["group"]], re.M), f.name
    for option in ("--resume", "--quiet", "--trust-imports"):
        assert re.search(rf"^  {option}\b", found["run"], re.M), option
