"""Every kind of bad input, in one table: a one-line error that names the file, option or
value, and nothing written or removed anywhere (the run folder is not even created).

Items 1-14 are the kinds of bad input a user can hand in; rows marked "+" are further
cases of the same kind.
"""

import gzip
import json
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import pytest
import torch

import pyro_vae as pv
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
         "argument --loss: invalid choice: 'kl' (choose from 'auto', 'trace', 'meanfield', 'iwae', 'enum')"),
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
    Case("12+", "missing data files: the option named", ["--dataset", "mnist", "--data-dir",
                                                         "{tmp}/nothing", "--no-download"],
         "downloads are off; put the files there or point --data-dir / $PYRO_VAE_DATA at a "
         "folder holding mnist/"),
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
    # Part options, checked against the part's constructor before it runs.
    Case("12+", "a NaN likelihood option", DIGITS + ["--likelihood", "gaussian",
                                                  "--likelihood-option", "scale=NaN"],
         "likelihood option scale must be finite, got nan"),
    Case("12+", "a part option that is the model's own", DIGITS + [
        "--prior", "mog", "--prior-option", "z_dim=3"],
         "prior option z_dim is the model's own setting, which it hands the prior"),
    Case("12+", "a part option out of its declared range", DIGITS + [
        "--guide-option", "min_scale=-1"], "guide option min_scale must be > 0, got -1"),
    Case("12+", "an infinite part option", DIGITS + [
        "--prior", "vamp", "--prior-option", "init_mean=Infinity"],
         "prior option init_mean must be finite, got inf"),
    Case("12+", "a part option of the wrong kind", DIGITS + [
        "--prior", "vamp", "--prior-option", "components=1e9"],
         "prior option components must be an integer, got 1000000000.0"),
    Case("11+", "an import path that is not a prior class", DIGITS + ["--prior", "os:system"],
         "prior 'os:system' is not a prior class (a subclass of torch.nn.Module)"),
    Case("12+", "--seed out of range", DIGITS + ["--seed", "-1"],
         "--seed must lie in 0 ... 2**32 - 1, got -1"),
    Case("12+", "weights beyond any memory", DIGITS + ["--hidden", "100000000000"],
         "the model's weights need at least"),
    # --overwrite of a good run: refused before the old run is touched.
    Case("14+", "--overwrite with a NaN prior option",
         DIGITS + ["--prior", "vamp", "--prior-option", "init_std=NaN", "--overwrite"],
         "prior option init_std must be finite, got nan", _trained_run),
    Case("14+", "--overwrite with a step beyond memory",
         DIGITS + ["--particles", "1000000000000", "--overwrite"],
         "steps of 1000000000000 particles x 128 points x 64 features need at least",
         _trained_run),
    Case("14+", "--overwrite with a scale that float32 makes 0 (a trial on two points)",
         DIGITS + ["--likelihood", "gaussian", "--no-binarize", "--likelihood-option",
                   "scale=1e-300", "--overwrite"],
         "the model fails on the first batch (ValueError: Expected parameter scale",
         _trained_run),
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


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One trained run (1 epoch on digits), for tests that copy it and edit the copy."""
    tmp = tmp_path_factory.mktemp("trained")
    _trained_run(tmp, None)
    return tmp / "run"


@pytest.fixture
def run_copy(trained_once, tmp_path):
    shutil.copytree(trained_once, tmp_path / "run")
    return tmp_path / "run"


def _optimizer(s):
    return s["training"]["optimizer"]["state"]


def _rng(s):
    return s["training"]["rng"]


def _position(s):
    return s["training"]["position"]


# The training state, field by field: what a crafted checkpoint.pt may hold instead.
STATE_FIELDS = [
    ("optimizer-empty", lambda s: s["training"]["optimizer"].update(state={}),
     "training.optimizer.state must hold 'param_groups' (a list of groups with 'params') "
     "and 'state' (a dict)"),
    ("optimizer-names", lambda s: s["training"]["optimizer"]["parameters"].__setitem__(
        0, "nope"), "the saved optimizer state is for other parameters ('nope' is not one "
                    "of this model's)"),
    ("optimizer-names-twice", lambda s: s["training"]["optimizer"]["parameters"].__setitem__(
        1, "encoder.net.0.weight"), "training.optimizer.parameters must be distinct"),
    ("optimizer-indices", lambda s: _optimizer(s)["param_groups"][0].update(params=[0, 1]),
     "training.optimizer.state.param_groups must hold each of the 8 parameters' indices "
     "once, got [0, 1]"),
    ("betas-nan", lambda s: _optimizer(s)["param_groups"][0].update(
        betas=(float("nan"), 0.999)),
     "training.optimizer.state.param_groups[0].betas must be two numbers in [0, 1), got "
     "(nan, 0.999)"),
    ("betas-one", lambda s: _optimizer(s)["param_groups"][0].update(betas=(0.9, 1.0)),
     "param_groups[0].betas must be two numbers in [0, 1)"),
    ("eps-zero", lambda s: _optimizer(s)["param_groups"][0].update(eps=0.0),
     "param_groups[0].eps must be a finite number > 0, got 0.0"),
    ("weight-decay", lambda s: _optimizer(s)["param_groups"][0].update(weight_decay=-1),
     "param_groups[0].weight_decay must be a finite number >= 0, got -1"),
    ("fused", lambda s: _optimizer(s)["param_groups"][0].update(fused=False),
     "param_groups[0].fused is False; this optimizer has True"),
    ("group-option", lambda s: _optimizer(s)["param_groups"][0].update(foreach_hack=1),
     "param_groups[0] has unknown options ['foreach_hack']"),
    ("state-key", lambda s: _optimizer(s)["state"].update({99: {}}),
     "training.optimizer.state.state holds 99, not the state of one of the 8 parameters"),
    ("state-fields", lambda s: _optimizer(s)["state"][0].pop("exp_avg_sq"),
     "training.optimizer.state.state[0] must hold ['exp_avg', 'exp_avg_sq', 'step']"),
    ("step-nan", lambda s: _optimizer(s)["state"][0].update(step=torch.tensor(float("nan"))),
     "training.optimizer.state.state[0].step must be a whole number >= 0, got nan"),
    ("step-negative", lambda s: _optimizer(s)["state"][0].update(step=torch.tensor(-3.0)),
     "state.state[0].step must be a whole number >= 0, got -3.0"),
    ("exp-avg-shape", lambda s: _optimizer(s)["state"][0].update(exp_avg=torch.zeros(3)),
     "training.optimizer.state.state[0].exp_avg is torch.float32 (3,) on cpu; parameter "
     "encoder.net.0.weight is torch.float32 (16, 64) on cpu"),
    ("exp-avg-dtype", lambda s: _optimizer(s)["state"][0].update(
        exp_avg=torch.zeros(16, 64, dtype=torch.float64)),
     "state.state[0].exp_avg is torch.float64 (16, 64) on cpu; parameter "
     "encoder.net.0.weight is torch.float32"),
    ("exp-avg-nan", lambda s: _optimizer(s)["state"][1]["exp_avg"].fill_(float("nan")),
     "training.optimizer.state.state[1].exp_avg must be a tensor of finite values"),
    ("exp-avg-sq-negative", lambda s: _optimizer(s)["state"][1]["exp_avg_sq"].fill_(-1.0),
     "state.state[1].exp_avg_sq must be a tensor of finite non-negative values"),
    ("rng-empty", lambda s: s["training"].update(rng={}),
     "training.rng.torch must be a generator state (a uint8 tensor of 5056 bytes), got None"),
    ("rng-torch-size", lambda s: _rng(s).update(torch=torch.zeros(3, dtype=torch.uint8)),
     "training.rng.torch must be a generator state (a uint8 tensor of 5056 bytes)"),
    ("rng-generator", lambda s: _rng(s).update(generator=torch.zeros(5056)),
     "training.rng.generator must be a generator state"),
    ("rng-generator-device", lambda s: _rng(s).update(generator_device="tpu"),
     "training.rng.generator_device must be 'cpu' or 'cuda', got 'tpu'"),
    ("rng-python", lambda s: _rng(s).update(python=(3, (1, 2), None)),
     "training.rng.python must be a state of Python's random module"),
    ("rng-numpy", lambda s: _rng(s)["numpy"].update(pos=10 ** 6),
     "training.rng.numpy must be a state of NumPy's MT19937 generator"),
    ("rng-cuda", lambda s: _rng(s).update(cuda=[torch.zeros(3)]),
     "training.rng.cuda[0] must be a generator state"),
    ("rng-ranks", lambda s: _rng(s).update(ranks=[{"torch": 5}]),
     "training.rng.ranks[0].torch must be a generator state"),
    ("rng-unknown", lambda s: _rng(s).update(extra=1),
     "training.rng: unknown fields ['extra']"),
    ("position-step", lambda s: _position(s).update(step=10 ** 9, order=torch.randperm(1297)),
     "training.position.step must be <= 11 (the batches of 1297 points in batches of 128), "
     "got 1000000000"),
    ("position-epoch", lambda s: _position(s).update(epoch=5),
     "training.position.epoch is 5, but the history holds 1 epochs (expected epoch 2)"),
    ("position-order", lambda s: _position(s).update(step=3),
     "training.position.order is missing, but 3 steps of the epoch are done"),
    ("position-seen", lambda s: _position(s).update(seen=10 ** 6),
     "training.position.seen must be <= 0 (the points of 0 steps), got 1000000"),
    ("position-data", lambda s: _position(s).update(num_data=5),
     "the state was saved training on 5 points in batches of 128, not 1297"),
    ("history-value", lambda s: s["training"]["history"][0].update(train_elbo="x"),
     "training.history[0].train_elbo must be a finite number, got 'x'"),
    ("history-nan", lambda s: s["training"]["history"][0].update(seconds=float("nan")),
     "training.history[0].seconds must be a finite number, got nan"),
    ("history-kind", lambda s: s["training"]["history"][0].update(valid_elbo=[1]),
     "training.history[0].valid_elbo must be a number, text or null, got [1]"),
    ("history-valid", lambda s: s["training"]["history"][0].update(valid_elbo="best"),
     "training.history[0].valid_elbo must be a number or null, got 'best'"),
]


@pytest.mark.parametrize("change, message", [f[1:] for f in STATE_FIELDS],
                         ids=[f[0] for f in STATE_FIELDS])
def test_every_field_of_the_training_state_is_checked_before_anything_is_written(
        run_copy, change, message):
    """A crafted training state: one line naming the checkpoint and the field, and the
    folder as it was (config.json is not rewritten by a --resume that fails)."""
    _edit_checkpoint(run_copy, change)
    before = _tree(run_copy)
    with pytest.raises(ValueError) as e:
        resume_run(run_copy, {"epochs": 2}, progress=False)
    assert str(e.value).startswith(f"{run_copy / 'checkpoint.pt'}: ")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert _tree(run_copy) == before


def test_a_failed_resume_leaves_config_json_as_it_was(run_copy, capsys):
    """--resume rewrote config.json (epochs, out) before the training state failed to
    load, so the folder no longer said what was trained."""
    _edit_checkpoint(run_copy, lambda s: s["training"]["optimizer"].update(state={}))
    config = (run_copy / "config.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(run_copy), "--epochs", "2", "--quiet"])
    assert e.value.code == 2
    assert "training.optimizer.state must hold" in capsys.readouterr().err
    assert (run_copy / "config.json").read_bytes() == config


def test_a_crafted_optimizer_state_never_reaches_the_fused_adam(run_copy):
    """A state tensor of the wrong shape made the fused Adam write out of bounds (glibc
    abort, exit 134): it is refused in one line, before anything is loaded."""
    _edit_checkpoint(run_copy, lambda s: _optimizer(s)["state"][0].update(
        exp_avg=torch.zeros(3)))
    r = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--resume", str(run_copy),
                        "--epochs", "2", "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "training.optimizer.state.state[0].exp_avg is torch.float32 (3,)" in r.stderr


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


def _fit(**options):
    return lambda: fit(VAE(64, 4, (16,)), torch.zeros(50, 64), **dict(
        dict(epochs=1, batch_size=8, progress=False), **options))


# The Python API checks its arguments where the command line does: (call, message).
API_ARGUMENTS = [
    ("lr-text", _fit(lr="0.1"), "lr must be a number, got '0.1'"),
    ("batch-size-bool", _fit(batch_size=True), "batch_size must be an integer, got True"),
    ("epochs-float", _fit(epochs=1.5), "epochs must be an integer, got 1.5"),
    ("beta-nan", _fit(beta=float("nan")), "beta must be finite and >= 0, got nan"),
    ("seed-negative", _fit(seed=-1), "seed must lie in 0 ... 2**32 - 1, got -1"),
    ("compile-text", _fit(compile="yes"), "compile must be True or False, got 'yes'"),
    ("beta-sites-text", _fit(beta_sites="z"), "beta_sites must be a list of site names"),
    ("device-meta", _fit(device="meta"),
     "device 'meta' is not a device this package trains on"),
    ("device-absent", _fit(device=f"cuda:{torch.cuda.device_count()}"),
     f"device 'cuda:{torch.cuda.device_count()}' asked for, but"),
    ("hooks-object", _fit(hooks=[object()]),
     "hooks holds object, neither a pyro_vae.Hook nor a function"),
    ("hooks-one-hook", _fit(hooks=pv.EarlyStopping(2)), "hooks must be a list of hooks"),
    ("particles-memory", _fit(num_particles=10 ** 12),
     "steps of 1000000000000 particles x 8 points x 64 features need at least"),
    ("z-dim-zero", lambda: VAE(64, z_dim=0), "z_dim must be an integer >= 1, got 0"),
    ("hidden-zero", lambda: VAE(64, 4, (0,)), "hidden must be a sequence of integers >= 1"),
    ("part-option-nan", lambda: VAE(64, 4, (16,), prior="vamp",
                                    prior_options={"init_std": float("nan")}),
     "prior option init_std must be finite, got nan"),
    ("num-samples-zero", lambda: log_likelihood(VAE(64, 4, (16,)), torch.zeros(5, 64), 0),
     "num_samples must be an integer >= 1, got 0"),
    ("chunk-memory", lambda: log_likelihood(VAE(64, 4, (16,)), torch.zeros(10 ** 4, 64),
                                            10 ** 7, chunk=10 ** 7, batch_size=10 ** 4),
     "chunks of 10000000 samples x 10000 points x 64 features need at least"),
    ("elbo-batch-size", lambda: pv_elbo(VAE(64, 4, (16,)), torch.zeros(5, 64), batch_size=0),
     "batch_size must be an integer >= 1, got 0"),
    ("load-run-device", lambda: load_run("nowhere", device="meta"),
     "device 'meta' is not a device this package trains on"),
    ("config-kind", lambda: train_run(TrainConfig(epochs="3")),
     "--epochs must be an integer, got '3'"),
    ("config-path", lambda: train_run(TrainConfig(out=Path("somewhere"))),
     "--out must be a string, got PosixPath('somewhere')"),
]


@pytest.mark.parametrize("call, message", [a[1:] for a in API_ARGUMENTS],
                         ids=[a[0] for a in API_ARGUMENTS])
def test_the_python_api_checks_its_arguments_in_one_line(call, message, tmp_path,
                                                          monkeypatch):
    """Not a TypeError from a comparison, an AssertionError from torch's CUDA stub or a
    failure after a whole epoch: one line naming the argument, before any work."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
