"""Data sets as whole tensors: the MNIST family, Caltech 101 Silhouettes, Frey Faces,
binarization, and the embedded default.

``load(name, data_dir=None)`` returns ``(train, valid, test)``, three ``TensorDataset``
objects. The data root is ``data_dir``, else ``$PYRO_VAE_DATA``, else
``~/.cache/pyro_vae``; it holds one folder per data set (``mnist/``, ``fashion-mnist/``,
``binarized-mnist/``, ``caltech101-silhouettes/``, ``frey-faces/``). Missing files are
downloaded where a mirror is known into a temporary file, md5-checked, then renamed into
place. Every file is md5-checked on its decompressed content, so a gzipped or a plain copy
both pass and a truncated or corrupt one is an error naming it. Files are read as
untrusted input: only regular files, checked against their known sizes before anything is
decompressed, and decompressed (or downloaded) no further than those sizes allow.
"""

import dataclasses
import gzip
import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .errors import MissingData
from .files import open_regular

ENV_VAR = "PYRO_VAE_DATA"

# name -> folder, files {plain file name: md5 of the decompressed content}, sizes {plain
# file name: bytes decompressed}, remote suffix, mirrors. Files may be stored locally as
# `name` or `name.gz`.
_IDX_SIZES = {"train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008,
              "t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008}
_MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                  "http://yann.lecun.com/exdb/mnist/"]
SOURCES: Dict[str, dict] = {
    "mnist": dict(folder="mnist", suffix=".gz", mirrors=_MNIST_MIRRORS, files={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }, sizes=_IDX_SIZES),
    "fashion-mnist": dict(
        folder="fashion-mnist", suffix=".gz",
        mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"], files={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        }, sizes=_IDX_SIZES),
    "binarized-mnist": dict(
        folder="binarized-mnist", suffix="",
        mirrors=["http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"],
        files={
            "binarized_mnist_train.amat": "db28b1a6ae0fe70cbd3da91acf46e477",
            "binarized_mnist_valid.amat": "bf37822a04e94123630de6a7dfd9c9ef",
            "binarized_mnist_test.amat": "14e41ae11040adba6ab8cb291eda0dd8",
        }, sizes={"binarized_mnist_train.amat": 78400000,
                  "binarized_mnist_valid.amat": 15680000,
                  "binarized_mnist_test.amat": 15680000}),
    "caltech101": dict(
        folder="caltech101-silhouettes", suffix="",
        mirrors=["https://people.cs.umass.edu/~marlin/data/"],
        files={"caltech101_silhouettes_28.mat": "1432d2809e8bf111f1104a234731ddb1"},
        sizes={"caltech101_silhouettes_28.mat": 701202}),
    "frey-faces": dict(  # the VampPrior paper's array, saved with numpy.save; no mirror
        folder="frey-faces", suffix="", mirrors=[],
        files={"freyfaces_uint8_1965x560.npy": "ba92189c966bec4ac7b48dd0f55cb805"},
        sizes={"freyfaces_uint8_1965x560.npy": 1100528}),
}
DATASETS = ("digits", "mnist", "fashion-mnist", "binarized-mnist", "caltech101",
            "frey-faces")
#: Split sizes of the data sets that come unsplit (train, valid, test), drawn by a
#: permutation seeded with ``split_seed``: Caltech 101 Silhouettes with the sizes of the
#: papers' split file (not its points: that file is not public), Frey Faces as the
#: VampPrior paper's code.
SPLIT_SIZES = {"caltech101": (4100, 2264, 2307), "frey-faces": (1565, 200, 200)}


@dataclasses.dataclass
class TensorDataset:
    """A whole split as tensors with a shared first dimension, batched together by index
    permutation: ``x`` (N, ...; (N, D) for the package's models) first, then ``extras`` (labels, a mask, ...). A minibatch is
    the tuple ``(x_b, *extras_b)``, passed to the model as ``model(*batch)``.

    ``dynamic_binarize``: each batch of x (and of x only) is a fresh draw ``Bernoulli(x)``
    of the gray values (Salakhutdinov & Murray 2008), as for training on gray MNIST.
    ``labels``: the points' classes where known (the built-in data sets keep them here,
    not in the batches; ``with_labels`` puts them there).
    ``spread``: a boolean mask of points to spread evenly over the batches of every
    shuffled epoch (the labelled points of a semi-supervised split): each batch of B
    holds about B * spread.mean() of them, in the random order the epoch drew.
    """

    x: torch.Tensor
    name: str = "data"
    split: str = "given"
    image_shape: Optional[Tuple[int, ...]] = None
    dynamic_binarize: bool = False
    labels: Optional[torch.Tensor] = None
    extras: Tuple[torch.Tensor, ...] = ()
    spread: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.x.dim() < 1:
            raise ValueError(f"{self.name} {self.split}: x must have a first (data) "
                             f"dimension, got a scalar")
        self.extras = tuple(self.extras)
        for i, t in enumerate(self.extras):
            if not isinstance(t, torch.Tensor) or len(t) != len(self.x):
                raise ValueError(f"{self.name} {self.split}: tensor {i + 1} has "
                                 f"{len(t) if isinstance(t, torch.Tensor) else 'no'} rows, "
                                 f"x has {len(self.x)}")
        if self.dynamic_binarize and not bool(((self.x >= 0) & (self.x <= 1)).all()):
            raise ValueError(f"{self.name} {self.split}: dynamic binarization needs "
                             f"values in [0, 1]")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """``(x, *extras)``: what a batch holds."""
        return (self.x,) + self.extras

    @property
    def device(self) -> torch.device:
        return self.x.device

    def _map(self, f) -> "TensorDataset":
        labels = None if self.labels is None else f(self.labels)
        spread = None if self.spread is None else f(self.spread)
        return dataclasses.replace(self, x=f(self.x), labels=labels, spread=spread,
                                   extras=tuple(f(t) for t in self.extras))

    def to(self, device) -> "TensorDataset":
        """The same split with every tensor on ``device`` (a new ``TensorDataset``)."""
        return self._map(lambda t: t.to(device))

    def subset(self, n: Optional[int]) -> "TensorDataset":
        """The first n points (all if n is None or larger)."""
        return self._map(lambda t: t[:n])

    def with_labels(self, known: Optional[torch.Tensor] = None) -> "TensorDataset":
        """This split with batches ``(x, y)``, or ``(x, y, known)`` given a boolean mask
        of the points whose label may be used (a semi-supervised model observes y where
        ``known`` and sums it out elsewhere)."""
        if self.labels is None:
            raise ValueError(f"{self.name} {self.split}: the data set has no labels")
        extras = (self.labels,) if known is None else (self.labels, known.to(torch.bool))
        return dataclasses.replace(self, extras=extras)

    def batches(self, batch_size: int, shuffle: bool = True,
                generator: Optional[torch.Generator] = None,
                order: Optional[torch.Tensor] = None,
                start: int = 0) -> Iterator[Tuple[torch.Tensor, ...]]:
        """Minibatches ``(x_b, *extras_b)`` on the data's device; the last may be smaller.

        ``order``: visit the points in this permutation (default: a fresh one drawn from
        ``generator`` when ``shuffle``, else the stored order); ``start``: skip the first
        ``start`` batches (to continue an epoch that was interrupted).
        """
        for draw in self.draws(batch_size, shuffle, generator, order, start):
            yield draw.batch

    def draws(self, batch_size: int, shuffle: bool = True,
              generator: Optional[torch.Generator] = None,
              order: Optional[torch.Tensor] = None,
              start: int = 0) -> Iterator["Draw"]:
        """``batches``, each as a ``Draw``: its rows (``index``) and, when x is binarized
        dynamically, the key of its binarization noise (``key``, drawn from ``generator``
        as the batch is yielded), gathered when first read, so that a compiled step can
        gather it itself (``pyro_vae.fused``)."""
        n = len(self.x)
        if order is None and shuffle:
            order = torch.randperm(n, device=self.device, generator=generator)
        if order is not None and self.spread is not None:
            order = spread_evenly(order, self.spread)
        for i in range(start * batch_size, n, batch_size):
            index = slice(i, i + batch_size) if order is None else order[i:i + batch_size]
            if self.device.type != "cpu":  # torch.bernoulli's own draw, as it is yielded
                yield Draw(self, index, None, self.gather(index, None, generator))
                continue
            key = self.noise_key(generator) if self.dynamic_binarize else None
            yield Draw(self, index, key)

    def noise_key(self, generator: Optional[torch.Generator] = None
                  ) -> Optional[torch.Tensor]:
        """The key of one batch's binarization noise (``uniforms``): two 32-bit integers
        drawn from ``generator``, as an int64 tensor of shape (2,). The generator decides
        every batch's noise, and its state after a batch (saved with a checkpoint) the
        noise of the batches after it. None on other devices than the CPU, where
        ``binarize`` calls ``torch.bernoulli`` itself.

        (Earlier builds of the package drew one uniform per value from the generator,
        ``torch.bernoulli``'s draws. A checkpoint of theirs still resumes, from its
        generator state; the batches after it draw this noise, not the uniforms the
        interrupted run would have drawn.)"""
        if self.device.type != "cpu":
            return None
        return torch.randint(0, 1 << 32, (2,), generator=generator, dtype=torch.int64)

    def gather(self, index, key: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, ...]:
        """The minibatch of the rows ``index`` (a slice or index tensor), x binarized
        with the noise of ``key`` (see ``noise_key``) when the data are binarized
        dynamically."""
        return gather(self.tensors, index, self.dynamic_binarize, key, generator)

    def support_view(self) -> Tuple[torch.Tensor, ...]:
        """The tensors with x as the model may see it: a dynamically binarized x is
        replaced by one possible draw (``ceil``), for support checks."""
        x = self.x.ceil() if self.dynamic_binarize else self.x
        return (x,) + self.extras


def gather(tensors: Tuple[torch.Tensor, ...], index, dynamic_binarize: bool = False,
           key: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None,
           every_value: bool = False) -> Tuple[torch.Tensor, ...]:
    """The rows ``index`` (a slice or an index tensor) of ``tensors`` (x first), x
    binarized (``binarize``, with ``key`` and ``every_value``) when
    ``dynamic_binarize``: ``TensorDataset.gather``, as a function of tensors alone (a
    compiled step records it)."""
    if isinstance(index, slice):
        batch = tuple(t[index] for t in tensors)
    else:  # index_select: no host sync
        batch = tuple(t.index_select(0, index) for t in tensors)
    if dynamic_binarize:
        batch = (binarize(batch[0], key, generator, every_value),) + batch[1:]
    return batch


#: lowbias32's multipliers (Chris Wellons, "hash-prospector") as int32 words: the second,
#: 0x846CA68B, is above 2^31 and is written as the signed number equal to it modulo 2^32.
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B - (1 << 32))


def _words(h: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2^32) as int32 words (two's complement: those from 2^31 on become
    negative); int32 tensors as they are."""
    if h.dtype == torch.int32:
        return h
    return (h - ((h >> 31) << 32)).to(torch.int32)


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 words. Products wrap modulo 2^32, which is the 32-bit hash's
    own arithmetic; the right shifts are masked to shift in zeros, as on unsigned
    words. (32-bit vector products are native on x86 CPUs; 64-bit ones are not on AVX2,
    and the int64 form of this hash took twice the time.)"""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MULTIPLIERS[0]
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _MULTIPLIERS[1]
    return h ^ ((h >> 16) & 0xFFFF)


def mix32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons), a bijection of the 32-bit integers whose every input bit
    changes every output bit with a probability close to 1/2, on an int64 tensor of
    values in [0, 2^32) (returned in the same range)."""
    return _lowbias32(_words(h)).to(torch.int64) & 0xFFFFFFFF


def uniforms(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1), float32: for each ``counter`` (integers in
    [0, 2^32): int64, or int32 below 2^31), h = mix32(mix32(counter ^ key[0]) ^ key[1])
    and u = (h >> 8) / 2^24, its top 24 bits (``key``: two integers in [0, 2^32),
    ``TensorDataset.noise_key``). For one key, distinct counters give distinct h (mix32
    is a bijection). Tensor operations alone, on 32-bit words, so a compiled graph
    computes the very same bits in one kernel."""
    key = _words(key)
    h = _lowbias32(_lowbias32(_words(counter) ^ key[0]) ^ key[1])
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def binarize(x: torch.Tensor, key: Optional[torch.Tensor],
             generator: Optional[torch.Generator] = None,
             every_value: bool = False) -> torch.Tensor:
    """A draw of ``Bernoulli(x)``: 1 where ``uniforms(key, i) < x_i``, the counter i
    being each value's position in x (row-major; x of fewer than 2^32 values); so
    P(1) = ceil(x 2^24) / 2^24, within 6e-8 of x. Without ``key``:
    ``torch.bernoulli(x, generator=generator)``.

    Values of 0 and 1 draw 0 and 1 whatever the uniform: eagerly the uniforms are
    computed for the values strictly between alone (four fifths of MNIST's pixels are
    0), which gives the same bits; ``every_value``: for all values (a recorded graph,
    whose shapes cannot depend on the data)."""
    if key is None:
        return torch.bernoulli(x, generator=generator)
    flat = x.reshape(-1)
    if every_value:
        small = flat.numel() < 1 << 31  # int32 counters: one conversion less per value
        u = uniforms(key, torch.arange(flat.numel(), device=x.device,
                                       dtype=torch.int32 if small else torch.int64))
        return (u.to(x.dtype) < flat).to(x.dtype).view(x.shape)
    out = flat.floor()  # 0 and 1 draw themselves, and the others start at 0
    between = (flat - out).nonzero().squeeze(1)
    out[between] = (uniforms(key, between).to(x.dtype) < flat[between]).to(x.dtype)
    return out.view(x.shape)


class Draw:
    """One minibatch of a ``TensorDataset`` (``draws``): reads as the tuple
    ``(x_b, *extras_b)``, gathered when first read (``batch``). ``data``, ``index`` (its
    rows: a slice or an index tensor) and ``key`` (its binarization noise's,
    ``TensorDataset.noise_key``, or None) say what it is, so that a compiled step can
    gather it itself (``pyro_vae.fused``); ``size`` is its number of points."""

    def __init__(self, data: "TensorDataset", index, key: Optional[torch.Tensor],
                 batch: Optional[Tuple[torch.Tensor, ...]] = None):
        self.data, self.index, self.key, self._batch = data, index, key, batch
        self.size = (len(range(len(data))[index]) if isinstance(index, slice)
                     else len(index))

    @property
    def batch(self) -> Tuple[torch.Tensor, ...]:
        """The gathered tensors."""
        if self._batch is None:
            self._batch = self.data.gather(self.index, self.key)
        return self._batch

    def __len__(self) -> int:
        return len(self.batch)

    def __iter__(self):
        return iter(self.batch)

    def __getitem__(self, i):
        return self.batch[i]


def spread_evenly(order: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``order`` (a permutation) rearranged so that the points where ``mask`` is True
    sit evenly among the others, each group keeping its order in ``order``: the j-th
    of the n1 marked points goes to relative position (j + 1/2) / n1, the k-th of the n0
    others to (k + 1/2) / n0, and the two sequences are merged by position."""
    marked = mask[order]
    n1 = marked.sum()
    n0 = len(order) - n1
    rank1 = marked.cumsum(0) - 0.5
    rank0 = (~marked).cumsum(0) - 0.5
    position = torch.where(marked, rank1 / n1.clamp(min=1), rank0 / n0.clamp(min=1))
    return order[torch.sort(position, stable=True).indices]


def as_dataset(data, name: str = "data", split: str = "given") -> TensorDataset:
    """``data`` as a ``TensorDataset``: one already, PyTorch's
    ``torch.utils.data.TensorDataset`` (its tensors), a tensor (N, D), or a tuple of
    tensors with a shared first dimension (x first). ``name`` and ``split`` name it in
    errors; a ``TypeError`` names the class of anything else by its full path.

    Example:
        >>> import torch
        >>> data = as_dataset((torch.rand(5, 3), torch.arange(5)))
        >>> len(data), tuple(data.x.shape)
        (5, (5, 3))
    """
    if isinstance(data, TensorDataset):
        return data
    if isinstance(data, torch.utils.data.TensorDataset):
        data = data.tensors
    if isinstance(data, torch.Tensor):
        data = (data,)
    if not (isinstance(data, (tuple, list)) and data
            and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"{name}: expected a pyro_vae.datasets.TensorDataset, a "
                        f"torch.utils.data.TensorDataset, a torch.Tensor or a tuple of "
                        f"tensors, got {qualified_name(data)}")
    return TensorDataset(data[0], name, split, extras=tuple(data[1:]))


def qualified_name(value) -> str:
    """The full import path of ``value``'s class: ``numpy.ndarray``,
    ``torch.utils.data.dataset.TensorDataset``; a list or tuple also shows its items'
    classes, ``list of [numpy.ndarray]``."""
    cls = type(value)
    name = cls.__qualname__ if cls.__module__ == "builtins" else \
        f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(value, (list, tuple)) and value:
        items = sorted({qualified_name(v) for v in value})
        name += f" of [{', '.join(items)}]"
    return name


def data_root(data_dir=None) -> Path:
    """``data_dir``, else ``$PYRO_VAE_DATA``, else ``~/.cache/pyro_vae``."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyro_vae"


def gzip_bound(size: int) -> int:
    """The most bytes a gzip file of ``size`` bytes of content can take (deflate's stored
    blocks add 5 bytes per 16 KiB; the header and trailer a few dozen, plus a name)."""
    return size + 5 * (size // 16384 + 1) + 1024


def _read_verified(path: Path, md5: str, size: int, gz: Optional[bool] = None) -> bytes:
    """The decompressed bytes of ``path`` (gzip if it ends in .gz), checked: a regular
    file, of ``size`` bytes (a gzip no larger than that content can take, and
    decompressed no further than ``size`` + 1 bytes: a bomb stops there), md5-checked."""
    gz = path.suffix == ".gz" if gz is None else gz
    fix = "delete it and download it again"
    try:
        with open_regular(path, "data file") as f:
            stored = os.fstat(f.fileno()).st_size
            if stored > (gzip_bound(size) if gz else size):
                raise ValueError(f"{path}: {stored} bytes, more than the {size} bytes of "
                                 f"its content{' compressed' if gz else ''} can take; the "
                                 f"file is not the expected one, {fix}")
            raw = (gzip.GzipFile(fileobj=f) if gz else f).read(size + 1)
    except PermissionError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror}); check its "
                         f"permissions") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: truncated or corrupt ({reason}); {fix}") from None
    if len(raw) != size:
        got = "more" if len(raw) > size else len(raw)
        raise ValueError(f"{path}: {got} bytes of content, expected {size}; the file is "
                         f"truncated or corrupt, {fix}")
    got = hashlib.md5(raw).hexdigest()
    if got != md5:
        raise ValueError(f"{path}: md5 of the content is {got}, expected {md5}; the file "
                         f"is truncated or corrupt, {fix}")
    return raw


def _download(url: str, dest: Path, md5: str, size: int) -> bytes:
    """Download ``url`` into a temporary file beside ``dest``, check it, rename it into
    place, and return its verified content. Nothing is left behind on failure, and no
    more is downloaded than a file of ``size`` bytes of content can take."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    gz = dest.suffix == ".gz"
    bound = gzip_bound(size) if gz else size
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as r:
            received = 0
            while chunk := r.read(1 << 20):
                received += len(chunk)
                if received > bound:
                    raise ValueError(f"{url}: more than {bound} bytes; not the expected file")
                try:
                    f.write(chunk)
                except OSError as e:  # a full disk: name the file, not only the URL
                    raise OSError(f"{tmp}: not written ({e.strerror or e})") from None
        raw = _read_verified(Path(tmp), md5, size, gz=gz)
        os.replace(tmp, dest)
        return raw
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch(name: str, data_dir=None, download: bool = True) -> Dict[str, bytes]:
    """The verified, decompressed content of every file of data set ``name``."""
    src = SOURCES[name]
    folder = data_root(data_dir) / src["folder"]
    out, missing = {}, []
    for fname, md5 in src["files"].items():
        local = [p for p in (folder / (fname + ".gz"), folder / fname) if p.exists()]
        if local:
            out[fname] = _read_verified(local[0], md5, src["sizes"][fname])
        else:
            missing.append(fname)
    if missing and download:
        errors = []
        for fname in missing:
            remote = fname + src["suffix"]
            for mirror in src["mirrors"]:
                try:
                    out[fname] = _download(mirror + remote, folder / remote,
                                           src["files"][fname], src["sizes"][fname])
                    break
                except (urllib.error.URLError, OSError, ValueError) as e:
                    errors.append(f"{mirror + remote}: {e}")
        missing = [f for f in missing if f not in out]
    if missing:
        raise MissingData(
            f"{folder} lacks {', '.join(m + src['suffix'] for m in missing)} "
            f"(expected: {', '.join(f + src['suffix'] for f in src['files'])}); "
            + (f"download failed ({errors[-1]})" if download and errors
               else "it has no download mirror" if download else "downloads are off")
            + f"; put the files there or point {{argument}} / ${ENV_VAR} at a folder "
              f"holding {src['folder']}/")
    return out


def read_idx(raw: bytes, magic: int, source: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format): big-endian magic, dims, uint8 payload."""
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(f"{source}: IDX magic number is {got}, expected {magic}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{source}: IDX header says {dims} but the payload has "
                         f"{len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def read_amat(raw: bytes, source: str = "amat data", dim: int = 784) -> np.ndarray:
    """Parse Larochelle's binary ``.amat`` text: one row of '0'/'1' per line, spaces."""
    width = 2 * dim  # dim digits, dim - 1 spaces and a newline
    arr = np.frombuffer(raw, dtype=np.uint8)
    if len(arr) % width != 0:
        raise ValueError(f"{source}: {len(arr)} bytes is not a whole number of "
                         f"{dim}-value rows")
    arr = arr.reshape(-1, width)
    digits, seps = arr[:, 0::2] - ord("0"), arr[:, 1::2]
    if (digits > 1).any() or (seps[:, :-1] != ord(" ")).any() or (seps[:, -1] != ord("\n")).any():
        raise ValueError(f"{source}: not rows of {dim} space-separated 0/1 values")
    return digits


def _gray(arr: np.ndarray) -> torch.Tensor:
    flat = arr.reshape(len(arr), int(np.prod(arr.shape[1:])))  # also with no images
    return torch.from_numpy(flat.astype(np.float32) / 255.0)


def _load_idx_family(name, data_dir, download):
    raw = fetch(name, data_dir, download)
    folder = data_root(data_dir) / SOURCES[name]["folder"]

    def part(stem):
        images, labels = f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte"
        images = read_idx(raw[images], 2051, str(folder / images))
        labels = read_idx(raw[labels], 2049, str(folder / labels))
        if len(images) != len(labels):
            raise ValueError(f"{folder / stem}-*: {len(images)} images but {len(labels)} "
                             f"labels")
        return _gray(images), torch.from_numpy(labels.astype(np.int64))

    (x, y), (xt, yt) = part("train"), part("t10k")
    # The standard 50k/10k split of the training file (VampPrior and IWAE papers).
    return [(x[:50000], y[:50000]), (x[50000:], y[50000:]), (xt, yt)], (28, 28)


def _load_binarized(data_dir, download):
    raw = fetch("binarized-mnist", data_dir, download)
    splits = []
    for split in ("train", "valid", "test"):
        fname = f"binarized_mnist_{split}.amat"
        arr = read_amat(raw[fname], fname)
        splits.append((torch.from_numpy(arr.astype(np.float32)), None))
    return splits, (28, 28)


def _seeded_split(x, y, sizes, seed):
    """``[(x, y) of each split]``: one permutation seeded with ``seed``, cut by sizes."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[order]
    y = None if y is None else y[order]
    bounds = np.cumsum((0,) + tuple(sizes))
    return [(x[a:b], None if y is None else y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _load_caltech101(data_dir, download, split_seed):
    """Caltech 101 Silhouettes 28 x 28 (Marlin et al. 2010): 8671 binary images, stored
    column-major with 1 for the background; read with the object as 1, as the papers'
    code does. Labels are the classes 0-100."""
    from scipy.io import loadmat  # a MATLAB v5 reader: parses data, runs no code

    fname = "caltech101_silhouettes_28.mat"
    path = data_root(data_dir) / SOURCES["caltech101"]["folder"] / fname
    raw = fetch("caltech101", data_dir, download)[fname]
    try:
        mat = loadmat(io.BytesIO(raw))
        images, classes = np.asarray(mat["X"]), np.asarray(mat["Y"]).reshape(-1)
    except Exception as e:
        raise ValueError(f"{path}: not a Caltech 101 Silhouettes .mat file with X and Y "
                         f"({type(e).__name__})") from None
    if images.shape != (8671, 784) or len(classes) != 8671:
        raise ValueError(f"{path}: X has shape {images.shape}, expected (8671, 784)")
    images = images.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784)  # column-major
    x = torch.from_numpy(1.0 - images.astype(np.float32))
    y = torch.from_numpy(classes.astype(np.int64) - 1)
    return _seeded_split(x, y, SPLIT_SIZES["caltech101"], split_seed), (28, 28)


def _load_frey(data_dir, download, split_seed):
    """Frey Faces: 1965 gray 28 x 20 images, uint8 / 255 (so on the 256-level grid)."""
    fname = "freyfaces_uint8_1965x560.npy"
    path = data_root(data_dir) / SOURCES["frey-faces"]["folder"] / fname
    raw = fetch("frey-faces", data_dir, download)[fname]
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a .npy array ({str(e).splitlines()[0]})") from None
    if arr.shape != (1965, 560) or arr.dtype != np.uint8:
        raise ValueError(f"{path}: holds {arr.dtype} {arr.shape}, expected uint8 "
                         f"(1965, 560)")
    return _seeded_split(_gray(arr), None, SPLIT_SIZES["frey-faces"], split_seed), (28, 20)


def _load_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    # 1797 images: 1297 / 250 / 250.
    return [(x[:1297], y[:1297]), (x[1297:1547], y[1297:1547]), (x[1547:], y[1547:])], (8, 8)


def load(name: str, data_dir=None, binarize: bool = True, seed: int = 0,
         download: bool = True, split_seed: int = 0) -> List[TensorDataset]:
    """``[train, valid, test]`` of data set ``name`` (one of ``DATASETS``), on the CPU.

    Gray data with ``binarize=True``: training batches are binarized dynamically; the
    validation and test splits are binarized once with a fixed ``seed``, so every
    evaluation sees the same binary images. ``binarized-mnist`` and ``caltech101`` are
    binary already. ``caltech101`` and ``frey-faces`` come unsplit: ``split_seed`` draws
    their split (``SPLIT_SIZES``), the same for every run unless changed.
    """
    if name == "digits":
        splits, shape = _load_digits()
    elif name in ("mnist", "fashion-mnist"):
        splits, shape = _load_idx_family(name, data_dir, download)
    elif name == "binarized-mnist":
        splits, shape = _load_binarized(data_dir, download)
    elif name == "caltech101":
        splits, shape = _load_caltech101(data_dir, download, split_seed)
    elif name == "frey-faces":
        splits, shape = _load_frey(data_dir, download, split_seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    binarize = binarize and name not in ("binarized-mnist", "caltech101")  # binary already
    gen = torch.Generator().manual_seed(seed)
    out = []
    for split, (x, y) in zip(("train", "valid", "test"), splits):
        dynamic = binarize and split == "train"
        if binarize and split != "train":
            x = torch.bernoulli(x, generator=gen)
        out.append(TensorDataset(x, name, split, shape, dynamic, y))
    return out
