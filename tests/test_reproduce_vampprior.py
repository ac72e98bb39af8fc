"""benchmarks/reproduce_vampprior.py: the paper's protocol in the run folders, training in
pieces equal to training in one go, a changed protocol refused, and the table it prints
holding the package's own evaluation."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from pyro_vae import read_checkpoint

SCRIPT = REPO / "benchmarks" / "reproduce_vampprior.py"
CONFIGS = ["vae-standard", "hvae-vampprior"]


def script(data_root, runs, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--data-dir", str(data_root.resolve()),
         "--runs", str(runs), "--dataset", "mnist", "--configs", *CONFIGS, "--device", "cpu",
         "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_protocol_pieces_and_table(tmp_path, data_root):
    quick = ["--train-limit", "200", "--warmup-epochs", "1"]
    pieces, whole = tmp_path / "pieces", tmp_path / "whole"
    ok(script(data_root, pieces, "train", "--epochs", "1", *quick))
    ok(script(data_root, pieces, "train", "--epochs", "1", *quick))
    ok(script(data_root, whole, "train", "--epochs", "2", *quick))

    config = json.loads((pieces / "mnist" / "hvae-vampprior" / "config.json").read_text())
    protocol = dict(model="hvae", prior="vamp", arch="gated", z_dim=40, hidden=[300, 300],
                    prior_options={"components": 500}, lr=5e-4, batch_size=100, warmup_epochs=1,
                    early_stopping=50, dataset="mnist", limit=200, loss="meanfield")
    assert {k: config[k] for k in protocol} == protocol
    assert json.loads((pieces / "mnist" / "vae-standard" / "config.json").read_text())[
        "prior"] == "normal"

    for name in CONFIGS:  # two pieces of one epoch == one run of two, bitwise
        a = read_checkpoint(pieces / "mnist" / name / "checkpoint.pt")
        b = read_checkpoint(whole / "mnist" / name / "checkpoint.pt")
        assert len(a["training"]["history"]) == 2
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    refused = script(data_root, pieces, "train", "--epochs", "1", "--train-limit", "200",
                     "--warmup-epochs", "3")
    assert refused.returncode != 0
    assert "--warmup-epochs is 1 there; it cannot change" in refused.stderr
    assert len(read_checkpoint(pieces / "mnist" / "vae-standard" / "checkpoint.pt")
               ["training"]["history"]) == 2  # nothing trained, nothing overwritten

    text = ok(script(data_root, pieces, "evaluate", "--samples", "10", "--limit", "30"))
    assert (pieces / "mnist" / "valid_curves.png").stat().st_size > 0
    assert "10 importance samples, 30 test points" in text
    for name in CONFIGS:
        result = json.loads((pieces / "mnist" / name / "eval.json").read_text())
        history = [json.loads(line) for line in
                   (pieces / "mnist" / name / "metrics.jsonl").read_text().splitlines()]
        best = max(history, key=lambda r: r["valid_elbo"])["epoch"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"2 ({best})"
        assert cells[2] == (f"{result['log_likelihood']:.2f} ± "
                            f"{result['log_likelihood_stderr']:.2f}")
        assert cells[3] == f"{-result['log_likelihood'] / (784 * math.log(2)):.3f}"
        # the paper's figures are for statically binarized MNIST, not this data set
        assert cells[4] == "not read" and cells[5] == f"{result['test_elbo']:.2f}"
        assert cells[6] == "n/a"  # too few epochs to say whether it was still improving
        assert re.fullmatch(r"\d+\.\d", cells[7])
