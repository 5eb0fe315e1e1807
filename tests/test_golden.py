"""Golden outputs: a fixed set of commands on tiny ViTs and ResNets gives the same files as it did
before the family/task/export redesign (issue 9), kept in tests/golden.json.

Bytes alone proved not portable: the trained outputs' last bits follow the CPU's kernels (the
table recorded in an earlier session failed, unchanged, on this session's AVX2-only machine). So each file keeps its
sha256 *and* what a change of behaviour would move: its layout (tensor names, dtypes, shapes), its
metadata with sha256 digests and floats masked, those floats, and each tensor's sum and sum of
magnitudes. A file passes if its bytes match, or if all of those match within RTOL (rounding).
History: first recorded at 0c4b593; anew at b51f714 (pinned library versions); with pretrain's
`train_flops`; on 2026-12-03 as fingerprints at 5d8b7be, which the issue-21 refactor then matched.
Record with

    WEIT_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py -q

which rewrites tests/golden.json. A change that alters any output on purpose (a new default,
a new metadata field) records the table anew and says so in CHANGELOG.md.

Every command runs in-process through the real CLI, in a fresh folder, with relative paths (the
command line is part of some provenance records).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TINY_VIT_ARGS,
    make_tiny_resnet,
    make_tiny_vit,
    save_timm_dir,
    tiny_resnet_args,
    weit,
)

SHA256 = re.compile(r"[0-9a-f]{64}")
RTOL = 3e-4  # of a tensor's sum of magnitudes; torch's generic kernels vs AVX2 differ by up to 5e-5 (rn-pre)

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

GOLDEN = Path(__file__).with_name("golden.json")


def _setup(folder: Path) -> None:
    save_timm_dir(make_tiny_vit(0, img_size=16, in_chans=1, num_classes=10), folder / "vit",
                  {**TINY_VIT_ARGS, "img_size": 16, "in_chans": 1, "num_classes": 10})
    save_timm_dir(make_tiny_resnet("basic", 0), folder / "resnet", tiny_resnet_args("basic"))
    (folder / "vit.yaml").write_text(VIT_RECIPE)
    (folder / "resnet.yaml").write_text(RESNET_RECIPE)


def _normalise(value: Any, floats: list[float]) -> Any:
    """A metadata value with every sha256 masked and every float moved to `floats` (digests and
    floats depend on the CPU's arithmetic; their structure and the rest must not)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return "<sha256>" if SHA256.fullmatch(value) else value
        return {"json": _normalise(parsed, floats)} if isinstance(parsed, (dict, list)) else value
    if isinstance(value, dict):
        return {k: _normalise(value[k], floats) for k in sorted(value)}  # safetensors' metadata has no order
    if isinstance(value, list):
        return [_normalise(v, floats) for v in value]
    if isinstance(value, float):
        floats.append(value)
        return "<float>"
    return value


def _fingerprint(path: Path) -> dict[str, Any]:
    """What the golden table keeps of a file: its sha256; for a safetensors file also its layout
    (names, dtypes, shapes), its metadata with digests and floats masked, those floats, and each
    tensor's sum and sum of magnitudes (float64)."""
    import torch
    from safetensors import safe_open

    out: dict[str, Any] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if path.suffix != ".safetensors":
        return out
    floats: list[float] = []
    with safe_open(str(path), framework="pt") as f:
        meta = _normalise(dict(f.metadata() or {}), floats)
        layout, sums = [], []
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            layout.append([name, str(t.dtype), list(t.shape)])
            t64 = t.to(torch.float64)
            sums.append([t64.sum().item(), t64.abs().sum().item()])
    digest = lambda x: hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()  # noqa: E731
    return {**out, "layout": digest(layout), "metadata": digest(meta), "metadata_floats": floats, "sums": sums}


def _outputs(folder: Path) -> dict[str, dict[str, Any]]:
    """The fingerprint of every weights file, config and resolved recipe written (metrics hold timings: skipped)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel.split("/")[0] in ("vit", "resnet", "vit.yaml", "resnet.yaml"):
            continue
        if p.suffix in (".safetensors", ".yaml") or p.name == "config.json":
            out[rel] = _fingerprint(p)
    return out


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(scale), 1.0)


def _differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Why `got` is not the recorded file: nothing if the bytes match, or if only the CPU's rounding
    differs (same layout and masked metadata, every tensor's sums and every metadata float within RTOL)."""
    if got["sha256"] == want["sha256"]:
        return []
    if "sums" not in want:
        return ["bytes"]
    why = [k for k in ("layout", "metadata") if got[k] != want[k]]
    if len(got["metadata_floats"]) != len(want["metadata_floats"]) or not all(
        _close(a, b, b) for a, b in zip(got["metadata_floats"], want["metadata_floats"])
    ):
        why.append("metadata numbers")
    if len(got["sums"]) != len(want["sums"]) or not all(
        _close(s, ws, wa) and _close(a, wa, wa) for (s, a), (ws, wa) in zip(got["sums"], want["sums"])
    ):
        why.append("tensor values")
    return why


def test_golden_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path)
    for cmd in COMMANDS:
        monkeypatch.setattr(sys, "argv", ["weit", *cmd])  # pretrain records its command line
        r = weit(*cmd, expect=None)
        assert r.exit_code == 0, (cmd, r.output)
    got = _outputs(tmp_path)
    if os.environ.get("WEIT_RECORD_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(GOLDEN.read_text())
    assert got.keys() == want.keys()
    changed = {k: why for k in sorted(got) if (why := _differences(got[k], want[k]))}
    assert not changed, f"outputs changed: {changed}"


def test_the_comparison_tolerates_rounding_only():
    """The table's check is tight: a CPU's rounding passes, a changed value, tensor or field does not."""
    want = {"sha256": "a", "layout": "l", "metadata": "m", "metadata_floats": [0.25], "sums": [[1.0, 10.0], [0.0, 0.0]]}
    rounding = {**want, "sha256": "b", "metadata_floats": [0.25 + 1e-9], "sums": [[1.0 + 1e-8, 10.0 - 1e-8], [0.0, 0.0]]}
    assert _differences(rounding, want) == []
    assert _differences({**rounding, "sums": [[1.01, 10.0], [0.0, 0.0]]}, want) == ["tensor values"]
    assert _differences({**rounding, "sums": [[1.0, 10.0], [0.0, 0.01]]}, want) == ["tensor values"]
    assert _differences({**rounding, "metadata_floats": [0.3]}, want) == ["metadata numbers"]
    assert _differences({**rounding, "metadata": "x"}, want) == ["metadata"]
    assert _differences({**rounding, "layout": "x"}, want) == ["layout"]
    assert _differences({"sha256": "b"}, {"sha256": "a"}) == ["bytes"]
    assert _normalise('{"a": 0.5, "b": "' + "0" * 64 + '", "c": [1, 2.5]}', f := []) == {"json": {"a": "<float>", "b": "<sha256>", "c": [1, "<float>"]}}
    assert f == [0.5, 2.5]
