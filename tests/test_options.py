"""Options defined once: every option a CLI command shares (by name) with its library function has
the same default on both sides, and the defaults come from weit_cli/options.py."""

from __future__ import annotations

import inspect

import pytest
import typer.main

from weit_cli import options
from weit_cli.cli import app

# CLI command name → its library function (module path, function name); CLI-only names are skipped.
LIBRARY = {
    "extract-templates": ("weit_cli.commands.extract", "extract_templates"),
    "materialize": ("weit_cli.commands.materialize", "materialize"),
    "fit-scalers": ("weit_cli.commands.fit_scalers", "fit_scalers"),
    "finetune": ("weit_cli.commands.finetune", "finetune"),
    "pretrain": ("weit_cli.commands.pretrain", "pretrain"),
    "sample": ("weit_cli.commands.sample", "sample_grid"),
    "evaluate": ("weit_cli.commands.evaluate", "evaluate"),
}
RENAMED = {"no_small": None, "source": "source", "output": None, "as_json": None}


def _cli_defaults(name: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    cmd = group.commands[name]
    return {p.name: p.default for p in cmd.params if p.name not in RENAMED or RENAMED[p.name]}


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_cli_and_library_defaults_agree(name):
    import importlib

    module, fn = LIBRARY[name]
    sig = inspect.signature(getattr(importlib.import_module(module), fn))
    lib = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    cli = _cli_defaults(name)
    shared = sorted(set(cli) & set(lib))
    assert len(shared) >= 2, (name, sorted(cli), sorted(lib))  # the mapping above still matches the code
    differ = {k: (cli[k], lib[k]) for k in shared if cli[k] != lib[k] and not (cli[k] is None and lib[k] is None)}
    assert not differ, f"{name}: CLI and library defaults differ: {differ}"


def test_defaults_come_from_options():
    """Spot checks that both sides read options.py (a default changed there changes both)."""
    assert _cli_defaults("materialize")["depth_rule"] == options.MATERIALIZE.depth_rule
    assert _cli_defaults("fit-scalers")["steps"] == options.FIT_SCALERS.steps
    assert _cli_defaults("finetune")["lr"] == options.FINETUNE.lr
    assert _cli_defaults("extract-templates")["num_templates"] == options.EXTRACT.num_templates
