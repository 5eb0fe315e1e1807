"""WAVE-style distillation in extract-templates: on real data (scikit-learn digits), the distilled
student beats the data-free SVD student at the same template count, for a ViT and a ResNet; the bundle
written is the distilled student; clear errors for bad options."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_keyed_by_role, save_timm_dir, weit

from weit_cli.errors import EXIT_USAGE

pytest.importorskip("sklearn")

TEACHERS = {
    "vit": ("vit_base_patch16_224", dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4), 300, {}),
    "resnet": (
        "resnet18",
        dict(layers=[2, 2, 2, 2], channels=[8, 16, 16, 32], in_chans=1, num_classes=10, stem_width=4, stem_type="deep"),
        150,
        {"template_size": 8, "img_size": 16},
    ),
}


@pytest.fixture(scope="module", params=sorted(TEACHERS))
def teacher(request, tmp_path_factory):
    """A dense timm model trained briefly on digits (16 px, gray; seed 0), saved as a timm folder."""
    import timm

    from weit_cli.data.images import load_data
    from weit_cli.tasks.classification import evaluate

    name, args, steps, extract_kw = TEACHERS[request.param]
    data = load_data("digits", img_size=16, in_chans=1, seed=0)
    torch.manual_seed(0)
    model = timm.create_model(name, **args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data.train.tensors
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp(f"teacher_{request.param}")
    folder = save_timm_dir(model.eval(), root / "dense", args)
    return SimpleNamespace(family=request.param, folder=folder, root=root, data=data, kw=extract_kw,
                           acc=evaluate(model, data.test).accuracy)


def test_distillation_beats_the_data_free_student(teacher):
    """4 templates per type: the SVD student is far from its teacher; 60 distillation steps recover it."""
    import timm

    from weit_cli.commands.extract import extract_templates
    from weit_cli.commands.materialize import materialize
    from weit_cli.tasks.classification import evaluate

    assert teacher.acc > 0.8
    out = teacher.root / "distilled.safetensors"
    r = extract_templates(teacher.folder, out, num_templates=4, data="digits", distill_steps=60, **teacher.kw)
    d = r["distillation"]
    assert d["teacher_acc"] == pytest.approx(teacher.acc)
    assert d["eval_split"].startswith("test")
    assert d["student_acc_after"] > d["student_acc_before"] + 0.2
    assert d["loss_last"] < d["loss_first"]
    # The templates themselves were trained (not only the small parameters) …
    plain = extract_templates(teacher.folder, teacher.root / "svd.safetensors", num_templates=4, **teacher.kw)
    assert plain["relative_error"] == pytest.approx(r["relative_error"])
    assert any(abs(d["relative_error_after"][t] - e) > 1e-4 for t, e in r["relative_error"].items())
    # … and the file holds the distilled student: materialized at the source size it scores the same.
    m = materialize(out, teacher.root / "student")
    student = timm.create_model(f"local-dir:{m['output']}", pretrained=True)
    assert evaluate(student, teacher.data.test).accuracy == pytest.approx(d["student_acc_after"])
    from weit_cli.commands.inspect import inspect

    prov = inspect(out)["provenance"]
    assert prov["distillation"]["steps"] == 60 and "seconds" not in prov["distillation"]


def test_cli_distillation_is_reproducible(tmp_path):
    from weit_cli.io.files import sha256

    args = dict(TEACHERS["vit"][1])
    import timm

    torch.manual_seed(0)
    folder = save_timm_dir(timm.create_model(TEACHERS["vit"][0], **args).eval(), tmp_path / "dense", args)
    outs = []
    for i in range(2):
        out = tmp_path / f"b{i}.safetensors"
        r = weit("extract-templates", folder, "-o", out, "-n", "2", "--data", "digits", "--distill-steps", "3", "--json")
        obj = json.loads(r.stdout)
        assert set(obj["distillation"]) >= {"student_acc_before", "student_acc_after", "teacher_acc"}
        assert_keyed_by_role(obj["distillation"], "acc", "teacher_{}", "student_{}_before", "student_{}_after")
        outs.append(out)
    # the file's provenance keeps the record it always had: no role aliases, no metric description
    from weit_cli.io.files import read_header

    prov = json.loads(read_header(outs[0])["__metadata__"]["provenance"])["distillation"]
    assert "teacher_acc" in prov and not {"teacher_metric", "student_metric_after", "metric_info"} & set(prov)
    assert sha256(outs[0]) == sha256(outs[1])
    r = weit("extract-templates", folder, "-o", tmp_path / "t.safetensors", "-n", "2", "--data", "digits", "--distill-steps", "2")
    assert "student accuracy" in r.stdout and "(SVD)" in r.stdout


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--distill-steps", "5"], "need --data"),
        (["--data", "digits", "--distill-steps", "0"], "--distill-steps must be in 1..10000000"),
        (["--data", "digits", "--distill-lr", "-1"], "must be positive"),
        (["--data", "digits"], "the data has 10 classes, the checkpoint's classifier 5"),
    ],
)
def test_distillation_option_errors(tiny_vit_dir, tmp_path, extra, message):
    out = tmp_path / "b.safetensors"
    r = weit("extract-templates", tiny_vit_dir, "-o", out, *extra, "--json", expect=EXIT_USAGE)
    assert message in json.loads(r.stdout)["error"]
    assert not Path(out).exists()
