"""benchmarks/reproduce_m2.py: the protocol in the run folders, training in pieces equal to
training in one go, a changed protocol refused, and the table built from the runs' own
summaries."""

import json
import re
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from pyro_vae import read_checkpoint

SCRIPT = REPO / "benchmarks" / "reproduce_m2.py"


def script(data_root, runs, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--data-dir", str(data_root.resolve()),
         "--runs", str(runs), "--labels", "100", "--seeds", "0", "1", "--device", "cpu",
         "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_m2_protocol_pieces_and_table(tmp_path, data_root):
    quick = ["--train-limit", "400", "--labelled-share", "0.2"]
    pieces, whole = tmp_path / "pieces", tmp_path / "whole"
    ok(script(data_root, pieces, "train", "--epochs", "1", *quick))
    ok(script(data_root, pieces, "train", "--epochs", "1", *quick))
    ok(script(data_root, whole, "train", "--epochs", "2", *quick))

    folder = pieces / "labels-100" / "seed-1"
    config = json.loads((folder / "config.json").read_text())
    protocol = dict(model="ssvae", labels=100, labelled_share=0.2, alpha=0.1, seed=1,
                    dataset="mnist", hidden=[500], z_dim=50, act="softplus", loss="enum",
                    batch_size=100, lr=1e-3, monitor="valid_error", limit=400)
    assert {k: config[k] for k in protocol} == protocol
    chosen = json.loads((folder / "labels.json").read_text())
    assert chosen["count"] == 100 and chosen["repeats_per_epoch"] == 1  # 0.2 of 400 points

    for seed in (0, 1):  # two pieces of one epoch == one run of two, bitwise
        a = read_checkpoint(pieces / "labels-100" / f"seed-{seed}" / "checkpoint.pt")
        b = read_checkpoint(whole / "labels-100" / f"seed-{seed}" / "checkpoint.pt")
        assert len(a["training"]["history"]) == 2
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    refused = script(data_root, pieces, "train", "--epochs", "1", "--train-limit", "400",
                     "--labelled-share", "0.5")
    assert refused.returncode != 0
    assert "--labelled-share is 0.2 there; it cannot change" in refused.stderr

    out = ok(script(data_root, pieces, "table"))
    errors = [json.loads((pieces / "labels-100" / f"seed-{s}" / "summary.json").read_text())[
        "test_error"] for s in (0, 1)]
    row = re.search(r"^\| 100 \| (\S+) ± (\S+) \(0, 1\) \| 11\.97 ± 1\.71 \| ≤ 13\.68 \|", out,
                    re.M)
    assert row, out
    assert float(row[1]) == pytest.approx(statistics.mean(errors), abs=0.005)
    assert float(row[2]) == pytest.approx(statistics.stdev(errors), abs=0.005)
    assert (pieces / "error_curves.png").read_bytes()[:4] == b"\x89PNG"
