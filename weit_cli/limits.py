"""Limits shared by every command: seeds every RNG accepts, and the largest model weit will build."""

from __future__ import annotations

MAX_SEED = 2**63 - 1  # torch, numpy (mod 2**32) and random all take it
MAX_PARAMS = 20_000_000_000  # refuse sizes no machine could hold, before allocating anything


def check_seed(seed: int, name: str = "seed") -> None:
    """Seeds are integers in [0, 2**63): torch refuses larger ones with an overflow, not an error (the
    range is options.Seed's)."""
    from weit_cli.options import Seed, check_value

    check_value(Seed, seed, f"--{name.replace('_', '-')}")


