"""Reliability (issue 5), the parts not covered by test_bad_inputs / test_files_robust / test_interrupt:

1. bad inputs for pretrain (recipes, --set), fit-scalers, finetune, materialize --scalers, and data
   folders for every command that reads data: one line naming the problem with a hint, the documented
   exit code, no traceback, nothing written. Mixed image modes (RGBA, L, P, LA, 1, CMYK, 16-bit) work;
2. hypothesis fuzzing of the recipe loader and the `--set` parser: a Recipe or a WeitError, never
   another exception;
3. SIGKILL at a random step of pretrain / finetune, then --resume: byte-identical outputs to an
   uninterrupted run; also kills inside the narrow windows between two writes of one checkpoint;
4. concurrent materialize --force to one path, read-only and full output folders;
5. malicious pickles are refused and never run;
6. --json: exactly one JSON object on stdout for every command, success or error; a real pipeline.

Decisions recorded here: an image folder's class folder without images is an error (its class would
get a logit that nothing trains; a `test/` class folder may be empty); images of different modes and
sizes in one tree are converted (RGB for colour modes, alpha dropped; 16-bit gray scaled by 1/65535)
and resized to the largest; images Pillow deems decompression bombs are refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import weit as cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from weit_cli.arch._registry import get_adapter
from weit_cli.arch.vit import ViTArch
from weit_cli.core.bundle import Bundle
from weit_cli.core.extract import from_dense
from weit_cli.errors import (
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT,
    EXIT_USAGE,
    WeitError,
)
from weit_cli.io.bundle_file import save_bundle
from weit_cli.io.files import save_tensors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

TINY_RECIPE = """\
# weit pretrain tiny.yaml -o bundle.safetensors
model: {img_size: 8, patch_size: 2, in_chans: 1, head_dim: 16}
templates: {count: 8}
nested: {depths: [1, 2], widths: [16, 32], sandwich: 1}
data: {source: digits, batch_size: 32}
train: {steps: 2, warmup_steps: 1, eval_every: 0, eval_samples: 64, checkpoint_every: 0}
"""


# ---------------------------------------------------------------------------------------------- helpers
weit = partial(cli, expect=None)  # exit codes are what these tests check


def weit_process(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weit_cli.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_clean_failure(r, code: int, *, names: str | None = None, before: list[str] | None = None, cwd: Path | None = None):
    """One line `error: … — hint`, the exit code, no traceback, no file added under `cwd`."""
    what = f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.returncode == code, what
    assert "Traceback" not in r.stderr + r.stdout and "internal error" not in r.stderr, what
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("warnings.warn", "/"))]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "—" in errors[0], what
    assert lines == errors, f"stderr holds more than the error line (Python warnings aside):\n{what}"
    if names is not None:
        assert names.lower() in errors[0].lower(), what
    if cwd is not None and before is not None:
        assert listing(cwd) == before, "something was written"


def run_case(args, code, cwd, names=None):
    before = listing(cwd)
    r = weit(*args, cwd=cwd)
    assert_clean_failure(r, code, names=names, before=before, cwd=cwd)
    return r


# ---------------------------------------------------------------------------------------------- inputs
ARCH = ViTArch(img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=2, width=32, num_heads=2)


def _png(w: int, h: int) -> bytes:
    """A PNG header claiming w×h pixels (a decompression bomb: tiny file, huge image)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def _gray(rng, n=10) -> np.ndarray:
    return (rng.random((n, n)) * 255).astype(np.uint8)


def _tree(root: Path, per_class: dict[str, int], rng) -> Path:
    from PIL import Image

    for c, n in per_class.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_gray(rng)).save(root / c / f"{i}.png")
    return root


MODES = ["L", "RGB", "RGBA", "P", "LA", "1", "I;16", "CMYK"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """Every input the cases below need, made once: bundles, scalers, models, files, image trees."""
    from PIL import Image

    from weit_cli.io.export import write_model

    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    ad = get_adapter("vit")
    dense = ad.build(ARCH).state_dict()
    f: dict[str, Path] = {}
    write_model(Bundle(ad, ARCH, {}, {}, dense), d / "model", torch.float32, {"command": "test"}, force=False)
    f["model"] = d / "model"
    small = ViTArch(img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=1, width=16, num_heads=1)
    write_model(Bundle(ad, small, {}, {}, ad.build(small).state_dict()), d / "small", torch.float32, {"command": "test"}, force=False)
    f["small"] = d / "small"
    for name, seed in (("bundle", 0), ("other_bundle", 1)):
        torch.manual_seed(seed)
        b, _ = from_dense(ad, ARCH, ad.build(ARCH).state_dict(), 16, 8)
        save_bundle(d / f"{name}.safetensors", b)
        f[name] = d / f"{name}.safetensors"
    from weit_cli.commands.fit_scalers import fit_scalers

    fit_scalers(f["other_bundle"], d / "other_scalers.safetensors", data="digits", steps=1, train_subset=64, depth=1, width=16)
    fit_scalers(f["bundle"], d / "scalers.safetensors", data="digits", steps=1, train_subset=64, depth=1, width=16)
    f["other_scalers"], f["scalers"] = d / "other_scalers.safetensors", d / "scalers.safetensors"
    save_file(dense, str(d / "dense.safetensors"))
    f["dense"] = d / "dense.safetensors"
    (d / "empty.safetensors").write_bytes(b"")
    (d / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "json.safetensors").write_text(json.dumps({"a": 1}))
    (d / "huge.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    good = f["bundle"].read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    from weit_cli.io.files import load_weit

    tensors, meta = load_weit(f["bundle"], "weit.templates")
    tensors["templates.qkv"] = tensors["templates.qkv"].clone()
    tensors["templates.qkv"][0, 0, 0] = float("nan")
    save_tensors(d / "nan_bundle.safetensors", tensors, meta)
    st_, sm = load_weit(f["scalers"], "weit.scalers")
    k = next(k for k in st_ if k.startswith("scalers."))
    st_[k] = st_[k].clone().fill_(float("inf"))
    save_tensors(d / "inf_scalers.safetensors", st_, sm)
    nan_dense = {k: v.clone() for k, v in dense.items()}
    nan_dense["blocks.0.mlp.fc1.weight"].fill_(float("nan"))
    save_file(nan_dense, str(d / "nan_dense.safetensors"))
    (d / "cfg_only").mkdir()
    shutil.copy(f["model"] / "config.json", d / "cfg_only" / "config.json")
    (d / "no_model_dir").mkdir()
    for p in d.glob("*.safetensors"):
        f.setdefault(p.stem, p)
    f["cfg_only"], f["no_model_dir"] = d / "cfg_only", d / "no_model_dir"

    # image folders (2 classes, 10×10 px)
    rng = np.random.default_rng(0)
    data = d / "data"
    mixed = data / "mixed"
    for c in ("a", "b"):
        (mixed / c).mkdir(parents=True)
        for i, mode in enumerate(MODES):
            a = _gray(rng, 10 + i)  # mixed sizes too
            im = Image.fromarray(a.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(a).convert(mode)
            im.save(mixed / c / (f"{i}.jpg" if mode == "CMYK" else f"{i}.png"))
    f["mixed"] = mixed
    f["empty_root"] = data / "empty_root"
    f["empty_root"].mkdir()
    f["no_images"] = data / "no_images"
    (f["no_images"] / "a").mkdir(parents=True)
    (f["no_images"] / "a" / "notes.txt").write_text("not an image")
    f["empty_class"] = _tree(data / "empty_class", {"a": 3, "b": 0}, rng)
    f["truncated_img"] = _tree(data / "truncated_img", {"a": 3, "b": 3}, rng)
    png = (f["truncated_img"] / "a" / "0.png").read_bytes()
    (f["truncated_img"] / "b" / "bad.png").write_bytes(png[: len(png) // 2])
    f["random_img"] = _tree(data / "random_img", {"a": 3, "b": 3}, rng)
    (f["random_img"] / "b" / "noise.jpg").write_bytes(rng.bytes(600))
    f["empty_img"] = _tree(data / "empty_img", {"a": 3, "b": 3}, rng)
    (f["empty_img"] / "b" / "zero.png").write_bytes(b"")
    f["bomb"] = _tree(data / "bomb", {"a": 3, "b": 3}, rng)
    (f["bomb"] / "b" / "bomb.png").write_bytes(_png(100_000, 100_000))
    f["file_not_folder"] = d / "dense.safetensors"
    f["missing"] = data / "does-not-exist"
    return f


BAD_DATA = {  # folder → a word the error must contain
    "missing": "no such folder",
    "file_not_folder": "not a folder",
    "empty_root": "no class folders",
    "no_images": "holds no images",
    "empty_class": "holds no images",
    "truncated_img": "bad.png",
    "random_img": "noise.jpg",
    "empty_img": "zero.png",
    "bomb": "too large",
}


# ---------------------------------------------------------------------------------------------- 1. pretrain recipes
RECIPE_CASES = {  # name → (file content or None for missing, exit code, word in the error)
    "missing": (None, EXIT_INPUT, "does not exist"),
    "empty": ("", EXIT_USAGE, "missing key 'nested'"),
    "not_yaml": ("model: {img_size: 8\n  nested: [", EXIT_INPUT, "not valid YAML"),
    "binary": (b"\xff\xfe\x00\x01garbage", EXIT_INPUT, "not UTF-8"),
    "a_list": ("- 1\n- 2\n", EXIT_INPUT, "mapping"),
    "a_number": ("42\n", EXIT_INPUT, "mapping"),
    "too_deep": ("[" * 5000, EXIT_INPUT, "nested too deeply"),
    "python_tag": ("!!python/object/apply:os.system ['true']\n", EXIT_INPUT, "not valid YAML"),
    "unknown_top_key": (TINY_RECIPE + "optimizer: adam\n", EXIT_USAGE, "unknown key 'optimizer'"),
    "unknown_nested_key": (TINY_RECIPE.replace("steps: 2,", "stepz: 2,"), EXIT_USAGE, "unknown key 'train.stepz'"),
    "wrong_type": (TINY_RECIPE.replace("steps: 2,", "steps: many,"), EXIT_USAGE, "train.steps"),
    "wrong_section_type": (TINY_RECIPE.replace("data: {source: digits, batch_size: 32}", "data: [digits]"), EXIT_USAGE, "data"),
    "missing_widths": (TINY_RECIPE.replace(", widths: [16, 32]", ""), EXIT_USAGE, "missing key 'nested.widths'"),
    "null_nested": (TINY_RECIPE.replace("nested: {depths: [1, 2], widths: [16, 32], sandwich: 1}", "nested: null"), EXIT_USAGE, "nested"),
    "unknown_family": (TINY_RECIPE.replace("model: {", "model: {family: transformer9000, "), EXIT_USAGE, "model"),
    "infinite_lr": (TINY_RECIPE.replace("steps: 2,", "steps: 2, lr: .inf,"), EXIT_USAGE, "finite"),
    "nan_mlp_ratio": (TINY_RECIPE.replace("head_dim: 16}", "head_dim: 16, mlp_ratio: .nan}"), EXIT_USAGE, "finite"),
    "bad_betas": (TINY_RECIPE.replace("steps: 2,", "steps: 2, betas: [0.9, 1.5],"), EXIT_USAGE, "betas"),
    "huge_seed": (TINY_RECIPE + "seed: 99999999999999999999999\n", EXIT_USAGE, "seed"),
    "bool_subset": (TINY_RECIPE.replace("batch_size: 32}", "batch_size: 32, train_subset: true}"), EXIT_USAGE, "boolean"),
    "width_not_head_multiple": (TINY_RECIPE.replace("widths: [16, 32]", "widths: [16, 40]"), EXIT_USAGE, "head_dim"),
    "absurd_width": (TINY_RECIPE.replace("widths: [16, 32]", "widths: [16, 16000000]"), EXIT_USAGE, "parameters"),
    "absurd_img_size": (TINY_RECIPE.replace("img_size: 8,", "img_size: 65536,"), EXIT_USAGE, "memory"),
    "zero_steps": (TINY_RECIPE.replace("steps: 2,", "steps: 0,"), EXIT_USAGE, "train.steps"),
    "negative_batch": (TINY_RECIPE.replace("batch_size: 32", "batch_size: -1"), EXIT_USAGE, "data.batch_size"),
    "too_many_templates": (TINY_RECIPE.replace("count: 8", "count: 100000"), EXIT_USAGE, "templates.count"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_pretrain_bad_recipe(tmp_path, case):
    content, code, word = RECIPE_CASES[case]
    recipe = tmp_path / "r.yaml"
    if isinstance(content, bytes):
        recipe.write_bytes(content)
    elif content is not None:
        recipe.write_text(content)
    run_case(["pretrain", recipe, "-o", "b.safetensors"], code, tmp_path, word)


SET_CASES = {  # --set value → (exit code, word in the error)
    "train.lr": (EXIT_USAGE, "key.sub=value"),
    "=1": (EXIT_USAGE, "key.sub=value"),
    "train..lr=1": (EXIT_USAGE, "key.sub=value"),
    ".lr=1": (EXIT_USAGE, "key.sub=value"),
    "train.nope=1": (EXIT_USAGE, "unknown key 'train.nope'"),
    "nope.lr=1": (EXIT_USAGE, "unknown key 'nope'"),
    "train.lr=abc": (EXIT_USAGE, "train.lr"),
    "train.lr=-1": (EXIT_USAGE, "train.lr"),
    "train.lr=nan": (EXIT_USAGE, "train.lr"),
    "nested.depths.x=1": (EXIT_USAGE, "not a section"),
    "train.steps.x.y=1": (EXIT_USAGE, "not a section"),
    "model=3": (EXIT_USAGE, "model"),
    "seed=-1": (EXIT_USAGE, "seed"),
    "train.steps=[[[[": (EXIT_USAGE, "train.steps"),
    "train.steps=" + "[" * 3000: (EXIT_USAGE, "nested too deeply"),
    "nested.widths=[]": (EXIT_USAGE, "widths"),
    "data.source=": (EXIT_USAGE, "data.source"),
}


@pytest.mark.parametrize("override", list(SET_CASES), ids=lambda s: s[:24])
def test_pretrain_bad_set(tmp_path, override):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    code, word = SET_CASES[override]
    run_case(["pretrain", "r.yaml", "-o", "b.safetensors", "--set", override], code, tmp_path, word)


def test_pretrain_bad_output_and_resume(tmp_path):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    run_case(["pretrain", "r.yaml", "-o", tmp_path / "nowhere" / "b.safetensors"], EXIT_OUTPUT, tmp_path, "does not exist")
    run_case(["pretrain", "r.yaml", "-o", "b.safetensors", "--resume"], EXIT_INPUT, tmp_path, "no checkpoint")
    run_case(["pretrain", "r.yaml", "-o", "b.safetensors", "--device", "tpu"], EXIT_USAGE, tmp_path, "device")


# ---------------------------------------------------------------------------------------------- 1. fit-scalers
BAD_BUNDLES = {
    "missing": "does not exist", "empty": "not a safetensors", "random": "not a valid safetensors",
    "json": "not a valid safetensors", "huge": "header claims", "truncated": "truncated",
    "nan_bundle": "non-finite", "dense": "not a weit file", "scalers": "weit.scalers",
}


@pytest.mark.parametrize("name", sorted(BAD_BUNDLES))
def test_fit_scalers_bad_bundle(ws, tmp_path, name):
    path = ws.get(name, tmp_path / "missing.safetensors")
    run_case(["fit-scalers", path, "--data", "digits", "--steps", "1", "-o", "s.safetensors"], EXIT_INPUT, tmp_path, BAD_BUNDLES[name])


FIT_OPTIONS = [
    (["--depth", "0"], "depth"), (["--depth", "-2"], "depth"), (["--width", "17"], "nearest valid"),
    (["--width", "0"], "width"), (["--width", "-16"], "width"), (["--depth", "100000000", "--width", "4096"], "parameters"),
    (["--depth", "1,2"], "one number"), (["--depth", "two"], "not a number"), (["--num-classes", "3"], "classes"),
    (["--mlp-ratio", "0.1"], "mlp ratio"), (["--depth-rule", "sideways"], "depth rule"), (["--width-rule", "stretch"], "width rule"),
    (["--steps", "0"], "--steps"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"), (["--temperature", "nan"], "--temperature"), (["--distill", "2"], "--distill"),
    (["--warmup", "-1"], "--warmup"), (["--train-subset", "0"], "train_subset"), (["--device", "tpu"], "device"),
    (["--seed", "99999999999999999999999"], "--seed"), (["--calibrate-batches", "0"], "calibrate"),
]


@pytest.mark.parametrize("opts,word", FIT_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_fit_scalers_impossible_options(ws, tmp_path, opts, word):
    run_case(["fit-scalers", ws["bundle"], "--data", "digits", "--steps", "1", *opts, "-o", "s.safetensors"], EXIT_USAGE, tmp_path, word)


@pytest.mark.parametrize(
    "scalers,sizes,word",
    [
        ("other_scalers", ["--depth", "1", "--width", "16"], "another bundle"),
        ("scalers", ["--depth", "2", "--width", "32"], "holds scalers for"),
        ("bundle", ["--depth", "1", "--width", "16"], "weit.templates"),
        ("inf_scalers", ["--depth", "1", "--width", "16"], "non-finite"),
        ("truncated", ["--depth", "1", "--width", "16"], "truncated"),
        ("missing", ["--depth", "1", "--width", "16"], "does not exist"),
    ],
)
def test_materialize_with_wrong_scalers(ws, tmp_path, scalers, sizes, word):
    path = ws.get(scalers, tmp_path / "missing.safetensors")
    run_case(["materialize", ws["bundle"], "--scalers", path, *sizes, "-o", "m"], EXIT_INPUT, tmp_path, word)


# ---------------------------------------------------------------------------------------------- 1. finetune
BAD_MODELS = {
    "missing": "does not exist", "empty": "not a safetensors", "random": "not a valid safetensors",
    "truncated": "truncated", "bundle": "weit.templates", "scalers": "weit.scalers", "json": "not a valid safetensors",
    "nan_dense": "non-finite", "cfg_only": "no weights", "no_model_dir": "no model.safetensors",
}


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_finetune_bad_model(ws, tmp_path, name):
    path = ws.get(name, tmp_path / "missing")
    run_case(["finetune", path, "--data", "digits", "--epochs", "1", "-o", "run"], EXIT_INPUT, tmp_path, BAD_MODELS[name])


FINETUNE_COMBOS = [  # (MODEL, options, exit code, word)
    ("small", ["--init", "weight-selection"], EXIT_USAGE, "--from"),
    ("small", ["--from", "@model"], EXIT_USAGE, "only used by --init weight-selection"),
    ("small", ["--init", "random", "--from", "@model"], EXIT_USAGE, "only used by --init weight-selection"),
    ("small", ["--init", "weight-selection", "--from", "@missing"], EXIT_INPUT, "does not exist"),
    ("small", ["--init", "weight-selection", "--from", "@bundle"], EXIT_INPUT, "weit.templates"),
    ("small", ["--init", "weight-selection", "--from", "@truncated"], EXIT_INPUT, "truncated"),
    ("small", ["--init", "weight-selection", "--from", "@nan_dense"], EXIT_INPUT, "non-finite"),
    ("model", ["--init", "weight-selection", "--from", "@small"], EXIT_USAGE, "smaller"),
    ("small", ["--init", "pretrained"], EXIT_USAGE, "--init"),
    ("small", ["--schedule", "linear"], EXIT_USAGE, "--schedule"),
    ("small", ["--epochs", "0"], EXIT_USAGE, "--epochs"),
    ("small", ["--lr", "nan"], EXIT_USAGE, "--lr"),
    ("small", ["--batch-size", "0"], EXIT_USAGE, "--batch-size"),
    ("small", ["--label-smoothing", "1"], EXIT_USAGE, "--label-smoothing"),
    ("small", ["--device", "tpu"], EXIT_USAGE, "device"),
    ("small", ["--seed", "99999999999999999999999"], EXIT_USAGE, "--seed"),
    ("small", ["--data-seed", "-1"], EXIT_USAGE, "--data-seed"),
]


@pytest.mark.parametrize("model,opts,code,word", FINETUNE_COMBOS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_finetune_bad_options(ws, tmp_path, model, opts, code, word):
    opts = [ws.get(o[1:], tmp_path / "missing") if isinstance(o, str) and o.startswith("@") else o for o in opts]
    args = ["finetune", ws[model], "--data", "digits", "--train-subset", "64", *opts]
    if "--epochs" not in opts:
        args += ["--epochs", "1"]
    run_case([*args, "-o", "run"], code, tmp_path, word)


def test_finetune_bad_run_folder(ws, tmp_path):
    run_case(["finetune", ws["small"], "--data", "digits", "--epochs", "1", "-o", tmp_path / "no" / "run"], EXIT_OUTPUT, tmp_path, "does not exist")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("keep")
    run_case(["finetune", ws["small"], "--data", "digits", "--epochs", "1", "-o", "precious", "--force"], EXIT_OUTPUT, tmp_path, "not a finetune run folder")
    run_case(["finetune", ws["small"], "--data", "digits", "--epochs", "1", "-o", "precious", "--resume"], EXIT_INPUT, tmp_path, "no resumable")


# ---------------------------------------------------------------------------------------------- 1. data folders
def _data_command(cmd: str, ws, folder: Path) -> list:
    if cmd == "pretrain":
        return ["pretrain", "r.yaml", "-o", "b.safetensors", "--data", folder]
    if cmd == "fit-scalers":
        return ["fit-scalers", ws["bundle"], "--data", folder, "--steps", "1", "-o", "s.safetensors"]
    if cmd == "finetune":
        return ["finetune", ws["small"], "--data", folder, "--epochs", "1", "-o", "run"]
    if cmd == "extract-templates":
        return ["extract-templates", ws["model"], "--data", folder, "--distill-steps", "1", "-o", "b.safetensors"]
    raise AssertionError(cmd)


DATA_COMMANDS = ["pretrain", "fit-scalers", "finetune", "extract-templates"]


@pytest.mark.parametrize("cmd", DATA_COMMANDS)
@pytest.mark.parametrize("folder", sorted(BAD_DATA))
def test_bad_data_folders(ws, tmp_path, cmd, folder):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    run_case(_data_command(cmd, ws, ws[folder]), EXIT_INPUT, tmp_path, BAD_DATA[folder])


def test_mixed_image_modes_load_consistently(ws, tmp_path):
    """RGBA, L, P, LA, 1, CMYK and 16-bit gray, of different sizes, in one tree: all load, finite, in
    range, as gray or RGB; one gray picture reads the same whatever lossless mode it was saved in."""
    from PIL import Image, UnidentifiedImageError

    from weit_cli.data.images import _read_image, _to_channels, clear_cache, load_data

    for chans in (1, 3):
        clear_cache()
        s = load_data(str(ws["mixed"]), img_size=8, in_chans=chans, seed=0, val_fraction=0.0)
        x = torch.cat([s.train.tensors[0], s.test.tensors[0]])
        assert x.shape == (2 * len(MODES), chans, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1.0
        assert sorted(set(torch.cat([s.train.tensors[1], s.test.tensors[1]]).tolist())) == [0, 1]
    gray = _gray(np.random.default_rng(7))
    want = torch.from_numpy(gray.astype(np.float32) / 255.0)
    for mode in ("L", "RGB", "RGBA", "P", "LA", "I;16"):
        im = Image.fromarray(gray.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(gray).convert(mode)
        im.save(tmp_path / f"{mode.replace(';', '')}.png")
        t = torch.from_numpy(_read_image(tmp_path / f"{mode.replace(';', '')}.png", Image, UnidentifiedImageError))
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        assert torch.allclose(_to_channels(t.unsqueeze(0), 1)[0, 0], want, atol=1e-6), mode  # 16-bit: /65535, not clipped


@pytest.mark.parametrize("cmd", ["pretrain", "fit-scalers", "finetune"])
def test_mixed_image_modes_train(ws, tmp_path, cmd):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE.replace("steps: 2,", "steps: 1,"))
    args = _data_command(cmd, ws, ws["mixed"])
    r = weit(*args, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert Path(tmp_path / out["output"]).exists()


# ---------------------------------------------------------------------------------------------- 2. fuzzing
# WEIT_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps these five tests to a few seconds.
FUZZ = settings(max_examples=int(os.environ.get("WEIT_FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RESNET_RECIPE = """\
model: {family: resnet, img_size: 16, in_chans: 1, stage_ratios: [1, 2, 2, 2]}
templates: {size: 8, count: 8}
nested: {depths: [1, 2], widths: [8, 16]}
data: {source: digits, batch_size: 32}
"""
KEYS = sorted({
    "model", "templates", "nested", "data", "train", "seed", "family", "vit", "resnet", "img_size", "patch_size",
    "in_chans", "head_dim", "mlp_ratio", "global_pool", "block", "stem_type", "stage_ratios", "avg_down",
    "bn_calibration_batches", "size", "count", "init", "qkv", "proj", "fc1", "fc2", "conv3x3", "conv1x1", "depths",
    "widths", "sandwich", "distill", "distill_temperature", "source", "val_fraction", "train_subset", "batch_size",
    "steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip", "label_smoothing",
    "eval_every", "eval_samples", "checkpoint_every",
})
key_st = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
scalar_st = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(["vit", "resnet", "basic", "deep", "token", "timm-svd", "digits"]),
)
value_st = st.recursive(scalar_st, lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(key_st, c, max_size=5)), max_leaves=25)
PATHS = [(s, k) for s, ks in {
    "model": ["family", "img_size", "patch_size", "in_chans", "head_dim", "mlp_ratio", "global_pool", "block", "stem_type", "stage_ratios", "avg_down"],
    "templates": ["size", "count", "init"], "nested": ["depths", "widths", "sandwich", "distill", "distill_temperature"],
    "data": ["source", "val_fraction", "train_subset", "batch_size"],
    "train": ["steps", "lr", "min_lr_ratio", "warmup_steps", "betas", "grad_clip", "label_smoothing", "eval_every", "checkpoint_every"],
}.items() for k in ks]


def _expect_recipe_or_weit_error(call):
    """The property: a valid Recipe (whose resolved YAML validates to the same recipe) or a one-line WeitError."""
    from weit_cli import recipe as rcp

    try:
        r = call()
    except WeitError as e:
        assert e.message and "\n" not in e.message and e.hint, repr(e.message)
        return None
    assert isinstance(r, rcp.Recipe)
    again = rcp.validate(yaml.safe_load(rcp.dump(r)))
    assert rcp.digest(again) == rcp.digest(r)
    return r


@FUZZ
@given(doc=st.one_of(st.dictionaries(key_st, value_st, max_size=6), value_st))
def test_fuzz_recipe_random_documents(tmp_path, doc):
    from weit_cli.recipe import load_recipe

    p = tmp_path / "fuzz.yaml"
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _expect_recipe_or_weit_error(lambda: load_recipe(p))


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=200)))
def test_fuzz_recipe_random_text(tmp_path, text):
    from weit_cli.recipe import load_recipe

    p = tmp_path / "fuzz.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    _expect_recipe_or_weit_error(lambda: load_recipe(p))


@FUZZ
@given(base=st.sampled_from([TINY_RECIPE, RESNET_RECIPE]), edits=st.lists(st.tuples(st.sampled_from(PATHS), value_st), min_size=1, max_size=3))
def test_fuzz_recipe_mutations(base, edits):
    """Valid recipes (ViT and ResNet) with a few values replaced by anything: deep validation paths."""
    from weit_cli.recipe import validate

    raw = yaml.safe_load(base)
    for (section, key), value in edits:
        raw.setdefault(section, {})[key] = value
    _expect_recipe_or_weit_error(lambda: validate(raw))


override_st = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.lists(key_st, min_size=1, max_size=3).map(".".join), st.text(max_size=20)),
    st.builds(lambda p, v: f"{p[0]}.{p[1]}={yaml.safe_dump(v, default_flow_style=True).strip()}", st.sampled_from(PATHS), value_st),
)


@FUZZ
@given(overrides=st.lists(override_st, min_size=1, max_size=3))
def test_fuzz_set_parser(tmp_path, overrides):
    from weit_cli.recipe import load_recipe

    p = tmp_path / "r.yaml"
    if not p.exists():
        p.write_text(TINY_RECIPE)
    _expect_recipe_or_weit_error(lambda: load_recipe(p, overrides))


# ---------------------------------------------------------------------------------------------- 3. SIGKILL + --resume
KILLER = r"""
import os, signal, sys
import torch

torch.set_num_threads(1)
mode, at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
import weit_cli.commands.finetune as finetune, weit_cli.commands.pretrain as pretrain, weit_cli.training.optim as train

def die():
    # SIGKILL: no handler, no cleanup (a power cut, the OOM killer); SIGTERM: a CI timeout, `kill`
    os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))

if mode == "step":  # during optimiser step `at` (1-based), after the backward pass
    real, calls = train.clip_grad, [0]
    def clip(params, max_norm):
        calls[0] += 1
        if calls[0] == at:
            die()
        return real(params, max_norm)
    train.clip_grad = clip  # training/loop.py steps through optim.optimizer_step, which calls it
elif mode == "between-checkpoint-files":  # checkpoint number `at`: after its first file is renamed into place
    real, seen = os.replace, [0]
    def replace(src, dst, *a, **k):
        out = real(src, dst, *a, **k)
        if os.path.basename(str(dst)).startswith(("bundle.ckpt.safetensors", "state.safetensors", "fit.ckpt.safetensors")):
            seen[0] += 1
            if seen[0] == 2 * at - 1:
                die()
        return out
    os.replace = replace
elif mode == "after-bundle":  # pretrain wrote its bundle, not yet its recipe, and still has its checkpoint
    pretrain.atomic_file = lambda *a, **k: die()
elif mode == "write":  # while the at-th tensor of an output file is being produced
    import weit_cli.io.export as api
    real = api.write_safetensors
    def write(path, specs, metadata):
        specs, made = list(specs), [0]
        def wrap(make):
            def inner():
                made[0] += 1
                if made[0] == at:
                    die()
                return make()
            return inner
        return real(path, [(n, sh, dt, wrap(mk)) for n, sh, dt, mk in specs], metadata)
    api.write_safetensors = write
else:  # "before-best" / "before-last": before the at-th write of that model folder (after its checkpoint)
    real, seen = finetune._write_model, [0]
    def write(adapter, arch, state, out, provenance):
        if out.name == mode.removeprefix("before-"):
            seen[0] += 1
            if seen[0] == at:
                die()
        return real(adapter, arch, state, out, provenance)
    finetune._write_model = write

from weit_cli.cli import app
sys.argv = ["weit", *args]
app()
"""
KILL_RECIPE = TINY_RECIPE.replace(
    "train: {steps: 2, warmup_steps: 1, eval_every: 0, eval_samples: 64, checkpoint_every: 0}",
    "train: {steps: 8, warmup_steps: 2, eval_every: 4, eval_samples: 64, checkpoint_every: 2}",
)
PRETRAIN_ARGS = ["pretrain", "tiny.yaml", "-o", "bundle.safetensors"]
PRETRAIN_COMMAND = "weit " + " ".join(PRETRAIN_ARGS)  # what the CLI records in provenance


def _killed(mode: str, at: int, args: list, cwd: Path, sig: str = "SIGKILL", code: int = -signal.SIGKILL) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", KILLER, mode, str(at), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       env={**ENV, "KILL_SIGNAL": sig}, timeout=300)
    assert p.returncode == code, f"{sig} {mode} {at}: expected exit {code}, got {p.returncode}: {p.stderr[-2000:]}"
    return p


def _files(folder: Path, ignore=()) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ignore}


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory) -> dict[str, bytes]:
    from weit_cli.commands.pretrain import pretrain

    d = tmp_path_factory.mktemp("pretrain_ref")
    (d / "tiny.yaml").write_text(KILL_RECIPE)
    old = os.getcwd()
    os.chdir(d)
    try:
        pretrain(Path("tiny.yaml"), Path("bundle.safetensors"), command=PRETRAIN_COMMAND)
    finally:
        os.chdir(old)
    return _files(d)


def _resume_pretrain(run: Path) -> dict:
    from weit_cli.commands.pretrain import pretrain

    old = os.getcwd()
    os.chdir(run)
    try:
        return pretrain(Path("tiny.yaml"), Path("bundle.safetensors"), resume=True, command=PRETRAIN_COMMAND)
    finally:
        os.chdir(old)


@pytest.mark.parametrize("mode", ["step", "between-checkpoint-files", "after-bundle"])
def test_pretrain_sigkill_then_resume_is_byte_identical(tmp_path, pretrain_reference, mode):
    """SIGKILL at a seeded random step (≥ 1 checkpoint written), between the two files of the second
    checkpoint, or after the bundle but before the recipe and the checkpoint's removal; --resume then
    writes exactly the uninterrupted run's bytes (bundle + recipe) and leaves nothing else."""
    at = random.Random(5).randint(3, 8) if mode == "step" else 2  # step 3..8 of 8: a checkpoint every 2 steps
    where = f"SIGKILL {mode} {at}"
    (tmp_path / "tiny.yaml").write_text(KILL_RECIPE)
    _killed(mode, at, PRETRAIN_ARGS, tmp_path)
    assert (tmp_path / "bundle.safetensors").exists() == (mode == "after-bundle"), where
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == [], where  # killed between writes
    r = _resume_pretrain(tmp_path)
    expected_from = {"step": 2 * ((at - 1) // 2), "between-checkpoint-files": 4, "after-bundle": 6}[mode]
    assert r["resumed_from"] in (expected_from, expected_from - 2), (where, r["resumed_from"])
    assert _files(tmp_path) == pretrain_reference, f"{where}: resumed run differs from the uninterrupted one"


def test_sigterm_during_pretrain_keeps_the_checkpoint_and_resumes(tmp_path, pretrain_reference):
    """SIGTERM (a CI timeout) takes the Ctrl-C path: exit 130, one line naming the kept checkpoint."""
    (tmp_path / "tiny.yaml").write_text(KILL_RECIPE)
    p = _killed("step", 6, PRETRAIN_ARGS, tmp_path, sig="SIGTERM", code=EXIT_INTERRUPTED)
    assert_clean_failure(p, EXIT_INTERRUPTED, names="checkpoint at step 4 is kept")
    assert "--resume" in p.stderr
    assert _resume_pretrain(tmp_path)["resumed_from"] == 4
    assert _files(tmp_path) == pretrain_reference


@pytest.mark.parametrize("out_name", ["m.safetensors", "m"])
def test_sigterm_during_materialize_leaves_nothing(ws, tmp_path, out_name):
    p = _killed("write", 5, ["materialize", ws["bundle"], "--depth", "3", "-o", out_name], tmp_path, sig="SIGTERM", code=EXIT_INTERRUPTED)
    assert_clean_failure(p, EXIT_INTERRUPTED, names="interrupted")
    assert listing(tmp_path) == []


FT_OPTS = ["--data", "digits", "--epochs", "3", "--train-subset", "160", "--batch-size", "32", "--lr", "2e-3"]
FT_KW = dict(data="digits", epochs=3, train_subset=160, batch_size=32, lr=2e-3)


@pytest.fixture(scope="module")
def finetune_reference(tmp_path_factory, ws) -> Path:
    from weit_cli.commands.finetune import finetune

    d = tmp_path_factory.mktemp("ft_ref")
    finetune(ws["small"], d / "run", **FT_KW)
    return d / "run"


def _without_times(run: Path) -> dict[str, bytes]:
    files = _files(run, ignore=("metrics.json",))
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    files["epochs"] = json.dumps([{k: v for k, v in e.items() if not k.endswith("_s")} for e in epochs]).encode()
    return files


@pytest.mark.parametrize("mode,at", [("step", None), ("before-best", 1), ("before-last", 3)])
def test_finetune_sigkill_then_resume_is_byte_identical(tmp_path, ws, finetune_reference, mode, at):
    """SIGKILL at a seeded random step after the first epoch's checkpoint, or right after a checkpoint
    but before the model folders it describes are written (epoch 1's best/, the last epoch's last/);
    --resume then leaves exactly the uninterrupted run: last/, best/, args.json, metrics (times aside)."""
    from weit_cli.commands.finetune import finetune

    if at is None:  # 5 steps per epoch, 15 in all: kill in epoch 2 or 3
        at = random.Random(11).randint(6, 15)
    where = f"SIGKILL {mode} {at}"
    _killed(mode, at, ["finetune", ws["small"], *FT_OPTS, "-o", "run"], tmp_path)
    run = tmp_path / "run"
    assert (run / "state.safetensors").exists() and not list(run.rglob("*.tmp")), where
    r = finetune(ws["small"], run, resume=True, **FT_KW)
    assert r["resumed_from_epoch"] >= 1, where
    got, want = _without_times(run), _without_times(finetune_reference)
    assert got.keys() == want.keys(), (where, sorted(got), sorted(want))
    assert [k for k in want if got[k] != want[k]] == [], f"{where}: resumed run differs from the uninterrupted one"


FIT_KW = dict(data="digits", depth=1, width=16, steps=8, batch_size=16, train_subset=96, distill=0.5, checkpoint_every=2)
FIT_OPTS = ["--data", "digits", "--depth", "1", "--width", "16", "--steps", "8", "--batch-size", "16", "--train-subset", "96",
            "--distill", "0.5", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def fit_reference(tmp_path_factory, ws) -> bytes:
    from weit_cli.commands.fit_scalers import fit_scalers

    out = tmp_path_factory.mktemp("fit_ref") / "fit.safetensors"
    fit_scalers(ws["bundle"], out, **FIT_KW)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fit.safetensors"]  # the checkpoint went
    return out.read_bytes()


@pytest.mark.parametrize("mode", ["step", "between-checkpoint-files"])
def test_fit_scalers_sigkill_then_resume_is_byte_identical(tmp_path, ws, fit_reference, mode):
    """Issue 13: SIGKILL at a seeded random step (≥ 1 checkpoint written) or between the two files of
    the second checkpoint; a plain rerun is refused while the checkpoint is there, and --resume writes
    exactly the uninterrupted fit's bytes and leaves nothing else."""
    from weit_cli.commands.fit_scalers import fit_scalers

    at = random.Random(13).randint(3, 8) if mode == "step" else 2  # step 3..8 of 8: a checkpoint every 2 steps
    where = f"SIGKILL {mode} {at}"
    _killed(mode, at, ["fit-scalers", ws["bundle"], *FIT_OPTS, "-o", "fit.safetensors"], tmp_path)
    assert (tmp_path / "fit.ckpt.safetensors").exists() and not (tmp_path / "fit.safetensors").exists(), where
    p = run_case(["fit-scalers", ws["bundle"], *FIT_OPTS, "-o", "fit.safetensors"], EXIT_INPUT, tmp_path, "--resume")
    assert "unfinished run" in p.stderr, where
    r = fit_scalers(ws["bundle"], tmp_path / "fit.safetensors", resume=True, **FIT_KW)
    expected_from = {"step": 2 * ((at - 1) // 2), "between-checkpoint-files": 4}[mode]
    assert r["resumed_from"] in (expected_from, expected_from - 2), (where, r["resumed_from"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.safetensors"], where
    assert (tmp_path / "fit.safetensors").read_bytes() == fit_reference, f"{where}: resumed fit differs from the uninterrupted one"


def test_fit_scalers_resume_refuses_another_fit(tmp_path, ws):
    """--resume with other options, or with no checkpoint, is an input error; --force starts over."""
    from weit_cli.commands.fit_scalers import fit_scalers

    args = ["fit-scalers", ws["bundle"], *FIT_OPTS, "-o", "fit.safetensors"]
    run_case([*args, "--resume"], EXIT_INPUT, tmp_path, "no checkpoint")
    p = _killed("step", 4, args, tmp_path, sig="SIGTERM", code=EXIT_INTERRUPTED)
    assert_clean_failure(p, EXIT_INTERRUPTED, names="checkpoint at step 2 is kept")
    run_case([*[a if a != "0.5" else "0.25" for a in args], "--resume"], EXIT_INPUT, tmp_path, "other options")
    r = fit_scalers(ws["bundle"], tmp_path / "fit.safetensors", force=True, **FIT_KW)
    assert r["resumed_from"] is None and sorted(p.name for p in tmp_path.iterdir()) == ["fit.safetensors"]


def test_absurd_resnet_depth_is_refused_not_counted():
    """The ResNet parameter count once looped over every block: depth 10**18 hung instead of failing."""
    from weit_cli.recipe import validate

    raw = yaml.safe_load(RESNET_RECIPE)
    raw["nested"]["depths"] = [1, 10**18]
    with pytest.raises(WeitError, match="parameters"):
        validate(raw)


# ---------------------------------------------------------------------------------------------- 4. writers
def _check_model_folder(folder: Path) -> int:
    """A complete timm folder whose config and weights come from the same writer; returns its depth."""
    import timm

    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert len(model.blocks) == cfg["model_args"]["depth"]
    return cfg["model_args"]["depth"]


RACER = r"""
import os, sys, time
out, gate, args = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3:]
waited = [False]

def at_gate():
    # Both writers wait here, right before their first rename/link onto the output, then go together:
    # the worst interleaving of the exists-check, the set-aside and the final rename.
    if waited[0]:
        return
    waited[0] = True
    open(os.path.join(gate, str(os.getpid())), "w").close()
    deadline = time.time() + 60
    while len(os.listdir(gate)) < 2 and time.time() < deadline:
        time.sleep(0.005)

for name in ("replace", "link"):
    real = getattr(os, name)
    def patched(src, dst, *a, _real=real, **k):
        if out in (os.path.abspath(str(src)), os.path.abspath(str(dst))):
            at_gate()
        return _real(src, dst, *a, **k)
    setattr(os, name, patched)

from weit_cli.cli import app
sys.argv = ["weit", *args]
app()
"""


def _race(ws, tmp_path: Path, out: Path, force: bool) -> list[tuple[int, str]]:
    gate = tmp_path.parent / f"{tmp_path.name}-gate-{random.random()}"
    gate.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(out), str(gate), "materialize", str(ws["bundle"]), "--depth", str(depth),
                          "--width", "64", "-o", str(out), *(["--force"] if force else [])],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for depth in (6, 7)
    ]
    out_ = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    shutil.rmtree(gate)
    return out_


def _written_depth(out: Path) -> int:
    if out.is_dir():
        return _check_model_folder(out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        depth = json.loads(f.metadata()["model_args"])["depth"]
        assert sum(k.endswith("attn.qkv.weight") for k in f.keys()) == depth
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    return depth


@pytest.mark.parametrize("out_name", ["model.safetensors", "model_dir"])
def test_concurrent_materialize_to_one_path(ws, tmp_path, out_name):
    """Two processes write different sizes to one path, forced to rename at the same moment: with
    --force (onto nothing, then onto a previous result) both succeed and one writer's whole model is
    left (its config.json and weights agree); without --force exactly one wins and the other says
    the output exists. Never a temp file or a set-aside folder left behind."""
    out = tmp_path / out_name
    files = [out_name] if out_name.endswith(".safetensors") else [out_name, f"{out_name}/config.json", f"{out_name}/model.safetensors"]
    for round_ in range(2 if out_name == "model_dir" else 1):  # a folder: onto nothing, then onto the result
        results = _race(ws, tmp_path, out, force=True)
        assert [code for code, _ in results] == [0, 0], (round_, results)
        assert listing(tmp_path) == files and _written_depth(out) in (6, 7)
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    results = _race(ws, tmp_path, out, force=False)
    assert sorted(code for code, _ in results) == [0, EXIT_OUTPUT], results
    loser = next(err for code, err in results if code)
    assert "already exists" in loser and "Traceback" not in loser
    assert listing(tmp_path) == files and _written_depth(out) in (6, 7)


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def mounts(tmp_path):
    """A read-only tmpfs (root ignores chmod, not a read-only mount), a read-only bind mount holding
    an existing model, and a full 64 KiB tmpfs. Skipped where mount is not allowed."""
    ro, bind_src, bind, full = (tmp_path / n for n in ("ro", "bind_src", "bind", "full"))
    for p in (ro, bind_src, bind, full):
        p.mkdir()
    (bind_src / "m.safetensors").write_bytes(b"previous model")
    done = []
    try:
        for args, target in ((["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], ro),
                             (["--bind", str(bind_src), str(bind)], bind),
                             (["-o", "remount,ro,bind", str(bind)], None),
                             (["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], full)):
            if not _mount(args):
                pytest.skip(f"cannot mount here (needs root and mount): mount {' '.join(args)}")
            if target is not None:
                done.append(target)
        yield {"ro": ro, "bind": bind, "full": full}
    finally:
        for p in reversed(done):
            subprocess.run(["umount", str(p)], capture_output=True)


def test_read_only_and_full_output_folders(ws, tmp_path, mounts):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    ro, bind, full = mounts["ro"], mounts["bind"], mounts["full"]
    commands = {
        "materialize file": ["materialize", ws["bundle"], "--depth", "4", "--width", "64", "-o"],
        "materialize folder": ["materialize", ws["bundle"], "--depth", "4", "--width", "64", "-o"],
        "extract-templates": ["extract-templates", ws["model"], "-o"],
        "fit-scalers": ["fit-scalers", ws["bundle"], "--data", "digits", "--steps", "1", "--train-subset", "64", "-o"],
        "pretrain": ["pretrain", "r.yaml", "-o"],
        "finetune": ["finetune", ws["small"], "--data", "digits", "--epochs", "1", "--train-subset", "64", "-o"],
    }
    name = {"materialize folder": "m", "finetune": "run"}
    for what, args in commands.items():
        out = name.get(what, "m.safetensors")
        # read-only: refused up front, before any work, nothing written
        r = weit(*args, ro / out, cwd=tmp_path)
        assert_clean_failure(r, EXIT_OUTPUT, names="not writable")
        assert listing(ro) == [], what
        # read-only bind mount over an existing output, with --force: refused, the old file untouched
        r = weit(*args, bind / "m.safetensors", "--force", cwd=tmp_path)
        assert r.returncode == EXIT_OUTPUT and "not writable" in r.stderr, (what, r.stderr)
        assert (bind / "m.safetensors").read_bytes() == b"previous model" and listing(bind) == ["m.safetensors"]
    # full disk (64 KiB; every model here is bigger): a clear error and no temp file left
    for what in ("materialize file", "materialize folder", "extract-templates"):
        r = weit(*commands[what], full / name.get(what, "m.safetensors"), cwd=tmp_path)
        assert_clean_failure(r, EXIT_OUTPUT, names="No space left")
        assert listing(full) == [], what


# ---------------------------------------------------------------------------------------------- 5. untrusted files
class _Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def pickles(tmp_path) -> dict[str, Path]:
    import pickle

    marker = tmp_path / "PWNED"
    d = tmp_path / "evil"
    d.mkdir()
    with open(d / "raw.pth", "wb") as f:  # a plain pickle, the old torch format
        pickle.dump({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, f)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, d / "zip.pt")  # torch's zip format
    shutil.copy(d / "raw.pth", d / "disguised.safetensors")
    (d / "folder").mkdir()
    shutil.copy(d / "zip.pt", d / "folder" / "pytorch_model.bin")
    return {"marker": marker, **{p.stem if p.is_file() else p.name: p for p in d.iterdir()}}


def test_malicious_pickles_are_refused_and_never_run(ws, tmp_path, pickles):
    marker = pickles["marker"]
    cases = [  # (args, exit code)
        (["extract-templates", pickles["raw"], "-o", "b.safetensors"], EXIT_INPUT),
        (["extract-templates", pickles["zip"], "-o", "b.safetensors"], EXIT_INPUT),
        (["extract-templates", pickles["folder"], "-o", "b.safetensors"], EXIT_INPUT),
        (["extract-templates", pickles["disguised"], "-o", "b.safetensors"], EXIT_INPUT),
        (["finetune", pickles["zip"], "--data", "digits", "--epochs", "1", "-o", "run"], EXIT_INPUT),
        (["finetune", ws["small"], "--init", "weight-selection", "--from", pickles["raw"], "--data", "digits", "--epochs", "1", "-o", "run"], EXIT_INPUT),
        (["finetune", ws["small"], "--init", "weight-selection", "--from", pickles["folder"], "--data", "digits", "--epochs", "1", "-o", "run"], EXIT_INPUT),
        (["inspect", pickles["zip"]], EXIT_INPUT),
        (["inspect", pickles["raw"]], EXIT_INPUT),
        (["materialize", pickles["zip"], "-o", "m"], EXIT_INPUT),
        (["fit-scalers", pickles["raw"], "--data", "digits", "-o", "s.safetensors"], EXIT_INPUT),
    ]
    for args, code in cases:
        before = listing(tmp_path)
        r = weit(*args, cwd=tmp_path)
        assert_clean_failure(r, code, before=before, cwd=tmp_path)
        if args[0] in ("extract-templates", "finetune", "inspect") and "disguised" not in str(args[1]):
            assert "pickled Python objects" in r.stderr, r.stderr
        assert not marker.exists(), f"{args}: the payload ran"
    # A plain tensor state dict in a .pt is fine (loaded with weights_only=True).
    from weit_cli.io.files import load_dense

    torch.save(load_dense(ws["model"])[0], tmp_path / "benign.pt")
    r = weit("inspect", tmp_path / "benign.pt", "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["kind"] == "dense", r.stdout + r.stderr
    # Positive control: the payloads are live — an unsafe load runs them (in a throw-away process).
    control = textwrap.dedent(f"""
        import pickle, torch
        torch.load({str(pickles['zip'])!r}, weights_only=False)
        print('zip ran' if __import__('os').path.exists({str(marker)!r}) else 'zip inert')
        __import__('os').remove({str(marker)!r})
        pickle.load(open({str(pickles['raw'])!r}, 'rb'))
        print('raw ran' if __import__('os').path.exists({str(marker)!r}) else 'raw inert')
    """)
    p = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.stdout.split() == ["zip", "ran", "raw", "ran"], p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------- 6. pipelines
def _one_json_object(r) -> dict:
    lines = r.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be exactly one JSON line:\n{r.stdout}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    assert not any(ln.lstrip().startswith("{") for ln in r.stderr.splitlines()), r.stderr
    return obj


def test_json_success_is_one_object_for_every_command(ws, tmp_path):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE.replace("steps: 2,", "steps: 1,"))
    runs = {
        "list-archs": ["list-archs"],
        "inspect bundle": ["inspect", ws["bundle"]],
        "inspect scalers": ["inspect", ws["scalers"]],
        "inspect model": ["inspect", ws["model"]],
        "extract-templates": ["extract-templates", ws["model"], "-o", "b.safetensors", "--data", "digits", "--distill-steps", "1"],
        "materialize": ["materialize", ws["bundle"], "--depth", "1", "-o", "m"],
        "fit-scalers": ["fit-scalers", ws["bundle"], "--data", "digits", "--steps", "2", "--train-subset", "64", "-o", "s.safetensors"],
        "pretrain": ["pretrain", "r.yaml", "-o", "p.safetensors"],
        "finetune": ["finetune", ws["small"], "--data", "digits", "--epochs", "1", "--train-subset", "64", "-o", "run"],
    }
    for what, args in runs.items():
        r = weit(*args, "--json", cwd=tmp_path)
        assert r.returncode == 0, (what, r.stdout, r.stderr)
        obj = _one_json_object(r)
        assert "error" not in obj, what
        if "-o" in args:
            assert (tmp_path / obj["output"]).exists(), what
    assert sorted(_one_json_object(weit("list-archs", "--json", cwd=tmp_path))["families"]) == ["decision-transformer", "dit", "resnet", "vit"]


ERROR_RUNS = {
    "inspect": (["inspect", "nope.safetensors"], EXIT_INPUT),
    "extract-templates": (["extract-templates", "nope", "-o", "b.safetensors"], EXIT_INPUT),
    "materialize": (["materialize", "@bundle", "--width", "33", "-o", "m"], EXIT_USAGE),
    "fit-scalers": (["fit-scalers", "@bundle", "--data", "@empty_class", "-o", "s.safetensors"], EXIT_INPUT),
    "pretrain": (["pretrain", "r.yaml", "-o", "p.safetensors", "--set", "train.nope=1"], EXIT_USAGE),
    "finetune": (["finetune", "@small", "--data", "digits", "--epochs", "1", "-o", "@bind_missing/run"], EXIT_OUTPUT),
}


@pytest.mark.parametrize("what", sorted(ERROR_RUNS))
def test_json_errors_are_one_object_for_every_command(ws, tmp_path, what):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    args, code = ERROR_RUNS[what]
    args = [str(tmp_path / "missing" / a.split("/", 1)[1]) if a.startswith("@bind_missing") else ws[a[1:]] if a.startswith("@") else a for a in args]
    before = listing(tmp_path)
    r = weit(*args, "--json", cwd=tmp_path)
    obj = _one_json_object(r)
    assert r.returncode == code and obj["exit_code"] == code and obj["error"] and obj["hint"], (what, obj)
    assert r.stderr.strip() == "" and listing(tmp_path) == before, (what, r.stderr)


def test_real_shell_pipeline(ws, tmp_path):
    """extract-templates --json | read .output | materialize --json | read .output | inspect --json,
    through real pipes; then a failing step: its JSON error is read from the pipe, its exit code kept."""
    py, weit_ = sys.executable, f"{sys.executable} -m weit_cli.cli"
    get = lambda expr: f"{py} -c 'import json,sys; d=json.load(sys.stdin); print({expr})'"  # noqa: E731
    script = f"""
        set -euo pipefail
        bundle=$({weit_} extract-templates {ws['model']} -o b.safetensors --json | {get('d["output"]')})
        {weit_} materialize "$bundle" --depth 1 --width 16 -o m --json | {get('d["output"]')} \\
            | xargs -I{{}} {weit_} inspect {{}} --json | {get('d["kind"], d["architecture"]["depth"], d["architecture"]["width"]')}
        set +e
        {weit_} materialize nope.safetensors -o x --json | {get('d["exit_code"], d["error"]')}
        echo "status ${{PIPESTATUS[0]}}"
    """
    p = subprocess.run(["bash", "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[0] == "dense 1 16", p.stdout + p.stderr
    assert lines[1].startswith("3 ") and "does not exist" in lines[1] and lines[2] == f"status {EXIT_INPUT}", p.stdout
    assert sorted(os.listdir(tmp_path)) == ["b.safetensors", "m"]


def test_json_usage_errors_in_a_real_process(ws, tmp_path):
    """click's own usage errors (missing option, not a number) are one JSON object too."""
    for args in (["fit-scalers", ws["bundle"], "-o", "s.safetensors"], ["materialize", ws["bundle"], "--depth", "x", "-o", "m"]):
        p = weit_process(*args, "--json", cwd=tmp_path)
        obj = _one_json_object(p)
        assert p.returncode == EXIT_USAGE == obj["exit_code"] and obj["error"], obj
    assert os.listdir(tmp_path) == []
