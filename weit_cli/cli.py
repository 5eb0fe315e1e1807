"""The `weit` command line: parses options, calls one library function, renders the result.

Heavy imports (torch, timm) happen inside the commands so that `weit --help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    name="weit",
    help="Resize PyTorch models through Kronecker weight templates (WeiT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (for pipelines) instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Where to write.")]


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def run(fn: Callable[[], dict[str, Any]], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    """Call a library function; map failures to a one-line message and an exit code."""
    from .errors import EXIT_INTERRUPTED, WeitError

    try:
        result = fn()
    except WeitError as e:
        _fail(e.message, e.hint, e.exit_code, as_json)
    except KeyboardInterrupt:
        _fail("interrupted", "nothing was written", EXIT_INTERRUPTED, as_json)
    except Exception as e:  # a bug in weit, not the user's fault: one line, traceback on request
        if os.environ.get("WEIT_DEBUG"):
            raise
        msg = f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _fail(msg, "re-run with WEIT_DEBUG=1 for a traceback and report it", 1, as_json)
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        render(result)


def _fail(message: str, hint: str, code: int, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "hint": hint, "exit_code": code}) + "\n")
    else:
        from rich.markup import escape

        line = f"[bold red]error:[/] {escape(message)}"
        if hint:
            line += f" [dim]— {escape(hint)}[/]"
        _err_console().print(line, soft_wrap=True)
    raise typer.Exit(code)


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v if isinstance(v, str) else json.dumps(v, default=str))
    Console().print(t)


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@app.command("extract-templates")
def extract_templates_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="timm model folder (config.json + weights) or weights file.")],
    output: OutOpt,
    template_size: Annotated[Optional[int], typer.Option("--template-size", "-p", help="Template block size p (default: head_dim).")] = None,
    num_templates: Annotated[int, typer.Option("--num-templates", "-n", help="Templates per matrix type.")] = 16,
    num_heads: Annotated[Optional[int], typer.Option(help="Heads of the source ViT, if its files do not say.")] = None,
    img_size: Annotated[Optional[int], typer.Option(help="Image size of the source, if its files do not say.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a template bundle from a dense checkpoint (shared truncated SVD per matrix type)."""

    def go():
        from .api import extract_templates

        return extract_templates(
            checkpoint, output, template_size=template_size, num_templates=num_templates,
            num_heads=num_heads, img_size=img_size, force=force,
        )

    def render(r):
        rows = [("wrote", r["output"]), ("templates", r["templates"])]
        rows += [(f"rel. error {t}", f"{e:.3e}") for t, e in r["relative_error"].items()]
        rows += [(f"params {k}", _human(v)) for k, v in r["params"].items()]
        _table("extract-templates", rows)

    run(go, as_json, render)


@app.command()
def materialize(
    bundle: Annotated[Path, typer.Argument(help="Template bundle (.safetensors).")],
    output: OutOpt,
    depth: Annotated[Optional[int], typer.Option(help="Number of blocks (default: the bundle's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Embedding width (default: the bundle's).")] = None,
    mlp_ratio: Annotated[Optional[float], typer.Option(help="MLP hidden width / width.")] = None,
    num_heads: Annotated[Optional[int], typer.Option(help="Heads (must equal width / head_dim).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier outputs; a new head starts at zero.")] = None,
    depth_rule: Annotated[str, typer.Option(help="auto | prefix | interp | stack | interleave | identity.")] = "auto",
    width_rule: Annotated[str, typer.Option(help="tile (Net2Net, lossless for integer ratios) | tile-nodiv.")] = "tile",
    scalers: Annotated[Optional[Path], typer.Option(help="Scalers fitted by 'weit fit-scalers'.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write an ordinary timm checkpoint of any size: a folder for local-dir:, or a bare .safetensors."""

    def go():
        from .api import materialize as mat

        return mat(
            bundle, output, depth=depth, width=width, mlp_ratio=mlp_ratio, num_heads=num_heads,
            num_classes=num_classes, depth_rule=depth_rule, width_rule=width_rule, scalers=scalers,
            dtype=dtype, force=force,
        )

    def render(r):
        a = r["architecture"]
        _table("materialize", [
            ("wrote", ", ".join(r["files"])),
            ("model", f"depth {a['depth']}, width {a['width']}, {a['num_heads']} heads"),
            ("params", _human(r["params"])),
            ("load with", _load_hint(r)),
        ])

    run(go, as_json, render)


def _load_hint(r: dict[str, Any]) -> str:
    out = r["output"]
    if out.endswith(".safetensors"):
        args = ", ".join(f"{k}={v!r}" for k, v in r["timm"].items())
        return f"timm.create_model('vit_base_patch16_224', checkpoint_path='{out}', {args})"
    return f"timm.create_model('local-dir:{out}', pretrained=True)"


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A bundle, scalers file, or dense checkpoint.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a file's kind, metadata, architecture, templates and parameter counts."""

    def go():
        from .api import inspect as insp

        return insp(file)

    def render(r):
        rows = [(k, r[k]) for k in ("kind", "description") if r.get(k)]
        if r.get("templates"):
            rows += [(f"templates {t}", "×".join(map(str, s))) for t, s in r["templates"].items()]
        if r.get("nested"):
            rows.append(("nested sizes", r["nested"]))
        rows += [(f"params {k}", _human(v)) for k, v in r.get("params", {}).items()]
        for k in ("weit_format", "weit_version", "kron_order", "sha256", "bundle_sha256"):
            if r.get(k):
                rows.append((k, r[k]))
        if r.get("provenance"):
            rows.append(("provenance", r["provenance"]))
        _table(r["path"], rows)

    run(go, as_json, render)


@app.command("list-archs")
def list_archs(as_json: JsonOpt = False) -> None:
    """List the architecture families weit can template."""

    def go():
        from .arch import list_families

        return {"families": list_families()}

    run(go, as_json, lambda r: print("\n".join(r["families"])))


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from . import __version__

        print(f"weit {__version__}")
        raise typer.Exit(0)


if __name__ == "__main__":
    app()
