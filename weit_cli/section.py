"""The base of every recipe section, here rather than in recipe.py so that a family module can declare
its own model section without importing the recipe (which builds its model union from the families)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # A misspelled key is an error, not a silent default. NaN and ±inf are never meant (`lr: .inf`
    # would train straight into NaN): refuse them everywhere.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
