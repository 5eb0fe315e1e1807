"""What a new user trips over (issue 13): damaged bundles and scalers files refused on read (and a
model checked before it is written), `weit --version`, inspect's provenance rows, tables that stay
whole when piped, and a finetune run folder after a full disk."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_HEAD_DIM,
    make_tiny_resnet,
    save_timm_dir,
    tiny_resnet_args,
    weit,
)

from weit_cli.errors import EXIT_INPUT, EXIT_OUTPUT
from weit_cli.io.files import (
    KIND_SCALERS,
    base_metadata,
    load_weit,
    read_header,
    save_tensors,
    sha256,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENV.pop("COLUMNS", None)  # rich reads it; the point is the width rich picks by itself


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def edited(src: Path, dst: Path, edit) -> Path:
    """`src` with its tensors changed by `edit(tensors)` and its metadata kept, as a hand edit would."""
    tensors, meta = load_weit(src, read_header(src)["__metadata__"]["kind"])
    tensors = dict(tensors)
    edit(tensors)
    save_tensors(dst, tensors, meta, force=True)
    return dst


# ---------------------------------------------------------------------------------------------- --version
def test_version_in_process():
    from weit_cli import __version__

    r = weit("--version")
    assert r.stdout.strip() == f"weit {__version__}"


def test_version_as_module():
    from weit_cli import __version__

    r = subprocess.run([sys.executable, "-m", "weit_cli.cli", "--version"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, f"weit {__version__}", "")


# ---------------------------------------------------------------------------------------------- damaged bundles
def _drop_block(block: str):
    return lambda t: [t.pop(k) for k in [k for k in t if k.startswith(f"scalers.{block}")]]


DAMAGES = {
    # what was done, the edit, what the error must name
    "template of the wrong shape": (lambda t: t.update({"templates.qkv": t["templates.qkv"][:, :, : TINY_HEAD_DIM // 2]}), "wrong shape templates.qkv"),
    "one block's scalers removed": (_drop_block("blocks.1."), "missing scalers.blocks.1.attn.proj.weight, scalers.blocks.1.attn.qkv.weight"),
    "an extra tensor": (lambda t: t.update({"small.extra.weight": torch.ones(3)}), "unexpected small.extra.weight"),
    "scalers of the wrong shape": (lambda t: t.update({"scalers.blocks.0.mlp.fc2.weight": t["scalers.blocks.0.mlp.fc2.weight"][:, :2]}), "scalers.blocks.0.mlp.fc2.weight"),
    "a small tensor of the wrong shape": (lambda t: t.update({"small.norm.weight": torch.ones(7)}), "small.norm.weight (7,)"),
    "a templated weight stored as small": (lambda t: t.update({"small.blocks.0.attn.qkv.weight": t.pop("scalers.blocks.0.attn.qkv.weight")}), "missing scalers.blocks.0.attn.qkv.weight"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_bundle_is_refused(tiny_bundle, tmp_path, damage):
    edit, names = DAMAGES[damage]
    bad = edited(tiny_bundle, tmp_path / "bad.safetensors", edit)
    before = listing(tmp_path)
    for out in ("m", "m.safetensors"):
        r = weit("materialize", bad, "--depth", "3", "-o", tmp_path / out, expect=EXIT_INPUT)
        assert "does not match its own architecture" in r.stderr and names in r.stderr, r.stderr
        assert listing(tmp_path) == before
    r = weit("inspect", bad, expect=EXIT_INPUT)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and names in err[0], r.stderr  # one line that says what is wrong
    assert weit("inspect", bad, "--json", expect=EXIT_INPUT).stdout.count("\n") == 1


def test_damaged_resnet_bundle_is_refused(tmp_path):
    """The check is the family's own model (built on the meta device), so every family has it."""
    save_timm_dir(make_tiny_resnet("basic", 0), tmp_path / "rn", tiny_resnet_args("basic"))
    weit("extract-templates", tmp_path / "rn", "-o", tmp_path / "rn.safetensors", "-n", "8")
    bad = edited(tmp_path / "rn.safetensors", tmp_path / "bad.safetensors", _drop_block("layer3.1."))
    r = weit("materialize", bad, "--depth", "1", "-o", tmp_path / "m", expect=EXIT_INPUT)
    assert "missing scalers.layer3.1.conv1.weight" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()


def test_good_bundles_still_load(tiny_bundle):
    r = weit("inspect", tiny_bundle)
    assert "weit.templates" in r.stdout


def test_model_checked_before_it_is_written(tiny_bundle, tmp_path, monkeypatch):
    """A resize that loses a tensor (a family bug) is caught against timm's own keys: nothing written."""
    import weit_cli.commands.materialize as mat
    from weit_cli.core.bundle import Bundle

    real = mat.resize

    def lossy(*a, **k):
        b = real(*a, **k)
        small = {n: v for n, v in b.small.items() if n != "norm.bias"}
        small["pos_embed"] = small["pos_embed"][:, :-1]
        return Bundle(b.adapter, b.arch, b.templates, b.scalers, small, b.extra)

    monkeypatch.setattr(mat, "resize", lossy)
    for out in ("m", "m.safetensors"):
        r = weit("materialize", tiny_bundle, "--depth", "3", "-o", tmp_path / out, expect=EXIT_INPUT)
        assert "the model to write does not match" in r.stderr and "missing norm.bias" in r.stderr, r.stderr
        assert "wrong shape pos_embed" in r.stderr
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------- scalers files
@pytest.fixture
def scalers_file(tiny_bundle, tmp_path) -> Path:
    """A scalers file for depth 1 of `tiny_bundle`, made the way fit-scalers stores one (no training)."""
    from weit_cli.core.resize import plan_target, resize
    from weit_cli.io.bundle_file import load_bundle

    b, bsha = load_bundle(tiny_bundle)
    target = plan_target(b, depth=1)
    sized = resize(b, target)
    tensors = {f"scalers.{k}": v for k, v in sized.scalers.items()} | {f"small.{k}": v for k, v in sized.small.items()}
    record = {t: {"count": v.shape[0], "p": v.shape[1], "q": v.shape[2], "kernel": list(v.shape[3:])} for t, v in b.templates.items()}
    path = tmp_path / "s.safetensors"
    meta = base_metadata(KIND_SCALERS, architecture=target.to_dict(), bundle_sha256=bsha, templates=record, provenance={"command": "fit-scalers"})
    save_tensors(path, tensors, meta)
    return path


def test_damaged_scalers_file(tiny_bundle, scalers_file, tmp_path):
    assert "weit.scalers" in weit("inspect", scalers_file).stdout
    weit("materialize", tiny_bundle, "--scalers", scalers_file, "--depth", "1", "-o", tmp_path / "ok")
    for name, (edit, names) in {"missing": (_drop_block("blocks.0.mlp."), "missing scalers.blocks.0.mlp.fc1.weight"),
                                "extra": (lambda t: t.update({"small.x": torch.ones(1)}), "unexpected small.x")}.items():
        bad = edited(scalers_file, tmp_path / f"{name}.safetensors", edit)
        r = weit("inspect", bad, expect=EXIT_INPUT)
        assert "complete set of scalers" in r.stderr and names in r.stderr, r.stderr
        r = weit("materialize", tiny_bundle, "--scalers", bad, "--depth", "1", "-o", tmp_path / f"m-{name}", expect=EXIT_INPUT)
        assert names in r.stderr and not (tmp_path / f"m-{name}").exists(), r.stderr


# ---------------------------------------------------------------------------------------------- inspect
def _rows(stdout: str) -> dict[str, str]:
    """The rows of a two-column table (first cell → second), as printed when stdout is not a terminal."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 4:
            rows[cells[1]] = cells[2]
    return rows


def test_inspect_bundle_provenance_as_rows(tiny_bundle, tiny_vit_dir):
    from weit_cli.io.files import checkpoint_sha256

    r = weit("inspect", tiny_bundle)
    rows = _rows(r.stdout)
    assert rows["command"] == "extract-templates"
    assert rows["source sha256"] == checkpoint_sha256(tiny_vit_dir)
    assert float(rows["reconstruction error qkv"]) < 1e-5  # full rank: exact
    assert "provenance" not in rows and "{" not in r.stdout  # no JSON blob
    prov = json.loads(read_header(tiny_bundle)["__metadata__"]["provenance"])
    info = json.loads(weit("inspect", tiny_bundle, "--json").stdout)
    assert info["provenance"] == prov  # the full record, as written
    full = _rows(weit("inspect", tiny_bundle, "--full").stdout)
    assert full["reconstruction_error.qkv"] == rows["reconstruction error qkv"] and full["source_sha256"] == rows["source sha256"]


def test_provenance_rows_summary_and_full():
    from weit_cli.cli_render import provenance_rows as _provenance_rows

    prov = {"recipe": {"train": {"lr": 0.001, "steps": 3}}, "command": "weit pretrain r.yaml -o b.safetensors",
            "data": "digits", "steps": 3, "seed": 0, "recipe_sha256": "ab" * 32, "distillation": {"steps": 2, "errors": {"qkv": 0.1}}}
    rows = dict(_provenance_rows(prov, full=False))
    assert list(rows)[0] == "command"
    assert rows == {"command": prov["command"], "data": "digits", "steps": "3", "seed": "0", "recipe sha256": "ab" * 32,
                    "distillation steps": "2"}
    full = dict(_provenance_rows(prov, full=True))
    assert full["recipe.train.lr"] == "0.001" and full["distillation.errors.qkv"] == "0.1" and full["recipe_sha256"] == "ab" * 32


def test_inspect_materialized_model(tiny_bundle, tmp_path):
    for out in ("m", "m.safetensors"):
        weit("materialize", tiny_bundle, "--depth", "3", "--depth-rule", "interp", "-o", tmp_path / out)
        rows = _rows(weit("inspect", tmp_path / out).stdout)
        assert rows["kind"] == "dense" and rows["command"] == "materialize"
        assert rows["bundle sha256"] == sha256(tiny_bundle)
        assert (rows["depth rule"], rows["width rule"]) == ("interp", "tile")
        info = json.loads(weit("inspect", tmp_path / out, "--json").stdout)
        assert info["provenance"]["bundle_sha256"] == sha256(tiny_bundle) and info["producer"].startswith("weit ")


# ---------------------------------------------------------------------------------------------- piped tables
def _assert_whole(stdout: str, rows: int) -> None:
    """Every row of the table on one line: a wrapped cell continues on a line with an empty first cell."""
    body = [ln for ln in stdout.splitlines() if ln.startswith("│")]
    assert len(body) == rows, stdout
    assert all(ln.split("│")[1].strip() for ln in body), stdout


def test_cli_table_is_whole_when_piped(tiny_bundle, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "bundle-with-a-long-name.safetensors"
    deep.parent.mkdir()
    deep.write_bytes(tiny_bundle.read_bytes())
    r = subprocess.run([sys.executable, "-m", "weit_cli.cli", "inspect", str(deep), "--full"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(deep)  # the title (a long path) on its own line
    assert max(map(len, r.stdout.splitlines())) > 80
    _assert_whole(r.stdout, len(_rows(r.stdout)))
    assert _rows(r.stdout)["sha256"] == sha256(deep)


def test_demo_table_is_whole_when_piped():
    """scripts/demo.py prints its results table through cli.print_table (run here on a table like
    the demo's: the demo itself pretrains for minutes)."""
    code = """
from rich.table import Table
from weit_cli.cli_render import print_table
t = Table(title="fashion-mnist: accuracy with no training after pretrain (chance 10%)", title_justify="left")
for col in ("depth", "width", "heads", "parameters", "val (6000)", "test (10000)", "size"):
    t.add_column(col, justify="left" if col == "size" else "right")
for d in (2, 4, 5):
    t.add_row(str(d), "96", "3", "1,234,567", "81.23%", "80.12%", "beyond the trained range (interp depth, tiled width)")
print_table(t)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("fashion-mnist: accuracy") and lines[0].rstrip().endswith("(chance 10%)")
    assert sum("beyond the trained range (interp depth, tiled width)" in ln for ln in lines) == 3
    _assert_whole(r.stdout, 3)
    assert sum("┃ depth ┃" in ln and "┃ size" in ln for ln in lines) == 1  # the header on one line too
    assert "print_table(table)" in (ROOT / "scripts" / "demo.py").read_text()


# ---------------------------------------------------------------------------------------------- full disk in finetune
@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)` → a tmpfs of that many bytes (remount to grow it); skipped without root and mount."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        args = ["-o", f"remount,size={size}", str(mnt)] if mounted else ["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]
        if subprocess.run(["mount", *args], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root and mount)")
        mounted.append(mnt)
        return mnt

    yield mount
    if mounted:
        # the in-process CLI's last checkpoint read leaves a memory map of the (deleted) state file in an
        # uncollected reference cycle; until it is collected the tmpfs is busy and stays mounted
        gc.collect()
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, f"the test's tmpfs stays mounted: {r.stderr}"


def test_full_disk_in_finetune(tiny_bundle, tmp_path, small_disk):
    """Before the first epoch is saved a full disk leaves no run folder (run again, no --force needed);
    after it, the folder stays and --resume finishes the run once there is space."""
    model = tmp_path / "m"
    weit("materialize", tiny_bundle, "--num-classes", "10", "--depth", "1", "-o", model)
    opts = ["--data", "digits", "--train-subset", "64", "--batch-size", "32"]
    disk = small_disk(64 * 1024)  # less than one model
    r = weit("finetune", model, *opts, "--epochs", "2", "-o", disk / "run", expect=EXIT_OUTPUT)
    assert "No space left" in r.stderr and "run it again" in r.stderr, r.stderr
    assert listing(disk) == []
    # room for epoch 1 (checkpoint ≈ 3 models: weights and two Adam moments; last/ and best/) but not
    # for epoch 2, whose checkpoint is written beside the old one before it replaces it
    size = (model / "model.safetensors").stat().st_size
    small_disk(int(6.5 * size) + 64 * 1024)
    r = weit("finetune", model, *opts, "--epochs", "3", "-o", disk / "run", expect=EXIT_OUTPUT)
    assert "No space left" in r.stderr and "--resume" in r.stderr, r.stderr
    assert {"args.json", "state.safetensors", "last"} <= set(listing(disk / "run"))
    small_disk(64 * size)
    weit("finetune", model, *opts, "--epochs", "3", "-o", disk / "run", "--resume")
    metrics = json.loads((disk / "run" / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics["epochs"]] == [0, 1, 2, 3]
