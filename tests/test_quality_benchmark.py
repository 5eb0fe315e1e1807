"""benchmarks/quality.py's options: bad --targets are refused before anything runs."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("targets", ["4x", "4by128", "0x128", "4x128x2"])
def test_bad_targets_are_refused(targets, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    with pytest.raises(SystemExit) as e:
        quality.main(["--budget", "tiny", "--targets", targets, "--work", str(tmp_path / "w"), "--docs", str(tmp_path / "d")])
    assert e.value.code == 2 and "expected a comma list of DEPTHxWIDTH" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before the cache folder is made


def test_levers_train_the_full_grid_unless_a_variant_lists_sizes():
    """The small recipe lists five sizes since round 4; levers' budget (the sandwich over the whole
    3 × 3 grid, 4.31–4.38 TFLOPs) and its variants that name no sizes must not pick that list up."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import levers

    from weit_cli.recipe import load_recipe

    path, base = ROOT / "recipes" / "vit-fashion-small.yaml", levers.BUDGETS["small"]["overrides"]
    assert load_recipe(path, base).nested.sizes is not None  # the shipped recipe's list
    assert load_recipe(path, base + levers.BUDGET).nested.sizes is None
    assert load_recipe(path, base + levers.FULL_GRID + levers.VARIANTS["shrink-0.1-one-size"]).nested.sizes is None
    listed = load_recipe(path, base + levers.FULL_GRID + levers.VARIANTS["one-size-diagonal"]).nested.sizes
    assert [tuple(s) for s in listed] == [(1, 32), (2, 64), (3, 96)]
