"""Resizing rules (docs/method.md §4) on their own: depth plans and width index maps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weit_cli.core.axes import Axis
from weit_cli.core.resize import (
    LayerSource,
    depth_plan,
    mix_layers,
    resize_axis,
    resize_width,
    width_index,
)
from weit_cli.errors import WeitError

PROPS = settings(max_examples=30, deadline=None, derandomize=True)


def sources(plan: list[LayerSource]) -> list[int]:
    assert all(len(s.sources) == 1 and s.sources[0][1] == 1.0 for s in plan)
    return [s.sources[0][0] for s in plan]


# ---------------------------------------------------------------------------------------------- depth
def test_prefix_takes_the_first_layers():
    assert sources(depth_plan(6, 4, "prefix")) == [0, 1, 2, 3]
    assert sources(depth_plan(3, 3, "prefix")) == [0, 1, 2]
    with pytest.raises(WeitError, match="cannot grow"):
        depth_plan(2, 3, "prefix")


def test_spread_keeps_evenly_spaced_whole_layers_first_and_last():
    assert sources(depth_plan(3, 2, "spread")) == [0, 2]
    assert sources(depth_plan(3, 1, "spread")) == [0]
    assert sources(depth_plan(12, 6, "spread")) == [0, 2, 4, 7, 9, 11]  # 0, 2.2, 4.4, 6.6, 8.8, 11 rounded
    assert sources(depth_plan(4, 3, "spread")) == [0, 2, 3]  # 1.5 rounds half up
    assert sources(depth_plan(5, 5, "spread")) == [0, 1, 2, 3, 4]
    for old in range(1, 9):
        for new in range(1, old + 1):
            kept = sources(depth_plan(old, new, "spread"))
            assert kept == sorted(set(kept)) and kept[0] == 0 and (new == 1 or kept[-1] == old - 1)
    with pytest.raises(WeitError, match="cannot grow"):
        depth_plan(2, 3, "spread")


def test_stack_repeats_the_sequence():
    assert sources(depth_plan(2, 5, "stack")) == [0, 1, 0, 1, 0]
    assert sources(depth_plan(3, 6, "stack")) == [0, 1, 2, 0, 1, 2]


def test_interleave_repeats_each_layer():
    assert sources(depth_plan(2, 4, "interleave")) == [0, 0, 1, 1]
    assert sources(depth_plan(3, 6, "interleave")) == [0, 0, 1, 1, 2, 2]
    assert sources(depth_plan(3, 4, "interleave")) == [0, 0, 1, 2]


def test_interp_in_normalized_layer_index():
    # 3 → 5: target i sits at source position i·(3−1)/(5−1) = 0, .5, 1, 1.5, 2
    plan = depth_plan(3, 5, "interp")
    assert [s.sources for s in plan] == [
        ((0, 1.0),),
        ((0, 0.5), (1, 0.5)),
        ((1, 1.0),),
        ((1, 0.5), (2, 0.5)),
        ((2, 1.0),),
    ]
    # 4 → 3 (shrinking): positions 0, 1.5, 3
    assert [s.sources for s in depth_plan(4, 3, "interp")] == [((0, 1.0),), ((1, 0.5), (2, 0.5)), ((3, 1.0),)]
    assert sources(depth_plan(5, 1, "interp")) == [0]
    assert sources(depth_plan(1, 3, "interp")) == [0, 0, 0]


@PROPS
@given(old=st.integers(1, 12), new=st.integers(1, 24))
def test_interp_weights_are_convex_and_ends_are_kept(old, new):
    plan = depth_plan(old, new, "interp")
    assert len(plan) == new
    for s in plan:
        assert sum(w for _, w in s.sources) == pytest.approx(1.0)
        assert all(0 <= i < old and 0 < w <= 1 for i, w in s.sources)
    assert plan[0].sources == ((0, 1.0),)
    if new > 1:
        assert plan[-1].sources == ((old - 1, 1.0),)


def test_identity_inserts_zeroed_copies_after_the_layer_they_copy():
    plan = depth_plan(2, 4, "identity")
    assert sources(plan) == [0, 0, 1, 1]
    assert [s.zero_residual for s in plan] == [False, True, False, True]
    plan = depth_plan(3, 5, "identity")  # i·3//5 = 0, 0, 1, 1, 2
    assert sources(plan) == [0, 0, 1, 1, 2]
    assert [s.zero_residual for s in plan] == [False, True, False, True, False]
    # every source layer appears exactly once unzeroed, in order: the original network is kept
    assert [s.sources[0][0] for s in plan if not s.zero_residual] == [0, 1, 2]
    assert not any(s.zero_residual for s in depth_plan(4, 2, "identity"))  # shrinking = prefix


@PROPS
@given(old=st.integers(1, 8), extra=st.integers(0, 16))
def test_identity_keeps_every_layer_once(old, extra):
    plan = depth_plan(old, old + extra, "identity")
    assert [s.sources[0][0] for s in plan if not s.zero_residual] == list(range(old))
    assert sum(s.zero_residual for s in plan) == extra


def test_auto_is_prefix_when_shrinking_and_interp_when_growing():
    assert depth_plan(6, 4, "auto") == depth_plan(6, 4, "prefix")
    assert depth_plan(3, 5, "auto") == depth_plan(3, 5, "interp")


@pytest.mark.parametrize("new", [0, -1])
def test_depth_must_be_positive(new):
    with pytest.raises(WeitError, match="at least 1"):
        depth_plan(3, new, "auto")


def test_unknown_depth_rule():
    with pytest.raises(WeitError, match="unknown depth rule") as e:
        depth_plan(3, 4, "copy")
    assert "interleave" in e.value.hint


def test_mix_layers_is_the_weighted_sum():
    layers = [torch.full((2,), float(i)) for i in range(3)]
    out = mix_layers(layers, LayerSource(((1, 0.25), (2, 0.75))))
    assert out.tolist() == [1.75, 1.75]
    assert mix_layers(layers, LayerSource(((2, 1.0),))) is layers[2]


# ---------------------------------------------------------------------------------------------- width
def test_width_index_prefix_and_cyclic_tiling():
    assert width_index(4, 2).tolist() == [0, 1]
    assert width_index(2, 5).tolist() == [0, 1, 0, 1, 0]
    assert width_index(2, 3, runs=3).tolist() == [0, 1, 0, 2, 3, 2, 4, 5, 4]  # q, k, v separately


def test_resize_axis_divides_tiled_inputs():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert resize_axis(x, 1, 3, 6, divide=True).tolist() == [[0.5, 1.0, 1.5, 0.5, 1.0, 1.5]]
    # non-integer ratio: each entry is divided by its own copy count
    assert resize_axis(x, 1, 3, 4, divide=True).tolist() == [[0.5, 2.0, 3.0, 0.5]]
    assert resize_axis(x, 1, 3, 6).tolist() == [[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]]
    assert resize_axis(x, 1, 3, 2, divide=True).tolist() == [[1.0, 2.0]]  # shrinking never divides


def test_resize_width_rules_and_block_units():
    w = torch.arange(2 * 4, dtype=torch.float64).reshape(2, 4)
    axes = [Axis(0, "embed"), Axis(1, "embed", "in")]
    grown = resize_width(w, axes, {"embed": 4}, {"embed": 8}, "tile", unit={0: 2, 1: 1})
    assert grown.shape == (4, 8)  # dim 0 counts blocks of 2 channels: 2 → 4 blocks
    assert torch.equal(grown, torch.cat([w, w], 1).repeat(2, 1) / 2)
    nodiv = resize_width(w, axes, {"embed": 4}, {"embed": 8}, "tile-nodiv", unit={0: 2, 1: 1})
    assert torch.equal(nodiv, torch.cat([w, w], 1).repeat(2, 1))
    with pytest.raises(WeitError, match="unknown width rule"):
        resize_width(w, axes, {"embed": 4}, {"embed": 8}, "stretch")


@PROPS
@given(d_in=st.integers(1, 5), d_out=st.integers(1, 5), k=st.integers(1, 4), m=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_net2net_growth_is_lossless_for_integer_ratios(d_in, d_out, k, m, seed):
    """Tile the input axis k× (dividing) and the output axis m×: y' is y tiled m×, for x tiled k×."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(d_in, generator=g, dtype=torch.float64)
    axes = [Axis(0, "out"), Axis(1, "in", "in")]
    w2 = resize_width(w, axes, {"out": d_out, "in": d_in}, {"out": m * d_out, "in": k * d_in})
    x2 = resize_axis(x, 0, d_in, k * d_in)
    torch.testing.assert_close(w2 @ x2, (w @ x).repeat(m))


def test_resize_axis_checks_runs():
    with pytest.raises(ValueError, match="expected 3×4"):
        resize_axis(torch.zeros(10), 0, 4, 8, runs=3)


def test_zero_runs_zeroes_whole_runs_of_one_dimension():
    """The identity path's row-run zeroing (adaLN-Zero gates): the same runs of dense rows and of a
    scaler grid's rows (dim 1 of an (N, a, b) stack)."""
    from weit_cli.core.axes import ZeroRuns

    gates = ZeroRuns(6, (2, 5))
    x = torch.arange(1, 6 * 4 * 3 + 1, dtype=torch.float32).reshape(24, 3)
    y = gates(x)
    for r in range(6):
        rows = slice(4 * r, 4 * r + 4)
        assert (not y[rows].any()) if r in (2, 5) else torch.equal(y[rows], x[rows])
    s = torch.randn(2, 12, 5)
    assert torch.equal(gates(s, dim=1), gates(s.transpose(0, 1)).transpose(0, 1))
    with pytest.raises(ValueError, match="equal runs"):
        gates(torch.zeros(7, 2))


def test_depth_rule_warnings_per_stage():
    from weit_cli.core.resize import depth_rule_warnings

    assert depth_rule_warnings((2, 2, 2, 2), (2, 1, 2, 2), "interp")  # one stage shallower
    assert not depth_rule_warnings((2, 2, 2, 2), (2, 3, 2, 2), "interp")
    assert not depth_rule_warnings((2, 2, 2, 2), (1, 1, 1, 1), "auto")
    assert depth_rule_warnings(6, 4, "interp") and not depth_rule_warnings(6, 4, "prefix")
    # a bundle trained with nested.depth_rule=spread: prefix (and interp) keep other blocks than it trained
    assert depth_rule_warnings(6, 4, "prefix", "spread") and depth_rule_warnings(6, 4, "interp", "spread")
    assert not depth_rule_warnings(6, 4, "spread", "spread") and not depth_rule_warnings(6, 4, "auto", "spread")
    assert depth_rule_warnings(6, 4, "spread", "prefix") and not depth_rule_warnings(6, 4, "stack", "spread")
    assert not depth_rule_warnings(6, 4, "spread")  # no nested sizes (extracted): only interp warns, as before
