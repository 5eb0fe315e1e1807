"""Golden outputs: a fixed set of commands on tiny ViTs and ResNets gives the same bytes as it did
before the family/task/export redesign (issue 9). The hashes were first recorded at commit 0c4b593;
on 2026-12-03 a fresh .venv on this machine (timm 1.0.31, numpy 2.4.6, … now pinned in constraints.txt)
gave other bytes for the unchanged b51f714 (the trained and the ResNet outputs), so they were recorded
anew at b51f714 and every later tree compared with that table; then once more when pretrain's
provenance gained `train_flops` (metadata only: every tensor of the 11 changed files is identical). Record with

    WEIT_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py -q -s

which prints the table to paste below. A change that alters any output on purpose (a new default,
a new metadata field) records the table anew and says so in CHANGELOG.md.

Every command runs in-process through the real CLI, in a fresh folder, with relative paths (the
command line is part of some provenance records).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import (
    TINY_VIT_ARGS,
    make_tiny_resnet,
    make_tiny_vit,
    save_timm_dir,
    tiny_resnet_args,
    weit,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")

VIT_RECIPE = """\
model: {img_size: 8, patch_size: 2, in_chans: 1, head_dim: 16}
templates: {count: 8}
nested: {depths: [1, 2], widths: [16, 32], sandwich: 1, distill: 0.5}
data: {source: digits, batch_size: 32}
train: {steps: 3, warmup_steps: 1, eval_every: 2, eval_samples: 64, checkpoint_every: 0}
"""

RESNET_RECIPE = """\
model: {family: resnet, block: basic, img_size: 16, in_chans: 1, stage_ratios: [1, 1, 2, 2], bn_calibration_batches: 2}
templates: {size: 8, count: {conv3x3: 16, conv1x1: 8}}
nested: {depths: [1, 2], widths: [8, 16], sandwich: 1}
data: {source: digits, batch_size: 32}
train: {steps: 2, warmup_steps: 1, eval_every: 0, checkpoint_every: 0}
"""

# Every command of the golden run, in order (relative paths; run in an empty folder).
COMMANDS: list[list[str]] = [
    # ViT: data-free extraction (full rank and truncated), materialize at several sizes and rules
    ["extract-templates", "vit", "-o", "vit-full.safetensors", "-n", "64"],
    ["extract-templates", "vit", "-o", "vit-n16.safetensors", "-n", "16"],
    ["extract-templates", "vit", "-o", "vit-p4.safetensors", "-p", "4", "-n", "8"],
    ["materialize", "vit-full.safetensors", "--depth", "4", "--width", "64", "-o", "vit-grow"],
    ["materialize", "vit-full.safetensors", "--depth", "1", "--width", "16", "-o", "vit-shrink.safetensors"],
    ["materialize", "vit-n16.safetensors", "--depth", "3", "--width", "48", "--width-rule", "tile-nodiv",
     "--depth-rule", "interp", "-o", "vit-odd"],
    ["materialize", "vit-n16.safetensors", "--depth", "5", "--depth-rule", "interleave", "--dtype", "bfloat16",
     "--num-classes", "3", "-o", "vit-bf16.safetensors"],
    ["materialize", "vit-p4.safetensors", "--depth", "3", "--depth-rule", "stack", "--width", "40", "-o", "vit-p4-grow"],
    # ViT: distillation in extract-templates
    ["extract-templates", "vit", "-o", "vit-distilled.safetensors", "-n", "4", "--data", "digits", "--img-size", "16",
     "--distill-steps", "3", "--batch-size", "16"],
    # ViT: pretrain, fit-scalers, materialize --scalers, finetune from weit / random / weight selection
    ["pretrain", "vit.yaml", "-o", "vit-pre.safetensors"],
    ["fit-scalers", "vit-pre.safetensors", "--data", "digits", "--depth", "1", "--width", "16", "--steps", "3",
     "--batch-size", "16", "--train-subset", "96", "-o", "vit-fit.safetensors"],
    ["fit-scalers", "vit-pre.safetensors", "--data", "digits", "--depth", "2", "--width", "32", "--steps", "2",
     "--batch-size", "16", "--distill", "0.5", "--no-small", "-o", "vit-fit-kd.safetensors"],
    ["materialize", "vit-pre.safetensors", "--scalers", "vit-fit.safetensors", "--depth", "1", "--width", "16", "-o", "vit-fitted"],
    ["materialize", "vit-pre.safetensors", "--depth", "3", "--width", "48", "-o", "vit-pre-grow"],
    ["finetune", "vit-fitted", "--data", "digits", "--epochs", "1", "--train-subset", "96", "--batch-size", "32",
     "-o", "vit-ft"],
    ["finetune", "vit-fitted", "--data", "digits", "--epochs", "1", "--train-subset", "96", "--batch-size", "32",
     "--init", "random", "-o", "vit-ft-random"],
    ["finetune", "vit-fitted", "--data", "digits", "--epochs", "1", "--train-subset", "96", "--batch-size", "32",
     "--init", "weight-selection", "--from", "vit-pre-grow", "-o", "vit-ft-ws"],
    # ResNet: extraction, materialize, pretrain, fit-scalers, calibrate, finetune
    ["extract-templates", "resnet", "-o", "rn.safetensors", "-n", "32"],
    ["materialize", "rn.safetensors", "--depth", "1,2,1,2", "--width", "16,16,32,32", "-o", "rn-mixed"],
    ["materialize", "rn.safetensors", "--depth", "3", "-o", "rn-deep.safetensors"],
    ["pretrain", "resnet.yaml", "-o", "rn-pre.safetensors"],
    ["fit-scalers", "rn-pre.safetensors", "--data", "digits", "--depth", "1", "--width", "8", "--steps", "2",
     "--batch-size", "16", "--train-subset", "64", "--calibrate-batches", "2", "-o", "rn-fit.safetensors"],
    ["materialize", "rn-pre.safetensors", "--scalers", "rn-fit.safetensors", "--depth", "1", "--width", "8", "-o", "rn-fitted"],
    ["materialize", "rn-pre.safetensors", "--depth", "1", "--width", "8", "--calibrate", "digits",
     "--calibrate-batches", "2", "-o", "rn-calibrated"],
    ["finetune", "rn-fitted", "--data", "digits", "--epochs", "1", "--train-subset", "64", "--batch-size", "32",
     "-o", "rn-ft"],
]

GOLDEN: dict[str, str] = {
    "rn-calibrated/config.json": "695c8a074a24524a2674626773fba7c492abac41c2dd761da93a724253aa575d",
    "rn-calibrated/model.safetensors": "d8cff6c5af0360bd5c5def249f54985ea6e3eb78c959c2285078b3d51d2741a0",
    "rn-deep.safetensors": "dd654a48b6e476de6cbef9194b83bd8736fbcd79b4049bf2b5268e0e4eccc809",
    "rn-fit.safetensors": "659fa17ae71438a76f651bdabfd2ede54aa3cd721a46ac871d9728ef89c8cfb4",
    "rn-fitted/config.json": "695c8a074a24524a2674626773fba7c492abac41c2dd761da93a724253aa575d",
    "rn-fitted/model.safetensors": "769dcb82fa4975d22b70d20dfb76a682f7348d154eb60cfa780acccdf04226cf",
    "rn-ft/best/config.json": "695c8a074a24524a2674626773fba7c492abac41c2dd761da93a724253aa575d",
    "rn-ft/best/model.safetensors": "68cdb921875d698ffaa85474d909fb2d3a037099ec6f047ae502e58f28b7d5c1",
    "rn-ft/last/config.json": "695c8a074a24524a2674626773fba7c492abac41c2dd761da93a724253aa575d",
    "rn-ft/last/model.safetensors": "68cdb921875d698ffaa85474d909fb2d3a037099ec6f047ae502e58f28b7d5c1",
    "rn-mixed/config.json": "7de6a83c03b08a87d4b2ede5bf5abdecdacec0b4ddc99eee0f6168fff45524d1",
    "rn-mixed/model.safetensors": "a95d711d9f6da9aa490e00c7176a00a9506297be994516b4c9415f53c016cfbb",
    "rn-pre.recipe.yaml": "3e89f3d9beabd76a5294fda0f6c4c0c9a1300adbe8b1a12a0622d17d6aed7386",
    "rn-pre.safetensors": "47bfb6a59063d6e0546b5444bcfc79ca3594b4eb77a35bd10471bac7d8ee751c",
    "rn.safetensors": "9ef7c2a7a4ac466fc4ebec89aaef3565f4fbb8f5e445a59483ebc590eaa105e3",
    "vit-bf16.safetensors": "7131b9fa413faefc524f2f5534004e5146bab76ea6148bcd66753b177dacfe83",
    "vit-distilled.safetensors": "36f6f8c10c879d8011f785e66907f2a8521d330fcebc7b015912fddafb859311",
    "vit-fit-kd.safetensors": "f63779187e6758eeb50dad65a8551ecd05a024de53f5eed2fae48bbe6266e6ae",
    "vit-fit.safetensors": "2a564d84b2d6361ba4ecb7fc82ce464a38df3ef4e4e3077bf1732255ae354ac8",
    "vit-fitted/config.json": "92a8b33e40a502ce63bcb550ecfb66c25eb079e0986b2d8ce8b8ef6aa478b1b6",
    "vit-fitted/model.safetensors": "b416d3dad95bfc64225a3a5b9ad6d32b949a5ce351f9880d20c358c4e1994d83",
    "vit-ft-random/best/config.json": "92a8b33e40a502ce63bcb550ecfb66c25eb079e0986b2d8ce8b8ef6aa478b1b6",
    "vit-ft-random/best/model.safetensors": "a9ae83320301371f0d2c42d220a4c2c91673fc49528498d671bc1a47bee16ed9",
    "vit-ft-random/last/config.json": "92a8b33e40a502ce63bcb550ecfb66c25eb079e0986b2d8ce8b8ef6aa478b1b6",
    "vit-ft-random/last/model.safetensors": "a9ae83320301371f0d2c42d220a4c2c91673fc49528498d671bc1a47bee16ed9",
    "vit-ft-ws/best/config.json": "92a8b33e40a502ce63bcb550ecfb66c25eb079e0986b2d8ce8b8ef6aa478b1b6",
    "vit-ft-ws/best/model.safetensors": "25d87a396e6a0ba27ecc644abafd106e58518c9c7ee197c71413ac49523497b4",
    "vit-ft-ws/last/config.json": "92a8b33e40a502ce63bcb550ecfb66c25eb079e0986b2d8ce8b8ef6aa478b1b6",
    "vit-ft-ws/last/model.safetensors": "25d87a396e6a0ba27ecc644abafd106e58518c9c7ee197c71413ac49523497b4",
    "vit-ft/best/config.json": "92a8b33e40a502ce63bcb550ecfb66c25eb079e0986b2d8ce8b8ef6aa478b1b6",
    "vit-ft/best/model.safetensors": "36f89021e761af5b742cf5388f5086e84f1dcbe36282b5cf55802bf188895523",
    "vit-ft/last/config.json": "92a8b33e40a502ce63bcb550ecfb66c25eb079e0986b2d8ce8b8ef6aa478b1b6",
    "vit-ft/last/model.safetensors": "36f89021e761af5b742cf5388f5086e84f1dcbe36282b5cf55802bf188895523",
    "vit-full.safetensors": "ef9cc7e70b5bca0c6d3e77e508e19131a9ed83dac88fb4b7ad2cd513c3bcd224",
    "vit-grow/config.json": "e2a0e7d78f142485c7ef71b28aef0d89225803486fcb4379fec6f6e154cd76b4",
    "vit-grow/model.safetensors": "ef07dbe64bfcfb691161c226bc7318568266889d883b1151fd41fee75e44b312",
    "vit-n16.safetensors": "c91f3e5d3405b3cc029936ddd46a5d854f11c4a4dc53c40423c9d64b3eeb8c99",
    "vit-odd/config.json": "024415d87a8018985a1173e2326fd5d72fa9dd854541fabea54e7b9b0b4db00a",
    "vit-odd/model.safetensors": "bdcce332f643d011cdc92eaf7de6b43ed3d7bb875e582680ab585fb0d6e61e30",
    "vit-p4-grow/config.json": "baeaa9803a4220da9e5f37273d16e4d5b0d37a7873dfa3e1aa68474db2de4ef9",
    "vit-p4-grow/model.safetensors": "91e5030ee471c7ff3b142aa83ccf6bf5680446a28f497923d261adc0426b103f",
    "vit-p4.safetensors": "344913747a8f0b00f3651494d0adb143de14ed5fef8676d883b5cbd002221f2f",
    "vit-pre-grow/config.json": "98f74722a03c660cc961a348f543f209b727c5d2f19fe238549df1f400ff5571",
    "vit-pre-grow/model.safetensors": "c6c5cdcdd72e4636367ed198e94d51e7e2180cf21a1237c97b1194389c8c8247",
    "vit-pre.recipe.yaml": "20af2e02f830574bb98dedfc934394c36b09b132b439749b310ed700dbd3ff0a",
    "vit-pre.safetensors": "26ceee20a8433a2f0429db1f8d35b9fc7049f246ca04fa4734e65e584f23c61b",
    "vit-shrink.safetensors": "4ed0452b7111a7077e9c0b0b2be7aa824de35dd2bc259151da30c8e65d704aa3"
}


def _setup(folder: Path) -> None:
    save_timm_dir(make_tiny_vit(0, img_size=16, in_chans=1, num_classes=10), folder / "vit",
                  {**TINY_VIT_ARGS, "img_size": 16, "in_chans": 1, "num_classes": 10})
    save_timm_dir(make_tiny_resnet("basic", 0), folder / "resnet", tiny_resnet_args("basic"))
    (folder / "vit.yaml").write_text(VIT_RECIPE)
    (folder / "resnet.yaml").write_text(RESNET_RECIPE)


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every weights file, config and resolved recipe written (metrics hold timings: skipped)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel.split("/")[0] in ("vit", "resnet", "vit.yaml", "resnet.yaml"):
            continue
        if p.suffix in (".safetensors", ".yaml") or p.name == "config.json":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_golden_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path)
    for cmd in COMMANDS:
        monkeypatch.setattr(sys, "argv", ["weit", *cmd])  # pretrain records its command line
        r = weit(*cmd, expect=None)
        assert r.exit_code == 0, (cmd, r.output)
    got = _digests(tmp_path)
    if os.environ.get("WEIT_RECORD_GOLDEN"):
        print("\nGOLDEN = " + json.dumps(got, indent=4, sort_keys=True))
        return
    assert got.keys() == GOLDEN.keys()
    changed = sorted(k for k in got if got[k] != GOLDEN[k])
    assert not changed, f"outputs changed: {changed}"
