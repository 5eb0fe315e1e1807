"""Recipes: every shipped recipe validates; unknown keys and bad overrides are one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from weit_cli.errors import WeitError
from weit_cli.recipe import (
    Recipe,
    apply_override,
    digest,
    dump,
    load_recipe,
    recipe_path_for,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
MINIMAL = {"nested": {"depths": [1, 2], "widths": [32, 64]}, "model": {"head_dim": 32}}


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"vit-fashion.yaml", "vit-fashion-small.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# weit pretrain ") and path.name in first, "a recipe opens with the command that runs it"
    # The resolved form re-validates to the same recipe.
    assert validate(__import__("yaml").safe_load(dump(r))) == r


def _fields(model: type[BaseModel], prefix=""):
    for name, f in model.model_fields.items():
        yield prefix + name, f
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, prefix + name + ".")


def test_every_field_is_described_and_sections_forbid_extras():
    fields = list(_fields(Recipe))
    assert len(fields) > 25
    for name, f in fields:
        assert f.description and len(f.description) > 8, f"{name} has no description"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            assert ann.model_config.get("extra") == "forbid", name


def test_overrides_merge_then_validate():
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for item in ["train.lr=1e-3", "nested.depths=[3,1]", "data.train_subset=0.5", "templates.size=null", "seed=7"]:
        apply_override(raw, item)
    r = validate(raw)
    assert r.train.lr == pytest.approx(1e-3) and isinstance(r.train.lr, float)
    assert r.nested.depths == [1, 3]  # sorted, deduplicated
    assert r.data.train_subset == 0.5 and r.seed == 7 and r.template_size == 32


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("trian.lr=1", "unknown key 'trian'"),
        ("train.steps=0", "train.steps"),
        ("nested.widths=[48]", "not multiples of head_dim 32"),
        ("model.patch_size=5", "does not divide img_size"),
        ("templates.count=2000", "exceeds 1024"),
        ("templates.count={qkv: 4}", "exactly the keys"),
    ],
)
def test_bad_values_are_one_line_errors(item, message):
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    apply_override(raw, item)
    with pytest.raises(WeitError) as e:
        validate(raw)
    assert message in e.value.message and "\n" not in str(e.value)
    assert e.value.hint


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=1", "train.lr.x=1"])
def test_malformed_overrides(item):
    raw = {"train": {"lr": 0.1}}
    with pytest.raises(WeitError) as e:
        apply_override(raw, item)
    assert "override" in e.value.message and "\n" not in str(e.value)


def test_yaml_errors_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nested: {depths: [1, 2\n")
    with pytest.raises(WeitError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(WeitError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(WeitError, match="mapping"):
        load_recipe(lst)


def test_sha_ignores_formatting_but_not_values():
    a = validate({"nested": {"depths": [2, 1], "widths": [64, 32]}, "model": {"head_dim": 32}})
    b = validate({"model": {"head_dim": 32}, "nested": {"widths": [32, 64], "depths": [1, 2]}})
    c = validate({"model": {"head_dim": 32}, "nested": {"widths": [32, 64], "depths": [1, 2]}, "seed": 1})
    assert digest(a) == digest(b) != digest(c)
    assert recipe_path_for(Path("out/b.safetensors")) == Path("out/b.recipe.yaml")


def test_cli_unknown_key_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "b.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "weit_cli.cli", "pretrain", str(ROOT / "recipes/vit-fashion-small.yaml"), "-o", str(out),
         "--set", "train.lrr=1"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'train.lrr'" in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
