import gzip
import hashlib
import os
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
                  files={k: hashlib.md5(v).hexdigest() for k, v in payload.items()},
                  sizes={k: len(v) for k, v in payload.items()})
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
    # In Python it names the Python argument (the command line names --data-dir).
    assert msg.endswith("; put the files there or point data_dir= / $PYRO_VAE_DATA at a "
                        "folder holding mnist/")


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
    sizes = dict(SOURCES["mnist"]["sizes"], **{"train-labels-idx1-ubyte": len(short)})
    monkeypatch.setitem(SOURCES, "mnist", dict(SOURCES["mnist"], files=files, sizes=sizes))
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


def _lowbias32(h: int) -> int:
    """Wellons' lowbias32 on Python integers, as published (multipliers 0x7feb352d and
    0x846ca68b)."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_the_binarization_hash_is_lowbias32_on_32_bit_words():
    """``mix32`` is lowbias32 exactly, on the edges of its range too (words from 2^31 on,
    which int32 holds as negative numbers, and products that wrap), and ``uniforms`` its
    composition with the key, for int64 counters and for int32 ones."""
    from pyro_vae.datasets import mix32, uniforms

    values = [0, 1, 2, 255, 65535, 65536, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 2**32 - 1]
    assert mix32(torch.tensor(values)).tolist() == [_lowbias32(v) for v in values]
    key = torch.tensor([2**32 - 1, 12345])
    expected = [(_lowbias32(_lowbias32(c ^ (2**32 - 1)) ^ 12345) >> 8) / 2**24
                for c in values]
    got = uniforms(key, torch.tensor(values))
    assert got.dtype == torch.float32 and got.tolist() == expected
    small = [v for v in values if v < 2**31]
    assert uniforms(key, torch.tensor(small, dtype=torch.int32)).tolist() == \
        [e for v, e in zip(values, expected) if v < 2**31]


def test_counter_uniforms_are_uniform_and_uncorrelated():
    """One key's uniforms over 10^6 counters: their 64-bin histogram passes a chi-square
    test and their mean is 1/2; neighbouring counters (the next pixel, the next row of
    784), and two keys (two batches, and keys one bit apart) give uncorrelated streams.
    Tolerances: the mean's sd is (12 n)^-1/2 = 2.9e-4, allowed 5 sd = 1.5e-3; a sample
    correlation's sd is n^-1/2 = 1e-3, allowed 5 sd = 5e-3; chi-square on 63 degrees of
    freedom between its 1e-6 and 1 - 1e-6 quantiles, 23.2 and 131.4 (a weak mixer fails
    either way: too even a histogram, or too uneven)."""
    from pyro_vae.datasets import uniforms

    n = 10**6
    counters = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    keys = [torch.randint(0, 2**32, (2,), generator=g) for _ in range(2)]
    u = uniforms(keys[0], counters).double()
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert 23.2 < chi2 < 131.4, chi2
    assert abs(float(u.mean()) - 0.5) < 1.5e-3
    assert float(u.min()) >= 0 and float(u.max()) < 1

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr(u[:-1], u[1:])) < 5e-3           # next pixel
    assert abs(corr(u[:-784], u[784:])) < 5e-3       # the same pixel, next row
    other = uniforms(keys[1], counters).double()
    assert abs(corr(u, other)) < 5e-3                # another batch
    for flipped in (keys[0] ^ torch.tensor([1, 0]), keys[0] ^ torch.tensor([0, 1])):
        assert abs(corr(u, uniforms(flipped, counters).double())) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_binarization_hashes_keys_drawn_from_the_data_generator(dtype):
    """On the CPU each batch draws a key (two 32-bit integers) from the data generator
    after the epoch's permutation, and its binarization is ``uniforms(key, position) <
    x``, epoch after epoch: the generator decides every batch, and its state after a
    batch the rest. Eagerly only values strictly between 0 and 1 are hashed; that gives
    the bits of hashing every value."""
    from pyro_vae.datasets import binarize, uniforms

    x = torch.rand(230, 17, dtype=dtype)
    x[x < 0.3] = 0  # MNIST-like: many exact zeros and ones, and values in between
    x[x > 0.9] = 1
    data = TensorDataset(x, "toy", "train", dynamic_binarize=True, extras=(torch.arange(230),))
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):  # two epochs: the permutation and the keys share one stream
        order = torch.randperm(230, generator=theirs)
        expected = []
        for i in range(0, 230, 64):
            key = torch.randint(0, 2**32, (2,), generator=theirs)
            rows = x[order[i:i + 64]]
            u = uniforms(key, torch.arange(rows.numel())).view(rows.shape)
            expected.append((u.to(dtype) < rows).to(dtype))
            assert torch.equal(binarize(rows, key), binarize(rows, key, every_value=True))
        got = [b[0] for b in data.batches(64, generator=ours)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 4
        assert got[0].dtype == dtype
    assert torch.equal(ours.get_state(), theirs.get_state())
    for shape in [(230 * 17,), (10, 23, 17)]:  # positions are row-major whatever the shape
        y = x.reshape(shape)
        assert torch.equal(binarize(y, key, every_value=True), binarize(y, key))


def test_binarized_values_average_to_the_gray_values():
    """Over 2000 keys each value's draws average to it (sd at most (0.25 / 2000)^1/2 =
    0.011; allowed 0.05), and all values' to their mean (sd at most (0.25 / 2e7)^1/2 =
    1.1e-4; allowed 6e-4); 0 and 1 draw 0 and 1 always."""
    from pyro_vae.datasets import binarize

    torch.manual_seed(0)
    x = torch.rand(100, 100)
    x[:, :10], x[:, 10:20] = 0, 1
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([binarize(x, torch.randint(0, 2**32, (2,), generator=g))
                         for _ in range(2000)])
    mean = draws.double().mean(0)
    assert float((mean - x).abs().max()) < 0.05
    assert abs(float(mean.mean() - x.double().mean())) < 6e-4
    assert bool((mean[:, :10] == 0).all() and (mean[:, 10:20] == 1).all())


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
    with pytest.raises(TypeError, match=r"^data: expected a pyro_vae.datasets.TensorDataset, "
                                        r"a torch.utils.data.TensorDataset, a torch.Tensor "
                                        r"or a tuple of tensors, got list of \[int\]$"):
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


def _needs(data_root, folder):
    if not (data_root / folder).is_dir():
        pytest.skip(f"{data_root / folder} not found")


def test_real_caltech101_silhouettes(data_root):
    _needs(data_root, "caltech101-silhouettes")
    from scipy.io import loadmat

    splits = load("caltech101", data_root)  # binary already: never binarized
    assert [len(s) for s in splits] == [4100, 2264, 2307]
    assert all(s.image_shape == (28, 28) and not s.dynamic_binarize for s in splits)
    x = torch.cat([s.x for s in splits])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    # From the data's README: X has mean 0.5439 with 1 for the background; read with the
    # object as 1, as the papers' code does.
    assert x.mean().item() == pytest.approx(1 - 0.5439, abs=5e-5)
    y = torch.cat([s.labels for s in splits])
    assert y.min().item() == 0 and y.max().item() == 100 and len(y.unique()) == 101
    # Each image is the file's column-major 28 x 28, in the order the seeded split drew.
    mat = loadmat(str(data_root / "caltech101-silhouettes" / "caltech101_silhouettes_28.mat"))
    order = torch.randperm(8671, generator=torch.Generator().manual_seed(0))
    for i in (0, 5000, 8670):
        j = order[i].item()
        image = 1.0 - mat["X"][j].reshape(28, 28, order="F").astype(np.float32)
        assert torch.equal(x[i].reshape(28, 28), torch.from_numpy(image))
        assert y[i].item() == int(mat["Y"][0, j]) - 1


def test_real_frey_faces_and_its_seeded_split(data_root):
    _needs(data_root, "frey-faces")
    train, valid, test = load("frey-faces", data_root, binarize=False)
    assert [len(s) for s in (train, valid, test)] == [1565, 200, 200]
    assert train.image_shape == (28, 20) and train.x.shape[1] == 560
    assert train.labels is None and not train.dynamic_binarize
    x = torch.cat([train.x, valid.x, test.x])
    # From the data's README: uint8 values 8-238, mean 154.46; read as value / 255.
    assert (x.min().item() * 255, x.max().item() * 255) == pytest.approx((8, 238))
    assert x.mean().item() * 255 == pytest.approx(154.46, abs=5e-3)
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)
    # The split is a function of split_seed alone (not of the run's seed) ...
    again = load("frey-faces", data_root, binarize=False, seed=7)
    assert all(torch.equal(a.x, b.x) for a, b in zip((train, valid, test), again))
    other = load("frey-faces", data_root, binarize=False, split_seed=1)
    assert not torch.equal(other[2].x, test.x)
    # ... and a partition of the 1965 images.
    raw = np.load(data_root / "frey-faces" / "freyfaces_uint8_1965x560.npy")
    key = lambda t: sorted(map(tuple, (t * 255).round().to(torch.int64).tolist()))  # noqa
    assert key(x) == sorted(map(tuple, raw.astype(np.int64).tolist()))
    assert key(torch.cat([o.x for o in other])) == key(x)


def test_frey_faces_damaged_or_missing_file_is_one_line_naming_it(data_root, tmp_path):
    _needs(data_root, "frey-faces")
    name = "freyfaces_uint8_1965x560.npy"
    folder = tmp_path / "frey-faces"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{folder} lacks {name} .*it has no "
                                                f"download mirror") as missing:
        load("frey-faces", tmp_path)
    raw = bytearray((data_root / "frey-faces" / name).read_bytes())
    raw[-1] ^= 1
    (folder / name).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{folder / name}: md5 of the content is") as bad:
        load("frey-faces", tmp_path)
    assert "\n" not in str(missing.value) + str(bad.value)


def test_a_gzip_bomb_is_decompressed_no_further_than_the_files_size(fake_mnist):
    """A .gz whose content is far larger than the file it stands for ran until memory
    ran out; it stops one byte past the expected size."""
    root, _, payload = fake_mnist
    datasets.fetch("mnist", root)
    bomb = root / "mnist" / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(bytes(8 << 20)))  # 8 MB of zeros in 8 KB
    size = len(payload["train-images-idx3-ubyte"])
    assert bomb.stat().st_size <= datasets.gzip_bound(size)  # passes the size check
    with pytest.raises(ValueError) as e:
        datasets.fetch("mnist", root)
    assert str(e.value) == (f"{bomb}: more bytes of content, expected {size}; the file is "
                            f"truncated or corrupt, delete it and download it again")


def test_a_data_file_that_is_a_device_or_too_large_is_refused(fake_mnist):
    root, _, payload = fake_mnist
    datasets.fetch("mnist", root)
    size = len(payload["t10k-labels-idx1-ubyte"])
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=f"{path}: a character device, not a regular file"):
        datasets.fetch("mnist", root)
    path.unlink()
    path.write_bytes(os.urandom(10 ** 6))  # far more than a gzip of 12 bytes can take
    with pytest.raises(ValueError, match=f"{path}: 1000000 bytes, more than the {size} bytes "
                                         f"of its content compressed can take"):
        datasets.fetch("mnist", root)


def test_a_download_stops_at_the_size_the_file_can_take(fake_mnist):
    root, mirror, payload = fake_mnist
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(os.urandom(10 ** 6))
    bound = datasets.gzip_bound(len(payload["t10k-labels-idx1-ubyte"]))
    with pytest.raises(FileNotFoundError, match=f"more than {bound} bytes; not the expected"):
        datasets.fetch("mnist", root)
    assert not list((root / "mnist").glob("t10k-labels*"))
