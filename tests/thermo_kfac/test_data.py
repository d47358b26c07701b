"""Datasets: digits split and scaling, seeded batches, synthetic tasks, MNIST/CIFAR-10 file readers."""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from thermo_kfac.data import (
    Dataset,
    load_cifar10,
    load_dataset,
    load_mnist,
    make_synthetic,
    read_cifar_batch,
    read_idx,
)


# ------------------------------------------------------------------------------------ digits
def test_digits_split_shapes_and_standardization():
    data = load_dataset("digits", seed=0)
    assert data.task == "classification" and data.loss == "cross_entropy"
    assert data.input_shape == (1, 8, 8) and data.input_dim == 64 and data.output_dim == 10
    assert data.n_train + data.n_test == 1797 and data.n_test == 360
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    flat = data.x_train.flatten(1)
    assert flat.mean(0).abs().max() < 1e-4
    # pixels that vary are scaled to unit variance; always-blank pixels stay exactly 0
    std = flat.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-3) | (std == 0))
    # stratified: every class in both parts
    assert set(data.y_test.tolist()) == set(range(10))


def test_digits_split_depends_on_seed_only():
    a, b, c = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_digits_autoencoder_targets_are_flat_inputs_in_unit_range():
    data = load_dataset("digits", task="autoencoder")
    assert data.task == "autoencoder" and data.loss == "bce" and data.num_classes is None
    assert data.output_dim == 64 and data.y_train.shape == (data.n_train, 64)
    assert torch.equal(data.y_train, data.x_train.flatten(1))
    assert data.x_train.min() >= 0 and data.x_train.max() <= 1


# ----------------------------------------------------------------------------------- batches
def _tiny(n: int = 10) -> Dataset:
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return Dataset("tiny", "regression", x, x.clone(), x[:2], x[:2].clone())


def test_batches_cover_each_example_once_and_are_seeded():
    data = _tiny(10)
    epoch = list(data.batches(4, seed=3))
    assert [len(x) for x, _ in epoch] == [4, 4, 2] and data.steps_per_epoch(4) == 3
    seen = torch.cat([x for x, _ in epoch]).flatten()
    assert sorted(seen.tolist()) == list(range(10))
    again = torch.cat([x for x, _ in data.batches(4, seed=3)]).flatten()
    assert torch.equal(seen, again)
    other_epoch = torch.cat([x for x, _ in data.batches(4, seed=3, epoch=1)]).flatten()
    other_seed = torch.cat([x for x, _ in data.batches(4, seed=4)]).flatten()
    assert not torch.equal(seen, other_epoch) and not torch.equal(seen, other_seed)
    # inputs and targets stay paired
    assert all(torch.equal(x, y) for x, y in data.batches(3, seed=1))


def test_batches_drop_last_full_batch_and_stream():
    data = _tiny(10)
    assert [len(x) for x, _ in data.batches(4, drop_last=True)] == [4, 4]
    assert data.steps_per_epoch(4, drop_last=True) == 2
    assert [len(x) for x, _ in data.batches(1000)] == [10]  # larger than the set: full batch
    assert [x.flatten().tolist() for x, _ in data.batches(5, shuffle=False)] == [
        [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    stream = data.stream(4, seed=0)
    epochs = [next(stream)[0] for _ in range(7)]
    assert epochs == [0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0))


def test_dataset_checks_lengths_and_classes():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="differ in length"):
        Dataset("bad", "regression", x, x[:3], x, x)
    with pytest.raises(ValueError, match="num_classes"):
        Dataset("bad", "classification", x, torch.zeros(4, dtype=torch.long), x,
                torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="task='nonsense'"):
        Dataset("bad", "nonsense", x, x, x, x)


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    data = make_synthetic("classification", n_train=12, n_test=5, seed=0)
    assert data.to("cpu") is data  # already there: no copy
    meta = data.to("meta")  # a second device that exists on every machine
    for name in ("x_train", "y_train", "x_test", "y_test"):
        moved, original = getattr(meta, name), getattr(data, name)
        assert moved.device.type == "meta" and moved.shape == original.shape and moved.dtype == original.dtype
    assert (meta.name, meta.task, meta.num_classes, meta.info) == (data.name, data.task, data.num_classes,
                                                                    data.info)
    assert meta.info is not data.info


# --------------------------------------------------------------------------------- synthetic
def test_synthetic_tasks_are_seeded():
    a = make_synthetic("classification", n_train=50, n_test=20, n_features=5, n_classes=3, seed=1)
    b = load_dataset("synthetic-classification", seed=1, n_train=50, n_test=20, n_features=5,
                     n_classes=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.input_shape == (5,) and a.output_dim == 3 and set(a.y_train.tolist()) <= {0, 1, 2}
    r = make_synthetic("regression", n_train=40, n_test=10, n_outputs=2, noise=0.0, seed=2)
    assert r.task == "regression" and r.loss == "mse" and r.y_train.shape == (40, 2)
    assert not torch.equal(r.x_train, make_synthetic("regression", n_train=40, n_test=10,
                                                     n_outputs=2, seed=3).x_train)
    with pytest.raises(ValueError, match="n_classes"):
        make_synthetic("classification", n_classes=1)


def test_load_dataset_errors_name_valid_choices():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="image dataset"):
        load_dataset("synthetic-regression", task="autoencoder")
    with pytest.raises(ValueError, match="regression task"):
        load_dataset("synthetic-regression", task="classification")
    with pytest.raises(TypeError):
        load_dataset("digits", no_such_option=1)


def test_subsample_is_seeded_subset():
    full = load_dataset("digits")
    part = load_dataset("digits", max_train=100, max_test=50)
    assert part.n_train == 100 and part.n_test == 50
    rows = {tuple(r.tolist()) for r in full.x_train.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in part.x_train.flatten(1))
    assert torch.equal(part.x_train, load_dataset("digits", max_train=100, max_test=50).x_train)


# ----------------------------------------------------------------------- MNIST (IDX format)
def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    dtype = {0x08: ">u1", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + array.astype(dtype).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        _write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


def test_read_idx_roundtrip_plain_gzip_and_float(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte", array)
    _write_idx(tmp_path / "b-idx3-ubyte.gz", array)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    _write_idx(tmp_path / "c-idx2-float", floats, code=0x0D)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), array)
    assert np.array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "c-idx2-float"), floats)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    header = bytes([0, 0, 8, 1]) + np.asarray([5], dtype=">i4").tobytes()
    (tmp_path / "short").write_bytes(header + b"\x00\x01")
    with pytest.raises(ValueError, match="shape"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout,gz", [("MNIST/raw", False), ("", True)])
def test_load_mnist_from_tiny_idx_files(tmp_path, layout, gz):
    arrays = _write_mnist(tmp_path / layout if layout else tmp_path, gz=gz)
    data = load_mnist(tmp_path)
    assert data.name == "mnist" and data.task == "classification"
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert abs(float(data.x_train.mean())) < 1e-4  # per-channel standardized
    ae = load_dataset("mnist", root=tmp_path, task="autoencoder", max_train=4)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    assert ae.n_train == 4 and ae.output_dim == 784
    assert ae.x_train.min() >= 0 and ae.x_train.max() <= 1
    full_ae = load_mnist(tmp_path, autoencoder=True)
    assert torch.allclose(full_ae.x_train[:, 0], expected)


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    _write_mnist(tmp_path / "FashionMNIST" / "raw")
    data = load_dataset("fashion-mnist", root=tmp_path)
    assert data.name == "fashion-mnist" and data.n_train == 12
    with pytest.raises(ValueError, match="mnist files not found"):
        load_dataset("mnist", root=tmp_path)


def test_missing_files_without_download_give_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"--download.*thermo-kfac\[vision\]"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(ValueError, match=r"cifar10 files not found.*--download"):
        load_dataset("cifar10", root=tmp_path)


def test_download_without_torchvision_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(ImportError, match=r"pip install thermo-kfac\[vision\]"):
        load_dataset("mnist", root=tmp_path, download=True)
    with pytest.raises(ImportError, match=r"pip install thermo-kfac\[vision\]"):
        load_cifar10(tmp_path, download=True)


# ------------------------------------------------------------------- CIFAR-10 (pickle batches)
def _write_cifar(root: Path, per_batch: int = 4) -> list[tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        batches.append((data, labels))
    return batches


def test_load_cifar10_from_tiny_pickle_batches(tmp_path):
    batches = _write_cifar(tmp_path)
    images, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == batches[-1][1]
    assert np.array_equal(images[0, 1].ravel(), batches[-1][0][0, 1024:2048])  # channel-major rows
    data = load_dataset("cifar10", root=tmp_path)
    assert data.input_shape == (3, 32, 32) and data.n_train == 20 and data.n_test == 4
    assert data.y_train.tolist() == [v for b in batches[:5] for v in b[1]]
    channel_means = data.x_train.mean(dim=(0, 2, 3))
    assert channel_means.abs().max() < 1e-4
    ae = load_cifar10(tmp_path, autoencoder=True)
    assert ae.output_dim == 3072 and ae.x_train.max() <= 1


def test_read_cifar_batch_rejects_other_pickles(tmp_path):
    path = tmp_path / "batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        read_cifar_batch(path)
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(ValueError, match="not a CIFAR-10"):
        read_cifar_batch(path)
