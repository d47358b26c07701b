"""Datasets for the experiments: embedded digits, seeded synthetic tasks, optional MNIST/CIFAR-10.

Every loader returns a :class:`Dataset`: train/test tensors plus what a model and a loss need to
know (input shape, output dimension, task type) and a seeded batch iterator, so that several
optimizers can see exactly the same data in exactly the same order.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).
* ``synthetic-classification`` / ``synthetic-regression``: a random teacher network, seeded.
* ``sbm``: seeded stochastic-block-model graphs for node classification (see :func:`make_sbm`).
* ``mnist``, ``fashion-mnist``, ``cifar10``: read from their original on-disk formats (IDX files,
  CIFAR-10 python pickle batches) by the readers below. Only with ``download=True`` are missing
  files fetched, through torchvision (the optional extra ``pip install thermo-kfac[vision]``).

Tasks: ``classification`` (integer labels, cross-entropy), ``regression`` (float targets, MSE) and
``autoencoder`` (inputs in [0, 1], the target is the flattened input; BCE with logits or MSE).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hw_models.validation import check_choice, check_number, check_positive

TASKS = ("classification", "regression", "autoencoder")
DATASETS = ("digits", "digits28", "synthetic-classification", "synthetic-regression", "mnist",
            "fashion-mnist", "cifar10", "sbm")
# Datasets whose examples are images, so they can also be used as an auto-encoder task.
IMAGE_DATASETS = ("digits", "digits28", "mnist", "fashion-mnist", "cifar10")
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse", "autoencoder": "bce"}
VISION_HINT = "pip install thermo-kfac[vision]"


def default_data_root() -> Path:
    """Where downloaded datasets live: ``$THERMO_KFAC_DATA`` or ``~/.cache/thermo-kfac/data``."""
    env = os.environ.get("THERMO_KFAC_DATA")
    return Path(env) if env else Path.home() / ".cache" / "thermo-kfac" / "data"


@dataclass
class Dataset:
    """Train/test tensors of one task and a seeded batch iterator.

    ``x_*`` have shape ``(n, *input_shape)`` (images as ``(C, H, W)``), float32. ``y_*`` are int64
    class labels for classification, float32 ``(n, output_dim)`` targets otherwise.
    """

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"dataset {self.name!r}: inputs and targets differ in length")
        if self.task == "classification" and not self.num_classes:
            raise ValueError(f"dataset {self.name!r}: a classification task needs num_classes")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])

    @property
    def input_dim(self) -> int:
        """Number of input features (product of :attr:`input_shape`)."""
        return math.prod(self.input_shape)

    @property
    def output_dim(self) -> int:
        """Model outputs needed: number of classes, or number of target features."""
        if self.task == "classification":
            assert self.num_classes is not None
            return self.num_classes
        return math.prod(self.y_train.shape[1:])

    @property
    def loss(self) -> str:
        """Default loss of the task: ``cross_entropy``, ``mse`` or ``bce`` (with logits)."""
        return DEFAULT_LOSS[self.task]

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        """Number of batches :meth:`batches` yields per epoch."""
        size = min(check_positive("batch_size", batch_size, integer=True), self.n_train)
        return self.n_train // size if drop_last else math.ceil(self.n_train / size)

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the ``(x, y)`` training batches of one epoch.

        The order depends only on ``(seed, epoch)``, so runs with the same seed see the same
        batches. A ``batch_size`` larger than the training set means full-batch training.
        """
        size = min(check_positive("batch_size", batch_size, integer=True), self.n_train)
        if shuffle:
            order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(self.n_train))
        else:
            order = torch.arange(self.n_train)
        stop = self.n_train - self.n_train % size if drop_last else self.n_train
        for start in range(0, stop, size):
            index = order[start:start + size]
            yield self.x_train[index], self.y_train[index]

    def stream(self, batch_size: int, *, seed: int = 0, shuffle: bool = True,
               drop_last: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Endless ``(epoch, x, y)`` batches, epoch after epoch (see :meth:`batches`)."""
        epoch = 0
        while True:
            yield from ((epoch, x, y) for x, y in self.batches(
                batch_size, seed=seed, epoch=epoch, shuffle=shuffle, drop_last=drop_last))
            epoch += 1

    def to(self, device: str | torch.device) -> Dataset:
        """The dataset with its tensors on ``device`` (``self`` when they are there already)."""
        device = torch.device(device)
        if self.x_train.device == device:
            return self
        return Dataset(self.name, self.task, self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.num_classes, dict(self.info))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (for results files)."""
        return {"name": self.name, "task": self.task, "input_shape": list(self.input_shape),
                "output_dim": self.output_dim, "num_classes": self.num_classes,
                "n_train": self.n_train, "n_test": self.n_test, **self.info}


# ---------------------------------------------------------------------------------- registry
def load_dataset(name: str, *, task: str | None = None, seed: int = 0, root: str | Path | None = None,
                 download: bool = False, max_train: int | None = None, max_test: int | None = None,
                 **options: Any) -> Dataset:
    """Load a dataset by name (see :data:`DATASETS`).

    Args:
        name: one of :data:`DATASETS`.
        task: ``None`` for the dataset's own task; ``"autoencoder"`` turns an image dataset into
            reconstruction of its inputs (scaled to [0, 1]).
        seed: train/test split (digits), generation (synthetic) and subsampling seed.
        root: directory of the on-disk datasets (default :func:`default_data_root`).
        download: fetch missing MNIST/CIFAR-10 files with torchvision (never done otherwise).
        max_train, max_test: keep at most this many examples (a seeded random subset).
        options: loader-specific options (``test_fraction`` for digits; ``n_train``,
            ``n_features``, ... for the synthetic tasks).
    """
    check_choice("dataset", name, DATASETS)
    if task is not None:
        check_choice("task", task, TASKS)
    if task == "autoencoder" and name not in IMAGE_DATASETS:
        raise ValueError(f"task='autoencoder' needs an image dataset ({', '.join(IMAGE_DATASETS)}), "
                         f"got dataset={name!r}")
    if name.startswith("synthetic-"):
        own_task = name.removeprefix("synthetic-")
        if task not in (None, own_task):
            raise ValueError(f"dataset={name!r} is a {own_task} task; task={task!r} is not valid "
                             "for it")
        data = make_synthetic(own_task, seed=seed, **options)
    elif name == "digits":
        data = load_digits(seed=seed, autoencoder=task == "autoencoder", **options)
    elif name == "digits28":
        data = load_digits28(seed=seed, autoencoder=task == "autoencoder", **options)
    elif name == "sbm":
        if task not in (None, "classification"):
            raise ValueError(f"dataset='sbm' is a node classification task; task={task!r} is not "
                             "valid for it")
        data = make_sbm(seed=seed, **options)
    else:
        _no_options(name, options)
        root = Path(root) if root is not None else default_data_root()
        loader = load_cifar10 if name == "cifar10" else load_mnist
        kwargs = {} if name == "cifar10" else {"variant": name}
        data = loader(root, download=download, autoencoder=task == "autoencoder", **kwargs)
    return subsample(data, max_train=max_train, max_test=max_test, seed=seed)


def subsample(data: Dataset, *, max_train: int | None = None, max_test: int | None = None,
              seed: int = 0) -> Dataset:
    """Keep a seeded random subset of at most ``max_train`` / ``max_test`` examples."""
    def pick(x: torch.Tensor, y: torch.Tensor, limit: int | None, label: str, salt: int):
        if limit is None or limit >= len(x):
            return x, y
        check_positive(label, limit, integer=True)
        index = torch.from_numpy(np.sort(np.random.default_rng([seed, salt]).permutation(len(x))[:limit]))
        return x[index], y[index]

    x_train, y_train = pick(data.x_train, data.y_train, max_train, "max_train", 1)
    x_test, y_test = pick(data.x_test, data.y_test, max_test, "max_test", 2)
    return Dataset(data.name, data.task, x_train, y_train, x_test, y_test, data.num_classes,
                   dict(data.info))


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"dataset {name!r} takes no options {sorted(options)}")


# ------------------------------------------------------------------------------------ digits
def load_digits(*, seed: int = 0, test_fraction: float = 0.2, autoencoder: bool = False) -> Dataset:
    """scikit-learn's 8x8 digits as ``(1, 8, 8)`` images: a stratified, seeded train/test split.

    For classification the pixels are standardized with the training set's per-pixel mean and
    standard deviation; for the auto-encoder they are scaled to [0, 1].
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    check_number("test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False,
                 high_inclusive=False)
    bunch = sklearn_digits()
    x = bunch.data.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=test_fraction,
                                              random_state=seed, stratify=labels)
    if autoencoder:
        x_tr, x_te = x_tr / 16.0, x_te / 16.0
    else:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        std = np.where(std > 1e-6, std, 1.0)  # constant (always blank) pixels stay 0
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return _image_dataset("digits", x_tr.reshape(-1, 1, 8, 8), y_tr, x_te.reshape(-1, 1, 8, 8), y_te,
                          10, autoencoder, {"test_fraction": test_fraction, "seed": seed},
                          standardize=False)


def mnist_like(images: np.ndarray, *, size: int = 28, digit: int = 20, max_shift: int = 2,
               seed: int = 0) -> np.ndarray:
    """8x8 digit images (values in [0, 1], shape ``(N, 8, 8)``) as MNIST-shaped ``(N, size, size)``.

    Each digit is up-sampled bilinearly to ``digit x digit`` pixels and pasted into a zero canvas,
    centred and then moved by a seeded random shift of up to ``max_shift`` pixels per axis (as
    MNIST centres each digit's mass in a 28x28 frame with a 4-pixel border). The border pixels are
    zero in (nearly) every image, so they have near-zero variance like MNIST's.
    """
    check_positive("size", size, integer=True)
    check_number("digit", digit, low=1, high=size, integer=True)
    check_number("max_shift", max_shift, low=0, high=(size - digit) // 2, integer=True)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    up = torch.nn.functional.interpolate(x, size=(digit, digit), mode="bilinear", align_corners=True)
    up = up[:, 0].clamp(0.0, 1.0).numpy()
    rng = np.random.default_rng(seed)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(images), 2))
    out = np.zeros((len(images), size, size), dtype=np.float32)
    base = (size - digit) // 2
    for i, (dy, dx) in enumerate(shifts):
        out[i, base + dy: base + dy + digit, base + dx: base + dx + digit] = up[i]
    return out


def load_digits28(*, seed: int = 0, test_fraction: float = 0.2, copies: int = 4, max_shift: int = 2,
                  autoencoder: bool = False) -> Dataset:
    """The realistic-width workload's images: the digits at MNIST's shape and statistics.

    scikit-learn's 8x8 digits (shipped with the package, no download) split as :func:`load_digits`,
    each made into a 28x28 image by :func:`mnist_like` (bilinear up-sampling to 20x20, zero border,
    random shifts of up to ``max_shift`` pixels); every training digit appears ``copies`` times
    with independent shifts (1,437 x 4 = 5,748 training images by default), every test digit once.
    Pixels are in [0, 1] and standardized per channel as MNIST is (one mean and standard deviation),
    so an MLP's first layer sees 784 inputs whose second moments, like MNIST's, are dominated by
    the mean image (the damped input factor of a 784-512-512-10 MLP is ill-conditioned).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    check_number("test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False,
                 high_inclusive=False)
    check_positive("copies", copies, integer=True)
    bunch = sklearn_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 8, 8)
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=test_fraction,
                                              random_state=seed, stratify=labels)
    x_tr = np.concatenate([mnist_like(x_tr, max_shift=max_shift, seed=seed * 1000 + 1 + c)
                           for c in range(copies)])
    y_tr = np.tile(y_tr, copies)
    x_te = mnist_like(x_te, max_shift=max_shift, seed=seed * 1000)
    info = {"test_fraction": test_fraction, "seed": seed, "copies": copies, "max_shift": max_shift}
    return _image_dataset("digits28", x_tr[:, None], y_tr, x_te[:, None], y_te, 10, autoencoder, info)


# --------------------------------------------------------------------------------- synthetic
def make_synthetic(task: str = "classification", *, n_train: int = 1000, n_test: int = 500,
                   n_features: int = 20, n_classes: int = 4, n_outputs: int = 1,
                   hidden: int = 32, noise: float = 0.1, seed: int = 0) -> Dataset:
    """A seeded random teacher task: Gaussian inputs through a random one-hidden-layer tanh net.

    ``classification``: labels are the teacher's argmax, each flipped to a random class with
    probability ``noise``. ``regression``: targets are the teacher's outputs (unit variance) plus
    Gaussian noise of standard deviation ``noise``.
    """
    check_choice("task", task, ("classification", "regression"))
    for label, value in (("n_train", n_train), ("n_test", n_test), ("n_features", n_features),
                         ("n_outputs", n_outputs), ("hidden", hidden)):
        check_positive(label, value, integer=True)
    check_number("n_classes", n_classes, low=2, integer=True)
    noise = check_number("noise", noise, low=0.0, high=1.0 if task == "classification" else None)
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    x = torch.randn(n, n_features, generator=gen)
    w1 = torch.randn(n_features, hidden, generator=gen) / math.sqrt(n_features)
    outputs = n_classes if task == "classification" else n_outputs
    w2 = torch.randn(hidden, outputs, generator=gen)
    teacher = torch.tanh(2.0 * x @ w1) @ w2
    teacher = (teacher - teacher.mean(0)) / teacher.std(0).clamp_min(1e-6)
    info = {"seed": seed, "noise": noise, "n_features": n_features, "hidden": hidden}
    if task == "classification":
        y = teacher.argmax(dim=1)
        flip = torch.rand(n, generator=gen) < noise
        y = torch.where(flip, torch.randint(0, n_classes, (n,), generator=gen), y)
        return Dataset("synthetic-classification", task, x[:n_train], y[:n_train], x[n_train:],
                       y[n_train:], n_classes, info)
    y = teacher + noise * torch.randn(n, outputs, generator=gen)
    return Dataset("synthetic-regression", task, x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                   None, info)


# -------------------------------------------------------------------------- on-disk formats
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` compressed or not) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes of data), "
                         f"the file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MNIST_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision's folder names


def _find_file(folders: list[Path], name: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _mnist_folders(root: Path, variant: str) -> list[Path]:
    sub = _MNIST_DIRS[variant]
    return [root / sub / "raw", root / sub, root / variant / "raw", root / variant, root]


def load_mnist(root: str | Path | None = None, *, download: bool = False, autoencoder: bool = False,
               variant: str = "mnist") -> Dataset:
    """MNIST (or Fashion-MNIST) from the raw IDX files under ``root``, as ``(1, 28, 28)`` images.

    Files are looked up (plain or ``.gz``) in ``root/MNIST/raw`` (torchvision's layout),
    ``root/MNIST``, ``root/mnist/raw``, ``root/mnist`` and ``root``. Missing files are downloaded
    with torchvision only when ``download=True``.
    """
    check_choice("variant", variant, tuple(_MNIST_DIRS))
    root = Path(root) if root is not None else default_data_root()
    names = [n for pair in _MNIST_FILES.values() for n in pair]
    paths = [_find_file(_mnist_folders(root, variant), n) for n in names]
    if any(p is None for p in paths):
        if not download:
            missing = [n for n, p in zip(names, paths, strict=True) if p is None]
            raise ValueError(f"{variant} files not found under {root} (missing {', '.join(missing)}); "
                             f"pass download=True (CLI: --download, needs {VISION_HINT}) or point "
                             "root (--data-dir) at a folder with the IDX files")
        tv = _torchvision()
        cls = tv.datasets.MNIST if variant == "mnist" else tv.datasets.FashionMNIST
        for train in (True, False):
            cls(str(root), train=train, download=True)
        paths = [_find_file(_mnist_folders(root, variant), n) for n in names]
        if any(p is None for p in paths):
            raise ValueError(f"torchvision's download did not produce the {variant} IDX files under {root}")
    x_tr, y_tr, x_te, y_te = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    x_tr = x_tr.astype(np.float32)[:, None] / 255.0
    x_te = x_te.astype(np.float32)[:, None] / 255.0
    return _image_dataset(variant, x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), 10,
                          autoencoder, {"root": str(root)})


_CIFAR_DIR = "cifar-10-batches-py"


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: ``(images (n, 3, 32, 32) uint8, labels (n,) int64)``.

    The batches are Python pickles (the official format); only load files you trust.
    """
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (needs keys b'data' and b'labels')")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data of shape (n, 3072) and n labels, got "
                         f"{data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path | None = None, *, download: bool = False,
                 autoencoder: bool = False) -> Dataset:
    """CIFAR-10 from the python batches in ``root/cifar-10-batches-py``, as ``(3, 32, 32)`` images.

    Missing files are downloaded with torchvision only when ``download=True``.
    """
    root = Path(root) if root is not None else default_data_root()
    folder = root / _CIFAR_DIR
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        if not download:
            missing = [n for n in names if not (folder / n).is_file()]
            raise ValueError(f"cifar10 files not found in {folder} (missing {', '.join(missing)}); "
                             f"pass download=True (CLI: --download, needs {VISION_HINT}) or point "
                             "root (--data-dir) at the folder that holds cifar-10-batches-py")
        tv = _torchvision()
        tv.datasets.CIFAR10(str(root), train=True, download=True)
    parts = [read_cifar_batch(folder / n) for n in names]
    x_tr = np.concatenate([p[0] for p in parts[:-1]]).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts[:-1]])
    x_te = parts[-1][0].astype(np.float32) / 255.0
    return _image_dataset("cifar10", x_tr, y_tr, x_te, parts[-1][1], 10, autoencoder,
                          {"root": str(root)})


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(f"downloading this dataset needs torchvision: {VISION_HINT}") from err
    return torchvision


def _image_dataset(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
                   num_classes: int, autoencoder: bool, info: dict[str, Any],
                   standardize: bool = True) -> Dataset:
    """Images in [0, 1] (or already standardized) -> classification or auto-encoder dataset."""
    if autoencoder:
        xt, xe = torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(np.ascontiguousarray(x_te))
        return Dataset(name, "autoencoder", xt, xt.flatten(1), xe, xe.flatten(1), None, info)
    if standardize:
        # per-channel statistics of the training set
        axes = (0, 2, 3)
        mean = x_tr.mean(axis=axes, keepdims=True)
        std = np.maximum(x_tr.std(axis=axes, keepdims=True), 1e-6)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return Dataset(name, "classification", torch.from_numpy(np.ascontiguousarray(x_tr, np.float32)),
                   torch.from_numpy(y_tr), torch.from_numpy(np.ascontiguousarray(x_te, np.float32)),
                   torch.from_numpy(y_te), num_classes, info)


# ------------------------------------------------------------------------------------- graphs
def make_sbm(*, n_train: int = 600, n_test: int = 200, nodes: int = 24, n_classes: int = 3,
             n_features: int = 8, p_in: float = 0.3, p_out: float = 0.03, signal: float = 1.0,
             seed: int = 0) -> Dataset:
    """Node classification on graphs drawn from a stochastic block model, seeded.

    Each example is one graph of ``nodes`` nodes, each node in one of ``n_classes`` communities
    (uniformly at random); an edge joins two nodes with probability ``p_in`` inside a community and
    ``p_out`` across. Node features are the community's mean vector (random, of norm ``signal``,
    shared by all graphs) plus standard Gaussian noise, so one node alone is ambiguous and a graph
    convolution that averages over neighbours helps. Inputs are ``(nodes, n_features + nodes)``:
    the features followed by the normalized adjacency ``D^-1/2 (A + I) D^-1/2``; labels are
    ``(nodes,)`` community indices (per-node cross-entropy on logits ``(N, n_classes, nodes)``).
    """
    for label, value in (("n_train", n_train), ("n_test", n_test), ("nodes", nodes),
                         ("n_features", n_features)):
        check_positive(label, value, integer=True)
    check_number("n_classes", n_classes, low=2, integer=True)
    for label, value in (("p_in", p_in), ("p_out", p_out)):
        check_number(label, value, low=0.0, high=1.0)
    check_number("signal", signal, low=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    means = torch.randn(n_classes, n_features, generator=gen)
    means = signal * means / means.norm(dim=1, keepdim=True)
    labels = torch.randint(0, n_classes, (n, nodes), generator=gen)
    same = labels.unsqueeze(2) == labels.unsqueeze(1)
    prob = torch.where(same, torch.tensor(p_in), torch.tensor(p_out))
    upper = (torch.rand(n, nodes, nodes, generator=gen) < prob).float().triu(1)
    adj = upper + upper.transpose(1, 2) + torch.eye(nodes)
    inv_sqrt_deg = adj.sum(dim=2).rsqrt()
    adj = inv_sqrt_deg.unsqueeze(2) * adj * inv_sqrt_deg.unsqueeze(1)
    features = means[labels] + torch.randn(n, nodes, n_features, generator=gen)
    x = torch.cat([features, adj], dim=2)
    info = {"seed": seed, "nodes": nodes, "n_features": n_features, "p_in": p_in, "p_out": p_out,
            "signal": signal}
    return Dataset("sbm", "classification", x[:n_train], labels[:n_train], x[n_train:],
                   labels[n_train:], n_classes, info)
