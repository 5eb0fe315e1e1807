"""`weit sample --scale`: the grid enlarged by nearest neighbour (every pixel a scale × scale block of
the same value), a default that shows a small image at ≥ 112 px, the same bytes for the same seed,
and bad scales refused in one line with nothing written."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import weit
from PIL import Image

from weit_cli.errors import WeitError
from weit_cli.tasks.diffusion import default_scale, grid_image

ROOT = Path(__file__).resolve().parents[1]


def test_default_scale_shows_small_images_at_112_px_or_more():
    assert default_scale(28) == 4 and default_scale(8) == 14 and default_scale(32) == 4
    assert default_scale(112) == 1 and default_scale(256) == 1
    assert all(s * default_scale(s) >= 112 for s in range(1, 200))


@pytest.mark.parametrize("channels", [1, 3])
def test_scaled_grid_is_the_grid_with_every_pixel_repeated(channels):
    images = torch.rand(5, channels, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    small = np.asarray(grid_image(images, nrow=3))
    big = np.asarray(grid_image(images, nrow=3, scale=4))
    block = np.ones((4, 4) if channels == 1 else (4, 4, 1), dtype=np.uint8)
    assert big.shape[:2] == (small.shape[0] * 4, small.shape[1] * 4)
    assert np.array_equal(big, np.kron(small, block))  # nearest neighbour: no new values


@pytest.mark.parametrize("scale", [0, -1, 65, 2.5])
def test_bad_scale_is_refused(scale):
    with pytest.raises(WeitError, match="scale"):
        grid_image(torch.zeros(1, 1, 4, 4), scale=scale)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn (digits) not installed")
    root = tmp_path_factory.mktemp("scale")
    small = ["--data", "digits", "--set", "model.sample_size=8", "--set", "model.patch_size=2", "--set", "model.head_dim=8",
             "--set", "templates.size=8", "--set", "templates.count=8", "--set", "nested.depths=[1]", "--set", "nested.widths=[16]",
             "--set", "train.steps=2", "--set", "train.warmup_steps=1", "--set", "train.eval_every=0", "--set", "data.batch_size=16"]
    weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", root / "b.safetensors", *small)
    weit("materialize", root / "b.safetensors", "--depth", "1", "--width", "16", "-o", root / "m")
    return root / "m"


def _size(path: Path) -> tuple[int, int]:
    return Image.open(io.BytesIO(path.read_bytes())).size


def test_sample_scale_is_byte_reproducible_and_defaults_to_112_px(model, tmp_path):
    common = ["-n", "4", "--class", "1", "--steps", "2", "--seed", "3"]
    one = json.loads(weit("sample", model, "-o", tmp_path / "one.png", "--scale", "1", *common, "--json").stdout)
    three = json.loads(weit("sample", model, "-o", tmp_path / "three.png", "--scale", "3", *common, "--json").stdout)
    again = json.loads(weit("sample", model, "-o", tmp_path / "again.png", "--scale", "3", *common, "--json").stdout)
    auto = json.loads(weit("sample", model, "-o", tmp_path / "auto.png", *common, "--json").stdout)
    assert one["scale"] == 1 and three["scale"] == 3 and auto["scale"] == 14  # 8 px digits → ×14 = 112 px
    w, h = _size(tmp_path / "one.png")
    assert _size(tmp_path / "three.png") == (3 * w, 3 * h) and _size(tmp_path / "auto.png") == (14 * w, 14 * h)
    assert (tmp_path / "three.png").read_bytes() == (tmp_path / "again.png").read_bytes() and three["sha256"] == again["sha256"]
    big = np.asarray(Image.open(tmp_path / "three.png"))
    assert np.array_equal(big, np.kron(np.asarray(Image.open(tmp_path / "one.png")), np.ones((3, 3), dtype=np.uint8)))


def test_sample_bad_scale_is_one_line_and_writes_nothing(model, tmp_path):
    r = weit("sample", model, "-o", tmp_path / "g.png", "--scale", "0", expect=2)
    assert r.stderr.startswith("error:") and "--scale" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()
