"""The shape of the code (issue 9): checks that read weit_cli's source rather than run it."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

import weit_cli

PACKAGE = Path(weit_cli.__file__).parent


# ============================================================================ families own their names
# Only a family's own module (weit_cli/arch/<family>.py, or the modules of a family package such as
# weit_cli/arch/resnet/) and the registry may name a family — in code,
# strings, docstrings or comments. Anything else reaches a family through the registry and the
# Adapter interface, so adding a family touches no other module.

BUILTIN_SPELLINGS = ("vit", "resnet")  # the families weit shipped first, with their timm model names


def _family_pattern(names) -> re.Pattern:
    """A family name as a word or the start of one (`vit_base_patch16_224`, `resnet50`, `ViTs`), in
    any case, or as a CamelCase part (`NestedViT`), but not inside a word (`activity`, `gravity`)."""
    alternatives = []
    for name in sorted(set(names), key=len, reverse=True):
        # a name of several words (`decision-transformer`) in every spelling: `decision_transformer`,
        # `Decision Transformer`, `DecisionTransformerModel`
        body = r"[-_ ]?".join(re.escape(part) for part in re.split(r"[-_ ]", name))
        alternatives.append(rf"(?<![A-Za-z])(?i:{body})s?(?![a-z])")
        alternatives.append(rf"(?<=[a-z]){re.escape(name[0].upper())}(?i:{body[1:]})s?(?![a-z])")
    return re.compile("|".join(alternatives))


def _family_names() -> list[str]:
    from weit_cli.arch._registry import list_families

    return sorted(set(list_families()) | set(BUILTIN_SPELLINGS))


def _allowed(path: Path) -> bool:
    """A family's module (or a module of its package), the registry, or a private module of
    weit_cli/arch/ (what families share, or family knowledge waiting for its adapter hook, e.g.
    arch/_control_call.py)."""
    from weit_cli.arch._registry import family_module_of

    rel = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
    return family_module_of(rel) is not None or rel.startswith("weit_cli.arch._")


def _mentions(path: Path, pattern: re.Pattern) -> list[str]:
    """Every identifier, attribute, import, string constant (docstrings included) and comment of
    `path` that names a family, as 'line: text'."""
    source = path.read_text(encoding="utf-8")
    found = []

    def check(line: int, text: str) -> None:
        m = pattern.search(text)
        if m:
            found.append(f"{line}: …{text[max(0, m.start() - 40) : m.end() + 40]}…".replace("\n", " "))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            check(node.lineno, node.id)
        elif isinstance(node, ast.Attribute):
            check(node.lineno, node.attr)
        elif isinstance(node, ast.arg):
            check(node.lineno, node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            check(node.value.lineno, node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            check(node.lineno, node.name)
        elif isinstance(node, ast.alias):
            check(getattr(node, "lineno", 0), f"{node.name} as {node.asname}" if node.asname else node.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            check(node.lineno, node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            check(node.lineno, node.value)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            check(tok.start[0], tok.string)
    return found


def test_family_pattern_finds_names_not_words():
    p = _family_pattern(BUILTIN_SPELLINGS)
    for text in ("vit", "ViT-B", "ViTs", "vit_base_patch16_224", "_VIT_AXES", "NestedViT", "ResNetArch",
                 "resnet50d", "ResNets", "get_adapter('resnet')", "a timm ResNet", "(ViT: head_dim)"):
        assert p.search(text), text
    for text in ("activity", "gravity", "vitamin", "inevitable", "Revit", "resnetting"):
        assert not p.search(text), text


def test_family_pattern_finds_every_spelling_of_a_name_of_several_words():
    p = _family_pattern(["decision-transformer", "dit"])
    for text in ("decision-transformer", "decision_transformer", "DecisionTransformer", "DecisionTransformerModel",
                 "a Decision Transformer", "transformers' DecisionTransformerModel", "DiTs", "TinyDiT", "DiTDenoiser"):
        assert p.search(text), text
    for text in ("decision", "transformer", "a transformers model", "ditto", "audit"):
        assert not p.search(text), text


def test_no_module_outside_a_family_names_a_family():
    pattern = _family_pattern(_family_names())
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if not _allowed(path):
            found = _mentions(path, pattern)
            if found:
                offenders[path.relative_to(PACKAGE.parent).as_posix()] = found
    assert not offenders, "family names outside weit_cli/arch/<family>.py:\n" + "\n".join(
        f"  {p}:{line}" for p, lines in offenders.items() for line in lines
    )


def test_a_broken_family_fails_loudly(tmp_path, monkeypatch):
    """A family module that cannot be imported is a bug to report: listing the families raises
    instead of silently leaving it out."""
    from weit_cli.arch import _registry

    (tmp_path / "weit_broken_family.py").write_text("raise ImportError('a dependency of this family is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = _registry.family_modules()
    monkeypatch.setattr(_registry, "family_modules", lambda: [*real, "weit_broken_family"])
    monkeypatch.setattr(_registry, "_loaded", False)
    with pytest.raises(ImportError, match="a dependency of this family is missing"):
        _registry.list_families()
    with pytest.raises(ImportError):  # every time, not only the first
        _registry.get_adapter("x")


def test_every_family_module_registers_a_complete_adapter():
    """Each module or package of weit_cli/arch/ (but base and the private ones) registers one family;
    `Adapter` is abstract, so a family lacking a method cannot be registered at all."""
    import importlib

    from weit_cli.arch._registry import adapters, family_module_of, family_modules
    from weit_cli.arch.base import Adapter

    by_module = [family_module_of(type(a).__module__) for a in adapters()]
    assert sorted(by_module) == family_modules()  # one family each
    for a in adapters():
        assert isinstance(a, Adapter) and not getattr(type(a), "__abstractmethods__", None)
        assert importlib.import_module(type(a).__module__)
        assert a.model_section.model_fields["family"].annotation.__args__ == (a.family,)
        assert a.exporter.format


def test_an_incomplete_family_cannot_be_registered():
    from weit_cli.arch._registry import register
    from weit_cli.arch.base import Adapter

    with pytest.raises(TypeError, match="abstract"):

        @register
        class Half(Adapter):  # noqa: F841  (the decorator is what fails)
            family = "half"
            model_section = object
            exporter = object()

            def describe(self, arch) -> str:
                return "half"


def test_families_supply_the_commands_wording():
    """Size options for the 'next' hint of fit-scalers, and the options a mismatching checkpoint may
    have guessed wrong, come from the family."""
    from weit_cli.arch._registry import get_adapter
    from weit_cli.arch.resnet import ResNetArch
    from weit_cli.cli_render import materialize_hint as _materialize_hint

    vit, rn = get_adapter("vit"), get_adapter("resnet")
    assert vit.size_options(_tiny_arch()) == ["--depth", "1", "--width", "8", "--mlp-ratio", "4"]
    arch = ResNetArch(block="basic", depth=(1, 2, 1, 2), width=(8, 8, 16, 16), in_chans=1, num_classes=3)
    assert rn.size_options(arch) == ["--depth", "1,2,1,2", "--width", "8,8,16,16"]
    r = {"output": "s.safetensors", "size_options": rn.size_options(arch), "architecture": arch.to_dict()}
    assert _materialize_hint(r) == "weit materialize BUNDLE --scalers s.safetensors --depth 1,2,1,2 --width 8,8,16,16 --num-classes 3 -o MODEL"
    assert vit.hints.guessed == ("--num-heads", "--img-size") and rn.hints.guessed == ("--img-size",)


def _tiny_arch():
    from weit_cli.arch.vit import ViTArch

    return ViTArch(img_size=8, patch_size=4, in_chans=1, num_classes=3, depth=1, width=8, num_heads=2)


# ============================================================================ the export seam
def test_a_family_exports_through_its_own_exporter(tmp_path, monkeypatch):
    """A family that names another exporter gets its layout from `write_model` with no change to the
    streaming core; a .safetensors output still gets the bare file, with that exporter's metadata."""
    import json

    import torch

    from weit_cli.arch._registry import get_adapter
    from weit_cli.core.bundle import Bundle
    from weit_cli.io.export import exporter_for, write_model
    from weit_cli.io.exporters import Exporter
    from weit_cli.io.files import atomic_dir, read_header

    class Pretrained(Exporter):  # a save_pretrained-like folder
        format = "pretrained"

        def metadata(self, arch):
            return {"config": json.dumps({"hidden_size": arch.width})}

        def write(self, out, arch, weights, force):
            with atomic_dir(out, force) as tmp:
                weights(tmp / "weights.safetensors")
                (tmp / "config.json").write_text(self.metadata(arch)["config"])
            return [str(out / "weights.safetensors"), str(out / "config.json")]

        def summary(self, arch, out):
            return {"format": self.format, "load": f"Model.from_pretrained('{out}')"}

    ad = get_adapter("vit")
    monkeypatch.setattr(ad, "exporter", Pretrained())
    arch = _tiny_arch()
    state = ad.build(arch).state_dict()
    sized = Bundle(ad, arch, {}, {}, state)

    files = write_model(sized, tmp_path / "m", torch.float32, {"command": "test"}, force=False)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "weights.safetensors"]
    assert files == [str(tmp_path / "m" / "weights.safetensors"), str(tmp_path / "m" / "config.json")]
    meta = read_header(tmp_path / "m" / "weights.safetensors")["__metadata__"]
    assert json.loads(meta["config"]) == {"hidden_size": 8} and meta["family"] == ad.family
    assert exporter_for(ad, tmp_path / "m").summary(arch, tmp_path / "m")["load"] == f"Model.from_pretrained('{tmp_path / 'm'}')"

    bare = tmp_path / "m.safetensors"
    assert write_model(sized, bare, torch.float32, {"command": "test"}, force=False) == [str(bare)]
    assert json.loads(read_header(bare)["__metadata__"]["config"]) == {"hidden_size": 8}
    assert exporter_for(ad, bare).summary(arch, bare)["format"] == "safetensors"


# ============================================================================ no import cycles
def _import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the weit_cli modules it imports, function-level and TYPE_CHECKING imports included."""
    root = package.parent
    mods = {}
    for f in package.rglob("*.py"):
        rel = f.relative_to(root).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f

    def targets(cur: str, node) -> set[str]:
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        else:
            base = node.module or ""
            if node.level:
                parts = cur.split(".")
                parts = parts if mods[cur].name == "__init__.py" else parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = {base} | {f"{base}.{a.name}" for a in node.names}
        return {n for n in names if n in mods and n != cur}

    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[m] |= targets(m, node)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _import_graph(PACKAGE)
    assert "weit_cli.cli" in graph and graph["weit_cli.cli"], "the import graph was not read"
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# ============================================================================ the import layering
# docs/method.md §7, top to bottom: a module imports its own layer and the layers below it only.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("weit_cli.cli", "weit_cli.cli_runtime", "weit_cli.cli_render")),
    ("commands", ("weit_cli.commands",)),
    ("runs", ("weit_cli.training", "weit_cli.tasks", "weit_cli.data", "weit_cli.recipe")),
    ("files", ("weit_cli.io",)),  # weit's and dense files: bundle_file, dense, export, checkpoint, hub
    ("families", ("weit_cli.arch",)),
    ("formats", ("weit_cli.io.exporters", "weit_cli.io.files")),  # bytes on disk, below the families
    ("core", ("weit_cli.core",)),
    ("base", ("weit_cli.options", "weit_cli.section", "weit_cli.limits", "weit_cli.errors", "weit_cli")),
]
#: Upward imports the doc names: core reaches a family only through its interface (`Adapter`, for
#: type hints) and the registry; arch/dit.py reads the scheduler file's name and layout from
#: tasks/diffusion.py (review §4, to move into the family).
UPWARD = {
    ("core", "weit_cli.arch.base"),
    ("core", "weit_cli.arch._registry"),
    ("weit_cli.arch.dit", "weit_cli.tasks.diffusion"),
}


def _layer(module: str) -> int:
    """Index in LAYERS of the most specific prefix that holds `module`."""
    best = max(
        ((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if module == p or module.startswith(p + ".")),
        default=None,
    )
    assert best is not None, f"{module} is in no layer of docs/method.md §7"
    return best[1]


def test_imports_follow_the_documented_layers():
    graph = _import_graph(PACKAGE)
    upward = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _layer(target) >= _layer(module):
                continue
            if (LAYERS[_layer(module)][0], target) in UPWARD or (module, target) in UPWARD:
                continue
            upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "imports against docs/method.md §7:\n" + "\n".join(upward)


def test_core_reads_no_files_and_runs_nothing():
    """core/ is the math: it imports none of io, commands, tasks, training, data or the CLI."""
    graph = _import_graph(PACKAGE)
    bad = [
        f"{m} imports {t}"
        for m, targets in graph.items() if m.startswith("weit_cli.core")
        for t in targets if t.split(".")[1] in ("io", "commands", "tasks", "training", "data", "cli", "recipe", "options")
    ]
    assert not bad, "\n".join(bad)
