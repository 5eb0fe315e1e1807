"""Options defined once: every option a CLI command shares (by name) with its library function has
the same default on both sides, and the defaults come from weit_cli/options.py."""

from __future__ import annotations

import ast
import inspect
import re
import typing
from pathlib import Path

import pytest
import typer.main

from weit_cli import options
from weit_cli.cli import app
from weit_cli.errors import WeitError

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


# ---------------------------------------------------------------------------------------------- the check
def _bad_values(info):
    """Values just outside a field's bounds (and a NaN for a float), read from its metadata."""
    b = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}
    out = [b["ge"] - 1] if "ge" in b else []
    out += [b["gt"]] if "gt" in b else []
    out += [b["le"] + 1] if "le" in b else []
    out += [b["lt"]] if "lt" in b else []
    if float in (info.annotation, *typing.get_args(info.annotation)):
        out = [float(v) for v in out] + [float("nan")]
    return out


def _with_epochs(model, values):
    """finetune's epochs have no default: FinetuneRun needs them."""
    return {"epochs": 1, **values} if model is options.FinetuneRun else values


MODELS = [options.MaterializeOptions, options.ExtractOptions, options.DistillOptions, options.FitScalersOptions,
          options.FinetuneRun, options.SampleOptions, options.EvaluateOptions]
CASES = [(m, name, v) for m in MODELS for name, info in m.model_fields.items() for v in _bad_values(info)]


@pytest.mark.parametrize("model,name,value", CASES, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_every_bound_is_refused_in_one_line_naming_its_flag(model, name, value):
    with pytest.raises(WeitError) as e:
        options.check(model, **_with_epochs(model, {name: value}))
    flag = model.flags.get(name, "-n" if name == "n" else "--" + name.replace("_", "-"))
    text = str(e.value.message)
    assert text.startswith(f"{flag} must be "), text
    assert "\n" not in text and e.value.hint and "\n" not in e.value.hint and "{" not in e.value.hint, (text, e.value.hint)


@pytest.mark.parametrize("model,values,message,hint", [
    (options.FitScalersOptions, {"steps": 0}, "--steps must be in 1..10000000, got 0", "a few hundred steps is typical"),
    (options.DistillOptions, {"steps": 0}, "--distill-steps must be in 1..10000000, got 0", "a few hundred steps is typical"),
    (options.DistillOptions, {"lr": -1.0}, "--distill-lr must be positive and finite, got -1", "e.g. --distill-lr 0.001"),
    (options.FinetuneRun, {"epochs": 0}, "--epochs must be in 1..100000, got 0", "see 'weit finetune --help'"),
    (options.FinetuneRun, {"epochs": 1, "init": "pretrained"}, "unknown --init 'pretrained'", "choose one of: weit, random, weight-selection"),
    (options.MaterializeOptions, {"dtype": "float8"}, "unknown dtype 'float8'", "choose one of: float32, bfloat16, float16"),
    (options.MaterializeOptions, {"depth_rule": "sideways"}, "unknown depth rule 'sideways'", "choose one of: auto, prefix, spread, interp, stack, interleave, identity"),
    (options.SampleOptions, {"n": 0}, "-n must be in 1..100000, got 0", "e.g. -n 64"),
    (options.SampleOptions, {"guidance": -1.0}, "--guidance must be a number ≥ 0, got -1", "1 is no guidance; 2-4 sharpens the classes"),
    (options.SampleOptions, {"steps": 2.5}, "--steps must be in 1..1000, got 2.5", "e.g. --steps 50"),  # no silent rounding
    (options.EvaluateOptions, {"episodes": True}, "--episodes must be in 1..10000, got True", "e.g. --episodes 10"),
    (options.FitScalersOptions, {"warmup": -1}, "--warmup must be 0 or more steps, got -1", "e.g. --warmup 20"),
    (options.FitScalersOptions, {"checkpoint_every": -1}, "--checkpoint-every must be 0 (never) or more steps, got -1", "e.g. --checkpoint-every 50"),
])
def test_messages_name_the_flag_with_its_hint(model, values, message, hint):
    with pytest.raises(WeitError) as e:
        options.check(model, **values)
    assert (e.value.message, e.value.hint, e.value.exit_code) == (message, hint, 2)


def test_one_bound_per_quantity():
    """Every command's training batch refuses 1 image (batch statistics need 2), every step count the same cap."""
    for model, name in [(options.DistillOptions, "batch_size"), (options.FitScalersOptions, "batch_size"),
                        (options.FinetuneRun, "batch_size"), (options.MaterializeOptions, "calibrate_batch_size")]:
        with pytest.raises(WeitError, match="must be at least 2, got 1"):
            options.check(model, **_with_epochs(model, {name: 1}))
    for model in (options.DistillOptions, options.FitScalersOptions):
        options.check(model, steps=10_000_000)
        with pytest.raises(WeitError, match="in 1..10000000"):
            options.check(model, steps=10_000_001)


def test_defaults_are_valid():
    for instance in (options.MATERIALIZE, options.EXTRACT, options.DISTILL, options.FIT_SCALERS, options.FINETUNE,
                     options.SAMPLE, options.EVALUATE):
        assert type(instance).model_validate(instance.model_dump()) == instance


def test_the_python_api_refuses_bad_values_too(tmp_path):
    """The library functions check what they are given, before reading any file."""
    import torch

    from weit_cli.commands.evaluate import evaluate_control
    from weit_cli.commands.finetune import finetune
    from weit_cli.commands.fit_scalers import fit_scalers
    from weit_cli.commands.materialize import materialize
    from weit_cli.commands.sample import sample_images
    from weit_cli.tasks import diffusion
    from weit_cli.tasks.generation import Generation

    missing = tmp_path / "missing"
    calls = [
        (lambda: fit_scalers(missing, tmp_path / "s.safetensors", data="digits", lr=float("inf")), "--lr must be positive and finite"),
        (lambda: fit_scalers(missing, tmp_path / "s.safetensors", data="digits", batch_size=1), "--batch-size must be at least 2"),
        (lambda: finetune(missing, tmp_path / "run", data="digits", epochs=1, ema=1.0), "--ema must be a decay in [0, 1)"),
        (lambda: finetune(missing, tmp_path / "run", data="digits", epochs=1, schedule="linear"), "unknown --schedule 'linear'"),
        (lambda: materialize(missing, tmp_path / "m", dtype="float8"), "unknown dtype"),
        (lambda: sample_images(missing, guidance=float("nan")), "--guidance must be a number ≥ 0"),
        (lambda: evaluate_control(missing, None, None, None, env=None, episodes=0, target_return=None, seed=0, max_steps=None, device=None), "--episodes"),
        (lambda: diffusion.sample(None, torch.zeros(2, dtype=torch.int64), shape=(1, 8, 8), num_classes=2, steps=0), "--steps must be in 1..1000"),
        (lambda: diffusion.drop_labels(torch.zeros(2, dtype=torch.int64), 2, 1.5, None), "label dropout must be in [0, 1]"),
        (lambda: Generation(label_dropout=-0.1), "label dropout must be in [0, 1]"),
    ]
    for call, words in calls:
        with pytest.raises(WeitError) as e:
            call()
        assert words in str(e.value.message), (words, e.value.message)


# Messages of the form "--flag must be …" (or the library's spelling of an option) are written only in
# options.py, from the fields' bounds: a hand-written copy elsewhere is how floors and caps drifted apart.
RANGE_MESSAGE = re.compile(r"^(-{1,2}[a-z][\w-]*|label dropout|sampling steps|guidance scale|batch size|the number of episodes) must be")


def _first_text(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return ""


def test_option_ranges_are_written_once():
    root = Path(options.__file__).parent
    found = set()
    for path in sorted(root.rglob("*.py")):
        if path.name == "options.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # any string: a message may be built before it is raised
            if RANGE_MESSAGE.match(_first_text(node)):
                found.add(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"option ranges checked by hand (declare the bound in weit_cli/options.py and call options.check): {sorted(found)}"
