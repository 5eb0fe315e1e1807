"""Limits shared by every command: seeds every RNG accepts (checked by options.check_seed), and the
largest model weit will build."""

from __future__ import annotations

MAX_SEED = 2**63 - 1  # torch, numpy (mod 2**32) and random all take it
MAX_PARAMS = 20_000_000_000  # refuse sizes no machine could hold, before allocating anything

