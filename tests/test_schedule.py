"""The nested schedule (issue 18): delayed shrinking (`nested.shrink_start`), one size per step
(`nested.sampling=one-size`), and the training FLOPs `weit pretrain` reports (`train_flops`)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import weit

from weit_cli.commands.pretrain import pretrain
from weit_cli.errors import EXIT_INTERRUPTED, WeitError
from weit_cli.io.files import load_weit
from weit_cli.recipe import digest, load_recipe, to_plain
from weit_cli.training.nested import largest_arch, sample_sizes, size_grid, step_sizes, train_flops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
model: {img_size: 8, patch_size: 2, in_chans: 1, head_dim: 16}
templates: {count: 8}
nested: {depths: [1, 2], widths: [16, 32], sandwich: 1}
data: {source: digits, batch_size: 32}
train: {steps: 6, warmup_steps: 1, eval_every: 0, checkpoint_every: 2}
"""


@pytest.fixture
def recipe_path(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def _prov(path: Path) -> dict:
    _, meta = load_weit(path, "weit.templates")
    return json.loads(meta["provenance"])


# ---------------------------------------------------------------------------------------------- recipe
def test_schedule_options_are_left_out_while_off(recipe_path):
    base = load_recipe(recipe_path)
    off = load_recipe(recipe_path, ["nested.shrink_start=0", "nested.sampling=sandwich", "nested.one_size_power=1",
                                    "nested.largest_tail=0"])
    assert digest(base) == digest(off)
    assert not {"shrink_start", "sampling", "one_size_power", "largest_tail"} & set(to_plain(off)["nested"])
    tail = load_recipe(recipe_path, ["nested.largest_tail=0.1"])
    assert to_plain(tail)["nested"]["largest_tail"] == 0.1 and digest(tail) != digest(base)
    on = load_recipe(recipe_path, ["nested.shrink_start=0.5"])
    assert to_plain(on)["nested"]["shrink_start"] == 0.5 and digest(on) != digest(base)
    assert digest(load_recipe(recipe_path, ["nested.depth_rule=prefix"])) == digest(base)
    spread = load_recipe(recipe_path, ["nested.depth_rule=spread"])
    assert to_plain(spread)["nested"]["depth_rule"] == "spread" and digest(spread) != digest(base)
    assert "sizes" not in to_plain(base)["nested"]
    diag = load_recipe(recipe_path, ["nested.sizes=[[2, 32], [1, 16]]"])
    assert to_plain(diag)["nested"]["sizes"] == [[1, 16], [2, 32]] and digest(diag) != digest(base)  # grid order


@pytest.mark.parametrize("sets, words", [
    (["nested.shrink_start=1"], "shrink_start"),
    (["nested.shrink_start=-0.1"], "shrink_start"),
    (["nested.largest_tail=1"], "largest_tail"),
    (["nested.shrink_start=0.5", "nested.largest_tail=0.5"], "leave no nested steps"),
    (["nested.sampling=random"], "sampling"),
    (["nested.one_size_power=5"], "one_size_power"),
    (["nested.depth_rule=interp"], "depth_rule"),
    (["nested.sampling=one-size", "nested.distill=0.5"], "nested.sampling=sandwich"),
    (["nested.sizes=[[1, 16], [2, 24]]"], "2x24 are not in the depths × widths grid"),
    (["nested.sizes=[[1, 16], [1, 32]]"], "the largest and the smallest"),
])
def test_bad_schedule_options_are_one_line_errors(recipe_path, tmp_path, sets, words):
    args = [x for s in sets for x in ("--set", s)]
    proc = weit("pretrain", str(recipe_path), "-o", str(tmp_path / "b.safetensors"), *args, expect=None)
    assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b.safetensors").exists()


# ---------------------------------------------------------------------------------------------- schedule
def test_shrinking_trains_the_largest_alone_then_the_sandwich_as_before(recipe_path):
    recipe = load_recipe(recipe_path, ["train.steps=10", "nested.shrink_start=0.35"])
    rng, plain = random.Random(7), random.Random(7)
    sizes = [step_sizes(rng, recipe, s) for s in range(10)]
    assert sizes[:3] == [[(2, 32)]] * 3  # int(0.35 × 10) steps of the largest alone
    # then exactly the sandwich, from an RNG the first phase did not draw from
    assert sizes[3:] == [sample_sizes(plain, [1, 2], [16, 32], 1) for _ in range(7)]
    assert all(len(s) == 3 for s in sizes[3:])


def test_a_largest_tail_ends_with_the_largest_alone(recipe_path):
    recipe = load_recipe(recipe_path, ["train.steps=10", "nested.sampling=one-size", "nested.largest_tail=0.25",
                                       "nested.shrink_start=0.2"])
    weights = {(1, 16): 1.0, (1, 32): 1.0, (2, 16): 1.0, (2, 32): 1.0}
    rng, plain = random.Random(3), random.Random(3)
    sizes = [step_sizes(rng, recipe, s, weights) for s in range(10)]
    assert sizes[:2] == [[(2, 32)]] * 2 and sizes[8:] == [[(2, 32)]] * 2  # int(0.2 × 10) first, int(0.25 × 10) last
    assert sizes[2:8] == [plain.choices(list(weights), weights=[1.0] * 4) for _ in range(6)]  # the nested steps in between


def test_one_size_draws_follow_the_weights(recipe_path):
    recipe = load_recipe(recipe_path, ["train.steps=4000", "nested.sampling=one-size"])
    weights = {(1, 16): 1.0, (1, 32): 1.0, (2, 16): 1.0, (2, 32): 5.0}
    rng = random.Random(0)
    drawn = [step_sizes(rng, recipe, s, weights) for s in range(4000)]
    assert all(len(d) == 1 for d in drawn)
    n = Counter(d[0] for d in drawn)
    assert abs(n[(2, 32)] / 4000 - 5 / 8) < 0.03 and all(abs(n[s] / 4000 - 1 / 8) < 0.03 for s in weights if s != (2, 32))


def test_a_size_list_trains_only_its_sizes(recipe_path, tmp_path):
    """nested.sizes: the sandwich and one-size draws, the FLOPs count and the bundle's record keep to
    the listed pairs; the full grid's bundle records none, as before."""
    sets = ["nested.depths=[1, 2, 3]", "nested.widths=[16, 32, 48]", "nested.sizes=[[1, 16], [2, 32], [3, 48]]"]
    recipe = load_recipe(recipe_path, [*sets, "nested.sandwich=2"])
    assert size_grid(recipe) == [(1, 16), (2, 32), (3, 48)]
    rng = random.Random(0)
    assert all(s == [(3, 48), (1, 16), (2, 32)] for s in (step_sizes(rng, recipe, i) for i in range(6)))
    one = load_recipe(recipe_path, [*sets, "nested.sampling=one-size", "nested.one_size_power=0", "train.steps=300"])
    drawn = Counter(step_sizes(rng, one, i, {s: 1.0 for s in size_grid(one)})[0] for i in range(300))
    assert set(drawn) == {(1, 16), (2, 32), (3, 48)}
    r = pretrain(recipe_path, tmp_path / "d.safetensors", overrides=[*sets, "train.steps=2"])
    assert r["size_steps"] == {"1x16": 2, "2x32": 2, "3x48": 2}  # largest, smallest and the one in between, twice
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _flops import pretrain_flops

    assert r["train_flops"] == pretrain_flops(load_recipe(recipe_path, [*sets, "train.steps=2"]), num_classes=10)["flops"]
    from weit_cli.io.bundle_file import load_bundle

    assert load_bundle(tmp_path / "d.safetensors")[0].extra["nested"]["sizes"] == [[1, 16], [2, 32], [3, 48]]
    pretrain(recipe_path, tmp_path / "g.safetensors", overrides=["train.steps=2"])
    assert "sizes" not in load_bundle(tmp_path / "g.safetensors")[0].extra["nested"]


# ---------------------------------------------------------------------------------------------- FLOPs
def test_train_flops_match_the_benchmarks_count_and_the_schedule(recipe_path, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _flops import pretrain_flops

    # sizes trained in all: 6 sandwich steps of 3 sizes; 3 of the largest alone + 3 of 3; 6 of one size
    for name, sets, trained in (("sandwich", [], 18), ("shrink", ["nested.shrink_start=0.5"], 12), ("one", ["nested.sampling=one-size"], 6)):
        out = tmp_path / f"{name}.safetensors"
        r = pretrain(recipe_path, out, overrides=sets)
        recipe = load_recipe(recipe_path, sets)
        assert r["train_flops"] == _prov(out)["train_flops"] == pretrain_flops(recipe, num_classes=10)["flops"] > 0
        assert sum(r["size_steps"].values()) == trained
        assert r["teacher_flops"] is None


def test_teacher_forwards_add_to_the_train_flops(recipe_path, tmp_path):
    from conftest import randomize, save_timm_dir
    from torch.utils.flop_counter import FlopCounterMode

    recipe = load_recipe(recipe_path)
    adapter, arch = largest_arch(recipe, 10)
    model = randomize(adapter.build(arch), 3, norm="norm")
    teacher = save_timm_dir(model, tmp_path / "teacher", adapter.timm_config(arch)["model_args"])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(32, 1, 8, 8))
    plain = pretrain(recipe_path, tmp_path / "plain.safetensors")
    taught = pretrain(recipe_path, tmp_path / "taught.safetensors", teacher=teacher)
    assert taught["teacher_flops"] == 6 * fc.get_total_flops() > 0
    assert taught["train_flops"] == plain["train_flops"] + taught["teacher_flops"]
    assert _prov(tmp_path / "taught.safetensors")["teacher_flops"] == taught["teacher_flops"]
    # a teacher of weight 0 is never run: nothing to count
    idle = pretrain(recipe_path, tmp_path / "idle.safetensors", teacher=teacher, overrides=["teacher.weight=0"])
    assert idle["teacher_flops"] == 0 and idle["train_flops"] == plain["train_flops"]


def test_train_flops_replay_sums_each_size_per_step(recipe_path):
    recipe = load_recipe(recipe_path, ["nested.shrink_start=0.5"])
    per_size = {s: 10 ** i for i, s in enumerate(size_grid(recipe))}  # 1, 10, 100, 1000: sizes read off the digits
    r = train_flops(recipe, per_size, teacher_step=7, world=2)
    assert r["teacher_flops"] == 7 * 6 * 2
    assert r["train_flops"] == 2 * sum(per_size[s] * n for s, n in r["size_steps"].items()) + r["teacher_flops"]
    assert r["size_steps"][(2, 32)] == 6 and r["size_steps"][(1, 16)] == 3  # largest every step, smallest after shrinking


def test_resume_inside_the_shrinking_phase_matches_an_uninterrupted_run(recipe_path, tmp_path):
    sets = ["nested.shrink_start=0.5"]
    full = pretrain(recipe_path, tmp_path / "full.safetensors", overrides=sets)

    def stop_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(WeitError) as e:
        pretrain(recipe_path, tmp_path / "part.safetensors", overrides=sets, callback=stop_at_3)
    assert e.value.exit_code == EXIT_INTERRUPTED
    part = pretrain(recipe_path, tmp_path / "part.safetensors", overrides=sets, resume=True)
    assert part["resumed_from"] == 2 and part["train_flops"] == full["train_flops"]
    a, _ = load_weit(tmp_path / "full.safetensors", "weit.templates")
    b, _ = load_weit(tmp_path / "part.safetensors", "weit.templates")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_size_under_ddp_counts_every_rank(recipe_path, tmp_path):
    """Two gloo processes: a step that leaves parameters unused (a small size) must not break DDP (it fails
    without SandwichLoss.touch_all: "Expected to have finished reduction"), the
    ranks end equal, and train_flops is twice one process's at the per-rank batch (16 of 32): every
    rank composes its weights, so that part is paid per rank, not per image."""
    import os

    from conftest import torchrun

    # seed 3, uniform draws: 1×16, then 2×16 (the step after one that left the second block unused), then 1×32
    sets = ["--set", "nested.sampling=one-size", "--set", "nested.one_size_power=0", "--set", "seed=3",
            "--set", "train.steps=3", "--set", "train.checkpoint_every=0"]
    one = pretrain(recipe_path, tmp_path / "one.safetensors", overrides=[s for s in sets if s != "--set"] + ["data.batch_size=16"])
    proc = torchrun(["-m", "weit_cli.cli", "pretrain", str(recipe_path), "-o", str(tmp_path / "ddp.safetensors"), "--json", *sets],
                    env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-3000:]
    r = json.loads([line for line in stdout.splitlines() if line.startswith("{")][0])
    assert r["world_size"] == 2 and len(set(r["templates_sha256_by_rank"])) == 1
    assert r["train_flops"] == 2 * one["train_flops"] and r["size_steps"] == one["size_steps"]
    assert r["size_steps"] == {"1x16": 1, "2x16": 1, "1x32": 1}


# ---------------------------------------------------------------------------------------------- depth rule
def test_spread_bundles_train_and_materialize_evenly_spaced_blocks(recipe_path, tmp_path):
    """nested.depth_rule=spread: the bundle records it, training composes a smaller depth from the first
    and last blocks, and materialize's auto takes the same ones; an explicit prefix warns. A prefix
    bundle's record stays as before."""
    from safetensors.torch import load_file

    from weit_cli.commands.materialize import materialize
    from weit_cli.io.bundle_file import load_bundle
    from weit_cli.training.nested import NestedModel

    sets = ["nested.depths=[1, 2, 3]", "nested.depth_rule=spread", "train.steps=2"]
    pretrain(recipe_path, tmp_path / "s.safetensors", overrides=sets)
    bundle = load_bundle(tmp_path / "s.safetensors")[0]
    assert bundle.extra["nested"]["depth_rule"] == "spread"
    full = bundle.state_dict()
    trained = NestedModel(bundle).state_at(2, 32)
    r = materialize(tmp_path / "s.safetensors", tmp_path / "m", depth=2, width=32)
    written = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not r.get("warnings")
    for suffix in ("attn.qkv.weight", "norm1.weight", "mlp.fc2.bias"):
        assert torch.equal(written[f"blocks.0.{suffix}"], full[f"blocks.0.{suffix}"])
        assert torch.equal(written[f"blocks.1.{suffix}"], full[f"blocks.2.{suffix}"])
        assert torch.equal(trained[f"blocks.1.{suffix}"].detach(), written[f"blocks.1.{suffix}"])
    r = materialize(tmp_path / "s.safetensors", tmp_path / "p", depth=2, width=32, depth_rule="prefix")
    assert "smaller depths are evenly spaced blocks" in r["warnings"][0]
    pretrain(recipe_path, tmp_path / "p.safetensors", overrides=["train.steps=2"])
    assert "depth_rule" not in load_bundle(tmp_path / "p.safetensors")[0].extra["nested"]
