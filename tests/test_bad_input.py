"""Every kind of bad input, in one table: a one-line error that names the file, option or
value, and nothing written or removed anywhere (the run folder is not even created).

Items 1-14 are the kinds of bad input a user can hand in; rows marked "+" are further
cases of the same kind.
"""

import gzip
import json
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import pytest
import torch

from pyro_vae import VAE, TrainConfig, cli, compiled, fit, load_run, resume_run, train_run
from pyro_vae import elbo as pv_elbo
from pyro_vae.evaluation import log_likelihood
from pyro_vae.datasets import SOURCES, TensorDataset
from pyro_vae.likelihoods import GaussianLikelihood


def _idx(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _payload(n_train=12, n_labels=None):
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (n_train, 28, 28)), 2051),
        "train-labels-idx1-ubyte": _idx(rng.integers(0, 10, n_labels or n_train), 2049),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (4, 28, 28)), 2051),
        "t10k-labels-idx1-ubyte": _idx(rng.integers(0, 10, 4), 2049),
    }


def mnist_files(tmp: Path, monkeypatch, registered=None, written=None, gz_cut=None):
    """A tiny 'mnist' folder under tmp/data: ``written`` file contents (gzipped), checked
    against the md5s of ``registered`` (default: what is written); ``gz_cut``: truncate
    that .gz file to half its size."""
    written = written or _payload()
    registered = registered or written
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    for name, raw in written.items():
        data = gzip.compress(raw, mtime=0)
        (folder / (name + ".gz")).write_bytes(data[:len(data) // 2] if name == gz_cut else data)
    monkeypatch.setitem(SOURCES, "mnist", dict(SOURCES["mnist"], files={
        k: hashlib.md5(v).hexdigest() for k, v in registered.items()}, sizes={
        k: len(v) for k, v in registered.items()}))


def _wrong_md5(tmp, monkeypatch):
    written = _payload()
    raw = bytearray(written["train-labels-idx1-ubyte"])
    raw[-1] ^= 1
    mnist_files(tmp, monkeypatch, _payload(), dict(written, **{
        "train-labels-idx1-ubyte": bytes(raw)}))


def _corrupt_gz(tmp, monkeypatch):
    """A .gz whose deflate stream is damaged (its first block's header: zlib.error)."""
    mnist_files(tmp, monkeypatch)
    path = tmp / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # after the 10-byte gzip header
    path.write_bytes(bytes(data))


def _truncated_idx(tmp, monkeypatch):
    written = _payload()
    written["train-images-idx3-ubyte"] = written["train-images-idx3-ubyte"][:-100]
    mnist_files(tmp, monkeypatch, written=written)


def _wrong_magic(tmp, monkeypatch):
    written = _payload()
    written["train-labels-idx1-ubyte"] = b"\x00\x00\x08\x03" + written[
        "train-labels-idx1-ubyte"][4:]
    mnist_files(tmp, monkeypatch, written=written)


def _trained_run(tmp, monkeypatch):
    train_run(TrainConfig(dataset="digits", epochs=1, z_dim=4, hidden=(16,),
                          out=str(tmp / "run")), progress=False)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_checkpoint(tmp, monkeypatch):
    """A run whose checkpoint.pt would create tmp/exploited when unpickled."""
    _trained_run(tmp, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"format": "pyro_vae.checkpoint/1", "model": _Exploit(tmp / "exploited")},
                   tmp / "run" / "checkpoint.pt")


def _api(x, likelihood=None):
    """fit() on data ``x`` of 64 features: the checks the CLI runs, for data handed in
    through the Python API."""
    def call(tmp):
        fit(VAE(64, 4, (16,), likelihood=likelihood or "bernoulli"),
            TensorDataset(x, "mine", "train", (8, 8)), epochs=1, batch_size=8, progress=False)
    return call


class Case(NamedTuple):
    item: str
    what: str
    args: object  # pyro-vae arguments ({tmp} is the test's folder), or call(tmp)
    message: str
    setup: Optional[Callable] = None


MNIST = ["--dataset", "mnist", "--data-dir", "{tmp}/data", "--no-download"]
DIGITS = ["--dataset", "digits", "--epochs", "1"]
CASES: Sequence[Case] = [
    Case("1", "data file with the wrong md5", MNIST,
         "data/mnist/train-labels-idx1-ubyte.gz: md5 of the content is", _wrong_md5),
    Case("2", "truncated gz", MNIST,
         "data/mnist/train-images-idx3-ubyte.gz: truncated or corrupt",
         lambda tmp, mp: mnist_files(tmp, mp, gz_cut="train-images-idx3-ubyte")),
    Case("2+", "corrupt gz stream", MNIST,
         "data/mnist/train-images-idx3-ubyte.gz: truncated or corrupt (Error -3 while "
         "decompressing data", _corrupt_gz),
    Case("3", "truncated IDX", MNIST,
         "data/mnist/train-images-idx3-ubyte: IDX header says [12, 28, 28] but the payload "
         "has 9308 bytes", _truncated_idx),
    Case("4", "wrong IDX magic", MNIST,
         "data/mnist/train-labels-idx1-ubyte: IDX magic number is 2051, expected 2049",
         _wrong_magic),
    Case("5", "image and label counts differ", MNIST,
         "data/mnist/train-*: 12 images but 11 labels",
         lambda tmp, mp: mnist_files(tmp, mp, written=_payload(n_labels=11))),
    Case("6", "empty data set", MNIST, "the train split of 'mnist' is empty",
         lambda tmp, mp: mnist_files(tmp, mp, written=_payload(n_train=0))),
    Case("6+", "empty split", MNIST, "the valid split of 'mnist' is empty",
         lambda tmp, mp: mnist_files(tmp, mp)),  # 12 images: no validation split
    Case("7", "NaN in data", _api(torch.full((50, 64), float("nan"))),
         "the train split of 'mine' has NaN or inf"),
    Case("7+", "inf in data (gaussian)", _api(torch.full((50, 64), float("inf")),
                                              GaussianLikelihood(64)),
         "likelihood 'gaussian' needs finite x; the train split of 'mine' has NaN or inf"),
    Case("8", "gray values for a Bernoulli likelihood", DIGITS + ["--no-binarize"],
         "likelihood 'bernoulli' needs x in {0, 1} but the train split of 'digits' has "
         "other values (e.g. 0.0625); binarize it (binarize=True in "),
    Case("9", "integer data", _api(torch.randint(0, 2, (50, 64))),
         "the train split of 'mine' has dtype torch.int64; the model's parameters are "
         "torch.float32 (convert the data with x.to(torch.float32))"),
    Case("10", "input dimension not the model's", _api(torch.zeros(50, 32)),
         "the train split of 'mine' has points of shape (32,); the model takes x_dim = 64"),
    Case("11", "unknown --prior", DIGITS + ["--prior", "flat"],
         "unknown prior 'flat'; choose one of ['learned_normal', 'mog', 'normal', 'vamp']"),
    Case("11+", "unknown --guide", DIGITS + ["--guide", "exact"],
         "unknown guide 'exact'; choose one of ['diagonal', 'fullrank', 'iaf']"),
    Case("11+", "unknown --loss", DIGITS + ["--loss", "kl"],
         "argument --loss: invalid choice: 'kl' (choose from 'trace', 'meanfield', 'iwae', 'enum')"),
    Case("11+", "unknown --dataset", ["--dataset", "cifar"],
         "argument --dataset: invalid choice: 'cifar' (choose from 'digits', 'mnist', "
         "'fashion-mnist', 'binarized-mnist', 'caltech101', 'frey-faces')"),
    Case("12", "z-dim <= 0", DIGITS + ["--z-dim", "0"], "--z-dim must be > 0, got 0"),
    Case("12+", "batch size > data set", DIGITS + ["--batch-size", "5000"],
         "--batch-size 5000 is larger than the train split of 'digits' (1297 points)"),
    Case("12+", "K pseudo-inputs <= 0", DIGITS + ["--prior", "vamp", "--prior-option",
                                               "components=0"],
         "prior option components must be >= 1, got 0"),
    Case("12+", "beta < 0", DIGITS + ["--beta", "-1"],
         "--beta must be finite and >= 0, got -1.0"),
    Case("12+", "particles < 1", DIGITS + ["--particles", "0"],
         "--particles must be > 0, got 0"),
    Case("12+", "--limit 0", DIGITS + ["--limit", "0"], "--limit must be > 0, got 0"),
    Case("12+", "--lr < 0", DIGITS + ["--lr", "-1"], "--lr must be finite and > 0, got -1.0"),
    Case("12+", "--hidden 0", DIGITS + ["--hidden", "0"], "--hidden: sizes must be >= 1"),
    Case("12+", "--skip-nonfinite < 0", DIGITS + ["--skip-nonfinite", "-1"],
         "--skip-nonfinite must be >= 0, got -1"),
    Case("12+", "--checkpoint-every < 0", DIGITS + ["--checkpoint-every", "-2"],
         "--checkpoint-every must be >= 0, got -2"),
    Case("12+", "no such device", DIGITS + ["--device", "tpu:7"],
         "--device: 'tpu:7' is not a device"),
    Case("12+", "missing data files, downloads off", ["--dataset", "mnist", "--data-dir",
                                                      "{tmp}/nothing", "--no-download"],
         "nothing/mnist lacks train-images-idx3-ubyte.gz"),
    Case("13", "--resume with another model", ["--resume", "{tmp}/run", "--z-dim", "5"],
         "--resume {tmp}/run: --z-dim 5 differs from the run's 4 and changes the model",
         _trained_run),
    Case("13+", "--resume with another prior", ["--resume", "{tmp}/run", "--prior", "vamp"],
         "--prior vamp differs from the run's normal and changes the model", _trained_run),
    Case("13+", "--resume with another batch size",
         ["--resume", "{tmp}/run", "--batch-size", "64", "--epochs", "2"],
         "--batch-size 64 differs from the run's 128 and changes what the run trains",
         _trained_run),
    Case("13+", "--resume into another folder",
         ["--resume", "{tmp}/run", "--out", "{tmp}/copy", "--epochs", "2"],
         "--out {tmp}/copy: a resumed run stays in its folder {tmp}/run", _trained_run),
    Case("13+", "--resume of a folder without a run", ["--resume", "{tmp}/nowhere"],
         "{tmp}/nowhere/config.json: no such file; is this a pyro_vae run folder?"),
    Case("13+", "--resume of a checkpoint crafted to run code",
         ["--resume", "{tmp}/run", "--epochs", "2"],
         "{tmp}/run/checkpoint.pt: not a readable pyro_vae checkpoint (UnpicklingError",
         _crafted_checkpoint),  # and tmp/exploited is not created: the tree is unchanged
    Case("13+", "--resume with an infinite lr", ["--resume", "{tmp}/run", "--epochs", "2",
                                                 "--lr", "inf"],
         "--lr must be finite and > 0, got inf", _trained_run),
    Case("13+", "--resume of a finished run", ["--resume", "{tmp}/run"],
         "the run has finished its 1 epochs; give --epochs more than 1", _trained_run),
    Case("14+", "an empty --out", lambda tmp: train_run(TrainConfig(dataset="digits",
                                                                  out="")),
         "--out: give the run folder to write (got an empty name)"),
    # --overwrite of a good run with a bad value: refused before the old run is touched.
    Case("14+", "--overwrite with beta nan", DIGITS + ["--beta", "nan", "--overwrite"],
         "--beta must be finite and >= 0, got nan", _trained_run),
    Case("14+", "--overwrite with lr inf", DIGITS + ["--lr", "inf", "--overwrite"],
         "--lr must be finite and > 0, got inf", _trained_run),
    Case("14+", "--overwrite with an infinite likelihood scale",
         DIGITS + ["--likelihood", "gaussian", "--likelihood-option", "scale=Infinity",
                   "--overwrite"],
         "likelihood option scale must be finite, got inf", _trained_run),
    Case("14+", "--overwrite with device mps", DIGITS + ["--device", "mps", "--overwrite"],
         "--device: 'mps' is not a device this package trains on", _trained_run),
    Case("14+", "--overwrite with device meta", DIGITS + ["--device", "meta", "--overwrite"],
         "--device: 'meta' is not a device this package trains on", _trained_run),
    Case("14+", "--overwrite with bf16 where it is not fast",
         DIGITS + ["--precision", "bf16", "--overwrite"],
         "--precision 'bf16' would be slower than float32 here: this CPU has neither "
         "AVX512-BF16 nor AMX; use 'float32'", lambda tmp, mp: (
             _trained_run(tmp, mp), mp.setattr(compiled, "fast_bf16", lambda device: False))),
    Case("14", "output folder holds a run", DIGITS + ["--z-dim", "8"],
         "--out {tmp}/run already holds a run (config.json, metrics.jsonl, checkpoint.pt, "
         "best.pt, summary.json, samples.png, reconstructions.png, elbo.png); pass "
         "--overwrite",
         _trained_run),
]


def _tree(folder: Path) -> dict:
    """Every file's digest (run.lock: its presence; it holds its last holder's PID)."""
    return {str(p.relative_to(folder)): p.name == "run.lock" or hashlib.sha256(
        p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.item} {c.what}" for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    before = _tree(tmp_path)
    message = case.message.replace("{tmp}", str(tmp_path))
    if callable(case.args):
        with pytest.raises(ValueError) as e:
            case.args(tmp_path)
        error = str(e.value)
    else:
        argv = ["train", *(a.replace("{tmp}", str(tmp_path)) for a in case.args), "--quiet"]
        if "--resume" not in case.args:
            argv += ["--out", str(tmp_path / "run")]
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(("pyro-vae: error: ", "pyro-vae train: error: "))
    assert message in error
    assert "\n" not in error
    assert _tree(tmp_path) == before  # nothing written, nothing removed


def test_the_table_covers_every_kind_of_bad_input():
    assert {c.item.rstrip("+") for c in CASES} == {str(i) for i in range(1, 15)}


@pytest.fixture
def a_run(tmp_path):
    _trained_run(tmp_path, None)
    return tmp_path / "run"


def _edit_config(run, change):
    path = run / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(change(raw)))


@pytest.mark.parametrize("change, message", [
    (lambda c: dict(c, lr="0.1"), "lr must be a number, got '0.1'"),
    (lambda c: dict(c, hidden="abc"), "hidden must be a list of integers, got 'abc'"),
    (lambda c: dict(c, epochs=True), "epochs must be an integer, got True"),
    (lambda c: dict(c, seed=1.5), "seed must be an integer, got 1.5"),
    (lambda c: {k: v for k, v in c.items() if k != "dataset"},
     "setting 'dataset' is missing"),
    (lambda c: [], "expected a JSON object, got list"),
    (lambda c: None, "expected a JSON object, got NoneType"),
    (lambda c: dict(c, format=7), "format 7 is not one this version reads"),
], ids=["lr-text", "hidden-text", "epochs-bool", "seed-float", "no-dataset", "list", "null",
        "format"])
def test_a_malformed_config_is_one_line_naming_file_and_field(a_run, change, message):
    _edit_config(a_run, change)
    with pytest.raises(ValueError) as e:
        load_run(a_run)
    assert str(e.value).startswith(f"{a_run / 'config.json'}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def _edit_checkpoint(run, change):
    path = run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(training={}), "training.position must be a dict, got None"),
    (lambda s: s.update(model=[]), "model must be a state dict (names to tensors), got list"),
    (lambda s: s["training"]["position"].update(order=torch.arange(5)),
     "training.position.order must be a permutation of the 1297 points"),
    (lambda s: s["training"]["position"].update(step=-1),
     "training.position.step must be a finite int >= 0, got -1"),
    (lambda s: s["training"]["position"].update(batch_size=0),
     "training.position.batch_size must be a finite int >= 1, got 0"),
    (lambda s: s["training"].update(history=[{"epoch": 3}]),
     "training.history must be the records of epochs 1, 2, ... in order"),
    (lambda s: s["model"]["decoder.0.weight"].fill_(float("nan")),
     "model.decoder.0.weight holds NaN or infinite values"),
], ids=["training-empty", "model-list", "order", "step", "batch-size", "history", "nan"])
def test_a_malformed_checkpoint_is_one_line_naming_file_and_field(a_run, change, message):
    _edit_checkpoint(a_run, change)
    with pytest.raises(ValueError) as e:
        resume_run(a_run, {"epochs": 2}, progress=False)
    assert str(e.value).startswith(f"{a_run / 'checkpoint.pt'}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_init_from_a_checkpoint_with_a_wrong_shaped_tensor_is_one_line(a_run, tmp_path):
    _edit_checkpoint(a_run, lambda s: s["model"].update(
        {"decoder.0.weight": torch.zeros(3, 3)}))
    with pytest.raises(ValueError) as e:
        train_run(TrainConfig(init_from=str(a_run), out=str(tmp_path / "new")),
                  progress=False)
    assert "does not fit this model (size mismatch for decoder.0.weight" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "new").exists()


@pytest.mark.parametrize("data, message", [
    (torch.full((5, 64), float("nan")), "the given split of 'data' has NaN or inf"),
    (torch.zeros(5, 64, dtype=torch.float64),
     "has dtype torch.float64; the model's parameters are torch.float32 (convert the data "
     "with x.to(torch.float32))"),
], ids=["nan", "float64"])
def test_the_evaluation_api_checks_its_data_in_one_line(data, message):
    vae = VAE(64, 4, (16,))
    for evaluate in (lambda: pv_elbo(vae, data), lambda: log_likelihood(vae, data, 10)):
        with pytest.raises(ValueError) as e:
            evaluate()
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="num_samples 1000000000000 is more than 10000000"):
        log_likelihood(vae, torch.zeros(5, 64), 10 ** 12)


def test_a_failed_download_says_why(tmp_path, monkeypatch):
    import urllib.error

    from pyro_vae import datasets

    def refuse(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", refuse)
    with pytest.raises(FileNotFoundError) as e:
        datasets.load("mnist", tmp_path)
    assert "download failed (" in str(e.value) and "no route to host" in str(e.value)
    assert "\n" not in str(e.value)
