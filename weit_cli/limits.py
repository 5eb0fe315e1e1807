"""Limits shared by every command: seeds every RNG accepts (checked by options.check_seed), the
largest model weit will build, and the resizing rules that exist (core/resize.py implements them,
options.py offers them)."""

from __future__ import annotations

from typing import Literal

MAX_SEED = 2**63 - 1  # torch, numpy (mod 2**32) and random all take it
MAX_PARAMS = 20_000_000_000  # refuse sizes no machine could hold, before allocating anything


DepthRule = Literal["auto", "prefix", "spread", "interp", "stack", "interleave", "identity"]
WidthRule = Literal["tile", "tile-nodiv"]
