"""fit-scalers end to end: the loss goes down, the file binds to its bundle and size, and
`materialize --scalers` writes exactly the model that was fitted (and refuses mismatches)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import assert_keyed_by_role
from conftest import weit as cli

from weit_cli.arch._registry import get_adapter
from weit_cli.arch.vit import ViTArch
from weit_cli.core.extract import from_dense
from weit_cli.errors import EXIT_INPUT
from weit_cli.io.bundle_file import save_bundle
from weit_cli.io.files import read_header, save_tensors, sha256

ARCH = ViTArch(img_size=16, patch_size=8, in_chans=1, num_classes=10, depth=2, width=32, num_heads=4)


weit = partial(cli, expect=None)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Two bundles of one timm-initialised ViT (16 and 8 templates per type), 16 px gray, 10 classes."""
    d = tmp_path_factory.mktemp("fit")
    ad = get_adapter("vit")
    torch.manual_seed(0)
    dense = ad.build(ARCH).state_dict()
    out = {}
    for n in (16, 8):
        b, _ = from_dense(ad, ARCH, dense, None, n)
        out[n] = d / f"bundle{n}.safetensors"
        save_bundle(out[n], b, {"command": "test"})
    return out


def test_fit_scalers_cli_binds_and_materializes(bundles, tmp_path):
    bundle = bundles[16]
    scalers = tmp_path / "s.safetensors"
    r = weit("fit-scalers", bundle, "--data", "digits", "--depth", "1", "--width", "16", "--steps", "40",
             "--lr", "3e-3", "-o", scalers, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["loss_last"] < res["loss_first"] - 0.05  # it learns
    assert res["trained"] == ["scalers", "small"]
    assert_keyed_by_role(res, "acc", "val_{}_before", "val_{}_after")
    assert "warnings" not in res  # the default depth rule takes the prefix (with interp it warns: test_cli_foundation)

    meta = read_header(scalers)["__metadata__"]
    assert meta["kind"] == "weit.scalers" and meta["weit_format"] == "1"
    assert meta["bundle_sha256"] == sha256(bundle) == res["bundle_sha256"]
    arch = json.loads(meta["architecture"])
    assert (arch["depth"], arch["width"], arch["num_heads"]) == (1, 16, 2)
    keys = set(read_header(scalers)) - {"__metadata__"}
    assert {k for k in keys if k.startswith("scalers.")} == {
        f"scalers.blocks.0.{t}.weight" for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert "small.pos_embed" in keys and "small.head.weight" in keys
    assert all(k.startswith(("scalers.", "small.")) for k in keys)

    # materialize writes exactly the fitted model: its validation accuracy is the one fit-scalers reported
    model = tmp_path / "model"
    r = weit("materialize", bundle, "--scalers", scalers, "--depth", "1", "--width", "16", "-o", model, "--json")
    assert r.exit_code == 0, r.output
    import timm

    from weit_cli.data.images import load_data
    from weit_cli.tasks.classification import evaluate

    net = timm.create_model(f"local-dir:{model}", pretrained=True)
    val = load_data("digits", img_size=16, in_chans=1, seed=0).val
    assert evaluate(net, val).accuracy == pytest.approx(res["val_acc_after"], abs=1e-9)
    without = tmp_path / "plain"
    assert weit("materialize", bundle, "--depth", "1", "--width", "16", "-o", without).exit_code == 0
    fitted = json.loads((model / "config.json").read_text())
    assert fitted == json.loads((without / "config.json").read_text())  # same architecture …
    assert sha256(model / "model.safetensors") != sha256(without / "model.safetensors")  # … other weights

    # mismatched size or bundle: refused, one line, nothing written
    bad = tmp_path / "bad"
    for args, text in (
        ((bundle, "--depth", "2", "--width", "16"), "holds scalers for ViT depth 1, width 16"),
        ((bundle, "--depth", "1", "--width", "32"), "holds scalers for"),
        ((bundles[8], "--depth", "1", "--width", "16"), "fitted for another bundle"),
    ):
        r = weit("materialize", *args, "--scalers", scalers, "-o", bad)
        assert r.exit_code == EXIT_INPUT, r.output
        assert text in r.stderr and "Traceback" not in r.output
        assert not bad.exists()


def test_fit_scalers_no_small_distill_and_determinism(bundles, tmp_path):
    from weit_cli.commands.fit_scalers import fit_scalers
    from weit_cli.commands.materialize import load_bundle
    from weit_cli.core.resize import plan_target, resize
    from weit_cli.io.files import load_weit

    bundle = bundles[16]
    common = dict(data="digits", depth=2, width=16, steps=12, lr=3e-3, batch_size=32, train_small=False, distill=0.5)
    a = fit_scalers(bundle, tmp_path / "a.safetensors", **common)
    b = fit_scalers(bundle, tmp_path / "b.safetensors", **common)
    assert a["sha256"] == b["sha256"]  # same inputs and seed → same bytes
    assert a["trained"] == ["scalers"]
    tensors, meta = load_weit(tmp_path / "a.safetensors", "weit.scalers")
    prov = json.loads(meta["provenance"])
    assert prov["distill"] == 0.5 and prov["train_small"] is False and prov["steps"] == 12
    b0, _ = load_bundle(bundle)
    with torch.no_grad():
        init = resize(b0, plan_target(b0, depth=2, width=16))
    for k, v in init.small.items():  # small parameters were not trained …
        assert torch.equal(tensors[f"small.{k}"], v), k
    moved = [k for k, v in init.scalers.items() if not torch.equal(tensors[f"scalers.{k}"], v)]
    assert len(moved) == len(init.scalers)  # … the scalers were


def test_materialize_refuses_damaged_scalers(bundles, tmp_path):
    """Right bundle and size in the metadata, but a tensor missing or of the wrong shape: refused."""
    from weit_cli.commands.fit_scalers import fit_scalers
    from weit_cli.io.files import load_weit

    good = tmp_path / "s.safetensors"
    fit_scalers(bundles[16], good, data="digits", depth=1, width=16, steps=2)
    tensors, meta = load_weit(good, "weit.scalers")
    missing = dict(tensors)
    del missing["scalers.blocks.0.mlp.fc1.weight"]
    wrong = {**tensors, "small.norm.weight": torch.ones(7)}
    for name, t in (("missing", missing), ("wrong", wrong)):
        save_tensors(tmp_path / f"{name}.safetensors", t, meta)
        out = tmp_path / f"m-{name}"
        r = weit("materialize", bundles[16], "--scalers", tmp_path / f"{name}.safetensors", "--depth", "1", "--width", "16", "-o", out)
        assert r.exit_code == EXIT_INPUT and "complete set of scalers" in r.stderr, r.output
        assert not out.exists()


def test_fit_scalers_refusals(bundles, tmp_path):
    out = tmp_path / "s.safetensors"
    r = weit("fit-scalers", bundles[16], "--data", "digits", "--width", "20", "-o", out)
    assert r.exit_code != 0 and "nearest valid widths" in r.stderr
    r = weit("fit-scalers", bundles[16], "--data", "digits", "--num-classes", "5", "-o", out)
    assert r.exit_code != 0 and "the data has 10 classes" in r.stderr
    r = weit("fit-scalers", bundles[16], "--data", "digits", "--steps", str(10**19), "-o", out)
    assert r.exit_code == 2 and "--steps must be in" in r.stderr
    assert not out.exists()
    out.write_text("keep me")
    r = weit("fit-scalers", bundles[16], "--data", "digits", "--steps", "1", "-o", out)
    assert r.exit_code == 4 and out.read_text() == "keep me"


def test_scalers_file_splits_its_tensors_by_prefix_once():
    """`ScalersFile` is the one reader of a scalers file's `scalers.`/`small.` names (load_scalers,
    inspect --check and fit-scalers' writer share it): the rest is listed as unexpected."""
    from weit_cli.io.bundle_file import ScalersFile

    t = torch.zeros(1)
    f = ScalersFile.from_tensors({"scalers.a.weight": t, "small.b.bias": t, "templates.qkv": t, "scalersx": t})
    assert list(f.scalers) == ["a.weight"] and list(f.small) == ["b.bias"]
    assert f.unexpected == ["scalersx", "templates.qkv"]
    assert sorted(ScalersFile(f.scalers, f.small).to_tensors()) == ["scalers.a.weight", "small.b.bias"]
