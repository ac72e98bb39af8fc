import gzip
import hashlib
import shutil

import numpy as np
import pytest
import torch

from pyro_vae import datasets
from pyro_vae.datasets import SOURCES, TensorDataset, load, read_amat, read_idx


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A tiny, self-consistent 'mnist' source served from a file:// mirror."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(12, 28, 28))
    test = rng.integers(0, 256, size=(4, 28, 28))
    payload = {
        "train-images-idx3-ubyte": _idx_bytes(train, 2051),
        "train-labels-idx1-ubyte": _idx_bytes(rng.integers(0, 10, size=12), 2049),
        "t10k-images-idx3-ubyte": _idx_bytes(test, 2051),
        "t10k-labels-idx1-ubyte": _idx_bytes(rng.integers(0, 10, size=4), 2049),
    }
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, raw in payload.items():
        (mirror / (name + ".gz")).write_bytes(gzip.compress(raw))
    source = dict(SOURCES["mnist"], mirrors=[mirror.as_uri() + "/"],
                  files={k: hashlib.md5(v).hexdigest() for k, v in payload.items()})
    monkeypatch.setitem(SOURCES, "mnist", source)
    return tmp_path / "root", mirror, payload


def test_download_checks_and_renames_into_place(fake_mnist):
    root, mirror, payload = fake_mnist
    raw = datasets.fetch("mnist", root)
    assert raw == payload
    folder = root / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(k + ".gz" for k in payload)
    # A second call reads the local, verified copies (the mirror is gone now).
    shutil.rmtree(mirror)
    assert datasets.fetch("mnist", root) == payload


def test_download_with_bad_checksum_leaves_nothing(fake_mnist):
    root, mirror, payload = fake_mnist
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not the labels"))
    with pytest.raises(FileNotFoundError) as e:
        datasets.fetch("mnist", root)
    msg = str(e.value)
    assert str(root / "mnist") in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "\n" not in msg
    # The three good files are in place; the bad one left neither itself nor a .part.
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(
        k + ".gz" for k in payload if k != "t10k-labels-idx1-ubyte")


def test_missing_files_offline_name_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        datasets.fetch("mnist", tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "mnist") in msg
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in msg
    assert "\n" not in msg


def test_unreachable_mirror_gives_the_missing_files_error(fake_mnist):
    root, mirror, _ = fake_mnist
    shutil.rmtree(mirror)
    with pytest.raises(FileNotFoundError, match="download failed"):
        datasets.fetch("mnist", root)


def test_local_md5_mismatch_names_the_file(fake_mnist):
    root, _, payload = fake_mnist
    datasets.fetch("mnist", root)
    bad = root / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = bytearray(payload["train-labels-idx1-ubyte"])
    raw[-1] ^= 1  # one flipped bit, still a valid gzip
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match=f"{bad}: md5 of the content is"):
        datasets.fetch("mnist", root)


def test_truncated_gz_names_the_file(fake_mnist):
    root, _, _ = fake_mnist
    datasets.fetch("mnist", root)
    bad = root / "mnist" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(ValueError, match=f"{bad}: truncated or corrupt"):
        datasets.fetch("mnist", root)


def test_image_and_label_counts_must_agree(fake_mnist, monkeypatch):
    """Files that each pass their checksum but do not belong together."""
    root, _, payload = fake_mnist
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for name, raw in payload.items():
        (folder / name).write_bytes(raw)
    short = _idx_bytes(np.zeros(11), 2049)  # 11 labels for 12 images
    (folder / "train-labels-idx1-ubyte").write_bytes(short)
    files = dict(SOURCES["mnist"]["files"], **{
        "train-labels-idx1-ubyte": hashlib.md5(short).hexdigest()})
    monkeypatch.setitem(SOURCES, "mnist", dict(SOURCES["mnist"], files=files))
    with pytest.raises(ValueError, match="train-\\*: 12 images but 11 labels"):
        load("mnist", root, download=False)


def test_plain_uncompressed_copy_is_accepted(fake_mnist):
    root, _, payload = fake_mnist
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for name, raw in payload.items():
        (folder / name).write_bytes(raw)
    assert datasets.fetch("mnist", root, download=False) == payload


def test_read_idx_rejects_wrong_magic_and_short_payload():
    good = _idx_bytes(np.zeros((2, 3, 3)), 2051)
    assert read_idx(good, 2051).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="images.gz: IDX magic number is 2051, expected 2049"):
        read_idx(good, 2049, "images.gz")
    with pytest.raises(ValueError, match="header says \\[2, 3, 3\\] but the payload has 17"):
        read_idx(good[:-1], 2051)


def test_read_amat_parses_and_rejects_other_layouts():
    rows = np.array([[0, 1, 1, 0], [1, 0, 0, 1]])
    text = "".join(" ".join(map(str, r)) + "\n" for r in rows).encode()
    assert np.array_equal(read_amat(text, dim=4), rows)
    with pytest.raises(ValueError, match="not rows of 4 space-separated 0/1"):
        read_amat(text.replace(b"1 0\n", b"2 0\n"), dim=4)
    with pytest.raises(ValueError, match="not a whole number"):
        read_amat(text[:-1], dim=4)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path / "env"))
    assert datasets.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert datasets.data_root() == tmp_path / "env"
    monkeypatch.delenv("PYRO_VAE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert datasets.data_root() == tmp_path / "cache" / "pyro_vae"


def test_batches_cover_each_point_once_and_binarize_dynamically():
    x = torch.rand(103, 6)
    data = TensorDataset(x, "toy", "train", (2, 3), dynamic_binarize=True)
    g = torch.Generator().manual_seed(0)
    first = torch.cat([b[0] for b in data.batches(10, generator=g)])
    second = torch.cat([b[0] for b in data.batches(10, generator=g)])
    assert first.shape == (103, 6)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)  # a fresh draw each epoch
    plain = TensorDataset(x, "toy", "valid", (2, 3))
    rows = torch.cat([b[0] for b in plain.batches(10, generator=g)])
    # A permutation of the rows: every point exactly once.
    assert torch.equal(rows[rows[:, 0].argsort()], x[x[:, 0].argsort()])
    # Dynamic binarization averages back to the gray values.
    draws = torch.stack([next(data.batches(200, shuffle=False))[0] for _ in range(2000)])
    assert torch.allclose(draws.mean(0), x, atol=0.05)  # 4 sd of a mean of 2000 draws


def test_tuple_batches_keep_rows_together_and_binarize_the_images_only():
    """A split of several tensors is batched row by row together (one permutation for
    all), dynamic binarization draws x alone, and a label mask rides along."""
    x = torch.rand(53, 4)
    y = torch.arange(53)
    known = y % 3 == 0
    data = TensorDataset(x, "toy", "train", (2, 2), dynamic_binarize=True, labels=y)
    assert [len(b) for b in data.batches(10)] == [1] * 6  # labels are not batched ...
    labelled = data.with_labels(known)                     # ... until asked for
    g = torch.Generator().manual_seed(3)
    batches = list(labelled.batches(10, generator=g))
    assert [tuple(t.shape[0] for t in b) for b in batches] == [(10, 10, 10)] * 5 + [(3, 3, 3)]
    xb, yb, kb = (torch.cat(parts) for parts in zip(*batches))
    assert sorted(yb.tolist()) == list(range(53)) and yb.dtype == torch.int64
    assert torch.equal(kb, yb % 3 == 0)                   # the mask follows its rows
    assert set(xb.unique().tolist()) <= {0.0, 1.0}        # x binarized ...
    # ... from its own row's gray values: a draw of 1 needs x > 0 in that row.
    assert bool((x[yb][xb == 1] > 0).all())
    with pytest.raises(ValueError, match="tensor 1 has 52 rows, x has 53"):
        TensorDataset(x, "toy", "train", extras=(y[:52],))
    with pytest.raises(ValueError, match="the data set has no labels"):
        TensorDataset(x, "toy", "train").with_labels()


def test_plain_tensors_and_tuples_become_data_sets():
    from pyro_vae.datasets import as_dataset

    x, y = torch.rand(7, 3), torch.zeros(7)
    assert torch.equal(next(as_dataset(x).batches(7, shuffle=False))[0], x)
    xb, yb = next(as_dataset((x, y)).batches(7, shuffle=False))
    assert torch.equal(xb, x) and torch.equal(yb, y)
    with pytest.raises(TypeError, match="expected a TensorDataset, a tensor or a tuple"):
        as_dataset([1, 2])


def test_dynamic_binarization_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        TensorDataset(torch.tensor([[0.5, 1.5]]), "toy", "train", (1, 2), dynamic_binarize=True)


def test_digits_splits_and_fixed_binarization():
    train, valid, test = load("digits")
    assert (len(train), len(valid), len(test)) == (1297, 250, 250)
    assert train.dynamic_binarize and not test.dynamic_binarize
    assert 0 <= train.x.min() and train.x.max() <= 1 and train.x.max() == 1
    assert set(test.x.unique().tolist()) == {0.0, 1.0}
    # Valid and test are binarized once with a fixed seed: reloading gives the same bits.
    assert torch.equal(load("digits")[2].x, test.x)
    assert not torch.equal(load("digits", seed=1)[2].x, test.x)
    gray = load("digits", binarize=False)
    assert not gray[0].dynamic_binarize and gray[2].x.unique().numel() == 17


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load("cifar")


def test_real_mnist(mnist, data_root):
    train, valid, test = mnist
    assert (len(train), len(valid), len(test)) == (50000, 10000, 10000)
    assert train.x.shape[1] == 784 and train.image_shape == (28, 28)
    # Mean pixel of all 60k training images, from the data's README: 33.3184 / 255.
    all_train = torch.cat([train.x, load("mnist", data_root, binarize=False)[1].x])
    assert all_train.mean().item() * 255 == pytest.approx(33.3184, abs=1e-3)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                               974, 1009]


def test_real_binarized_mnist(data_root):
    train, valid, test = load("binarized-mnist", data_root)
    assert (len(train), len(valid), len(test)) == (50000, 10000, 10000)
    assert not train.dynamic_binarize
    # Pixel means from the data's README.
    assert train.x.mean().item() == pytest.approx(0.13056, abs=1e-5)
    assert test.x.mean().item() == pytest.approx(0.13251, abs=1e-5)


def test_real_fashion_mnist(data_root):
    train, valid, test = load("fashion-mnist", data_root, binarize=False)
    assert (len(train), len(valid), len(test)) == (50000, 10000, 10000)
    # From the data's README: mean pixel 72.9404 (all 60k train) and 73.1466 (test),
    # 6000 / 1000 images per class, the first training image an ankle boot (9).
    all_train = torch.cat([train.x, valid.x])
    assert all_train.mean().item() * 255 == pytest.approx(72.9404, abs=1e-3)
    assert test.x.mean().item() * 255 == pytest.approx(73.1466, abs=1e-3)
    assert torch.cat([train.labels, valid.labels]).bincount().tolist() == [6000] * 10
    assert train.labels[0].item() == 9
