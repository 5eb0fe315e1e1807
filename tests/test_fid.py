"""The offline generation metric: the cached judge classifier, its Fréchet distance through
torchmetrics, and its class accuracy. Fast tests train a judge on scikit-learn's 8×8 digits with a
shortened recipe; the Fashion-MNIST judge itself is checked behind the `slow` marker."""

from __future__ import annotations

import json
import time

import pytest
import torch

from weit_cli.errors import InputError
from weit_cli.io.files import sha256
from weit_cli.tasks import fid

QUICK = dict(train_subset=1200, epochs=3, batch_size=64)  # trains in about a second on the digits


@pytest.fixture
def quick_recipe(monkeypatch):
    for k, v in QUICK.items():
        monkeypatch.setitem(fid.JUDGE_TRAIN, k, v)


@pytest.fixture(scope="module")
def digits_judge(tmp_path_factory):
    """One quick digits judge for the tests that only measure with it."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in QUICK.items():
            mp.setitem(fid.JUDGE_TRAIN, k, v)
        return fid.load_judge("digits", img_size=16, root=tmp_path_factory.mktemp("cache"))


def digits_test(img_size: int = 16):
    from weit_cli.data.images import load_data

    return load_data("digits", img_size=img_size, in_chans=1, seed=0).test.tensors


def test_judge_is_cached_named_by_its_sha256_and_reused(quick_recipe, tmp_path, monkeypatch):
    first = fid.load_judge("digits", img_size=16, root=tmp_path)
    assert first.trained and first.path == tmp_path / "judges" / f"{first.sha256}.safetensors"
    assert sha256(first.path) == first.sha256
    pointers = list((tmp_path / "judges").glob("recipe-*.json"))
    assert len(pointers) == 1 and json.loads(pointers[0].read_text())["sha256"] == first.sha256

    monkeypatch.setattr(fid, "_train", lambda *a, **k: pytest.fail("the cached judge was trained again"))
    second = fid.load_judge("digits", img_size=16, root=tmp_path)
    assert not second.trained and second.sha256 == first.sha256 and second.test_accuracy == first.test_accuracy
    x, _ = digits_test()
    assert torch.equal(first.net(x[:8]), second.net(x[:8]))
    assert sorted(p.name for p in (tmp_path / "judges").iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_judge_training_is_deterministic_and_follows_weit_cache(quick_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIT_CACHE", str(tmp_path / "env"))
    a = fid.load_judge("digits", img_size=16)
    assert a.path.parent == tmp_path / "env" / "judges"
    b = fid.load_judge("digits", img_size=16, root=tmp_path / "other")
    assert b.trained and b.sha256 == a.sha256  # same recipe and data, one thread: the same bytes
    monkeypatch.setitem(fid.JUDGE_TRAIN, "seed", 1)  # another recipe is another judge
    assert fid.load_judge("digits", img_size=16).sha256 != a.sha256


def test_an_altered_cached_judge_is_retrained(quick_recipe, tmp_path):
    a = fid.load_judge("digits", img_size=16, root=tmp_path)
    a.path.write_bytes(a.path.read_bytes()[:-4] + b"\0\0\0\0")
    b = fid.load_judge("digits", img_size=16, root=tmp_path)
    assert b.trained and b.sha256 == a.sha256 and sha256(b.path) == b.sha256


def test_frechet_distance_and_class_accuracy(digits_judge):
    judge = digits_judge
    x, y = digits_test()
    assert judge.test_accuracy > 0.8
    assert fid.class_accuracy(judge.net, x, y) == pytest.approx(judge.test_accuracy)
    assert fid.class_accuracy(judge.net, x, (y + 1) % 10) < 0.2  # the wrong classes are judged wrong

    scorer = fid.FrechetScorer(judge, x)
    same = scorer.score(x)
    assert abs(same) < 1e-3
    shifted = scorer.score((x + 0.5).clamp(-1, 1))
    noise = scorer.score(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert shifted > 1.0 and noise > shifted
    assert scorer.score(x) == pytest.approx(same, abs=1e-3)  # the real statistics survive each score

    result = fid.evaluate_samples(judge, x, x.flip(0), y.flip(0))
    assert result["judge_sha256"] == judge.sha256 and "NOT comparable to Inception-FID" in result["note"]
    assert abs(result["fid_judge"]) < 1e-3 and result["class_accuracy"] == pytest.approx(judge.test_accuracy)
    with pytest.raises(InputError, match="do not fit the judge"):
        scorer.score(torch.zeros(4, 1, 28, 28))


def test_feature_extractor_is_what_torchmetrics_expects(digits_judge):
    from torchmetrics.image.fid import FrechetInceptionDistance

    feats = fid.JudgeFeatures(digits_judge.net)
    assert feats.num_features == 128 and feats(torch.zeros(3, 1, 16, 16)).shape == (3, 128)
    metric = FrechetInceptionDistance(feature=feats, normalize=True)
    assert metric.real_features_sum.shape == (128,)


@pytest.mark.slow
def test_fashion_mnist_judge(tmp_path):
    """The real judge: trained well under a minute on one thread, high accuracy on the test split."""
    from weit_cli.data.images import load_data

    load_data("fashion-mnist", img_size=28, in_chans=1, seed=0, val_fraction=0.0)  # not timed: reading the IDX files
    start = time.perf_counter()
    judge = fid.load_judge(root=tmp_path)
    took = time.perf_counter() - start
    assert judge.trained and took < 60
    assert judge.test_accuracy > 0.84
    x, y = load_data("fashion-mnist", img_size=28, in_chans=1, seed=0).test.tensors
    assert fid.class_accuracy(judge.net, x[:2000], y[:2000]) > 0.84
    scorer = fid.FrechetScorer(judge, x[:1000])
    assert abs(scorer.score(x[:1000])) < 1e-3 and scorer.score(x[1000:2000]) < scorer.score((x[1000:2000] + 0.3).clamp(-1, 1))
