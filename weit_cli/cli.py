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

from weit_cli.options import (
    DISTILL,
    EVALUATE,
    EXTRACT,
    FINETUNE,
    FIT_SCALERS,
    MATERIALIZE,
    SAMPLE,
    SEED,
)


class _Weit(typer.Typer):
    """With --json, click's own usage errors (a missing option, a non-number) are one JSON object
    on stdout too, like every other error."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "--json" not in sys.argv[1:]:
            return super().__call__(*args, **kwargs)
        usage: tuple[type[BaseException], ...] = (typer.TyperException,) if hasattr(typer, "TyperException") else ()
        try:  # typer ≥ 0.2x vendors its own click; older typers raise click's exceptions
            import click

            usage += (click.ClickException,)
        except ImportError:
            pass
        try:
            rv = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            sys.exit(130)
        except usage as e:
            code = getattr(e, "exit_code", 2)
            msg = e.format_message() if hasattr(e, "format_message") else str(e)
            sys.stdout.write(json.dumps({"error": msg, "hint": "see --help", "exit_code": code}) + "\n")
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = _Weit(
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
    import signal
    import threading

    from weit_cli.errors import EXIT_INTERRUPTED, WeitError

    # SIGTERM (a CI timeout, `kill`, torchrun stopping its workers) takes the Ctrl-C path: temp files
    # are removed and the one-line message says what was kept, instead of dying mid-write.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    _plain_lines()
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
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        render(result)


def _plain_lines() -> None:
    """Where stderr is no terminal (a CI log, `2> file`), long phases write plain progress lines there
    (`weit: …`), at most one every WEIT_PROGRESS_INTERVAL seconds (default 10), on the main process only."""
    from weit_cli.training import progress

    if sys.stderr.isatty() or int(os.environ.get("RANK", "0")) != 0:
        progress.plain_lines(None)
        return
    try:
        every = float(os.environ.get("WEIT_PROGRESS_INTERVAL", "10"))
    except ValueError:
        every = 10.0
    progress.plain_lines(lambda line: print(f"weit: {line}", file=sys.stderr, flush=True), every if every > 0 else 10.0)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def _fail(message: str, hint: str, code: int, as_json: bool) -> None:
    from weit_cli.errors import one_line

    message, hint = one_line(message), one_line(hint)  # internal errors too
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
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v if isinstance(v, str) else json.dumps(v, default=str))
    print_table(t)


def print_table(table) -> None:
    """Print a rich table whole. On a terminal rich fits it to the window; elsewhere (CI logs, `| tee`,
    a file) it would wrap every cell at 80 columns, so there the table is as wide as its content
    and the title goes on its own line (a title is wrapped to the table's width)."""
    from rich.console import Console
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        title, table.title = table.title, None
        console = Console(width=max(Console(width=1_000_000).measure(table).maximum, 1))
        if title:
            console.print(title if isinstance(title, Text) else Text(str(title)), soft_wrap=True)
    console.print(table)


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@app.command("extract-templates")
def extract_templates_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Dense model: a timm, diffusers or transformers folder, a weights file, or a hub id hf-hub:ORG/NAME[@REVISION][/SUBFOLDER] (read from the Hugging Face cache).")],
    output: OutOpt,
    template_size: Annotated[Optional[int], typer.Option("--template-size", "-p", help="Template block size p (default: the family's, e.g. the attention head size or the gcd of the conv widths, at most 16).")] = None,
    num_templates: Annotated[int, typer.Option("--num-templates", "-n", help="Templates per matrix type (each type capped at its full rank p·q·k).")] = EXTRACT.num_templates,
    num_heads: Annotated[Optional[int], typer.Option(help="Attention heads of the source, if its files do not say.")] = None,
    img_size: Annotated[Optional[int], typer.Option(help="Image size of the source, if its files do not say.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Distil the templates from the checkpoint on this data after the SVD (fashion-mnist, mnist5k, digits or an image folder).")] = None,
    distill_steps: Annotated[Optional[int], typer.Option(help=f"Distillation steps (with --data; default {DISTILL.steps}).")] = None,
    distill_lr: Annotated[Optional[float], typer.Option(help=f"Distillation learning rate (default {DISTILL.lr:g}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Distillation batch size (default {DISTILL.batch_size}).")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = DISTILL.temperature,
    seed: Annotated[int, typer.Option(help="Seed of the data split and batch order.")] = SEED,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if available).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a template bundle from a dense checkpoint (shared truncated SVD per matrix type), then
    optionally distil it from the checkpoint on data (--data)."""

    def go():
        from weit_cli.commands.extract import extract_templates

        with _StepProgress("distill", not as_json and data is not None) as progress:
            return extract_templates(
                checkpoint, output, template_size=template_size, num_templates=num_templates,
                num_heads=num_heads, img_size=img_size, data=data, distill_steps=distill_steps,
                distill_lr=distill_lr, batch_size=batch_size, temperature=temperature, seed=seed,
                device=device, force=force, on_step=progress,
            )

    def render(r):
        rows = [("wrote", r["output"]), ("templates", r["templates"])]
        rows += [(f"rel. error {t}", f"{e:.3e}") for t, e in r["relative_error"].items()]
        d = r.get("distillation")
        if d:
            rows += [(f"rel. error {t} (distilled)", f"{e:.3e}") for t, e in d["relative_error_after"].items()]
            k, name = _metric(d, "teacher_{}", (("acc", "accuracy"), ("action_mse", "action MSE"), ("loss", "loss")))
            rows.append((f"teacher {name}", f"{d[f'teacher_{k}']:.4f} on {d['eval_split']}"))
            rows.append((f"student {name}", f"{d[f'student_{k}_before']:.4f} (SVD) → {d[f'student_{k}_after']:.4f} ({d['steps']} steps)"))
        rows += [(f"params {k}", _human(v)) for k, v in r["params"].items()]
        _table("extract-templates", rows)
        for w in r.get("warnings", []):
            _err_console().print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)

    run(go, as_json, render)


@app.command()
def materialize(
    bundle: Annotated[Path, typer.Argument(help="Template bundle (.safetensors).")],
    output: OutOpt,
    depth: Annotated[Optional[str], typer.Option(help="Blocks (default: the bundle's). Families with stages: per stage, e.g. 2,2,2,2; one number sets every stage.")] = None,
    width: Annotated[Optional[str], typer.Option(help="Embedding width; families with stages: channels per stage, e.g. 64,128,256,512, or one number for stage 1 that keeps the bundle's stage ratios (default: the bundle's).")] = None,
    mlp_ratio: Annotated[Optional[float], typer.Option(help="MLP hidden width / width.")] = None,
    num_heads: Annotated[Optional[int], typer.Option(help="Heads (must equal width / head_dim).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier outputs; a new head starts at zero.")] = None,
    depth_rule: Annotated[str, typer.Option(help="auto | prefix | interp | stack | interleave | identity.")] = MATERIALIZE.depth_rule,
    width_rule: Annotated[str, typer.Option(help="tile (Net2Net, lossless for integer ratios) | tile-nodiv.")] = MATERIALIZE.width_rule,
    scalers: Annotated[Optional[Path], typer.Option(help="Scalers fitted by 'weit fit-scalers'.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = MATERIALIZE.dtype,
    calibrate: Annotated[Optional[str], typer.Option(help="BatchNorm models: re-estimate the running statistics on this data (fashion-mnist, mnist5k, digits or an image folder).")] = None,
    calibrate_batches: Annotated[int, typer.Option(help="Batches for --calibrate.")] = MATERIALIZE.calibrate_batches,
    calibrate_batch_size: Annotated[int, typer.Option(help="Images per --calibrate batch.")] = MATERIALIZE.calibrate_batch_size,
    seed: Annotated[int, typer.Option(help="Seed of the calibration batches and data split.")] = SEED,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write an ordinary checkpoint of any size in its family's own library layout: a timm folder
    (classifiers; timm's local-dir:), a diffusers folder (image generators), a transformers folder
    (control models), or a bare .safetensors."""

    def go():
        from weit_cli.commands.materialize import materialize as mat

        return mat(
            bundle, output, depth=_sizes(depth, "depth"), width=_sizes(width, "width"), mlp_ratio=mlp_ratio,
            num_heads=num_heads, num_classes=num_classes, depth_rule=depth_rule, width_rule=width_rule,
            scalers=scalers, dtype=dtype, calibrate=calibrate, calibrate_batches=calibrate_batches,
            calibrate_batch_size=calibrate_batch_size, seed=seed, force=force,
        )

    def render(r):
        rows = [
            ("wrote", ", ".join(r["files"])),
            ("model", r.get("description", "")),
            ("params", _human(r["params"])),
            ("load with", r["export"]["load"]),
        ]
        if r.get("bn_statistics"):
            rows.append(("BN statistics", r["bn_statistics"]))
        _table("materialize", rows)

    run(go, as_json, render)


def _sizes(text: str | None, name: str) -> int | list[int] | None:
    """'64' → 64; '64,128,256,512' → a per-stage list."""
    from weit_cli.errors import WeitError

    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise WeitError(f"--{name} '{text}' is not a number or a comma list of numbers", f"e.g. --{name} 2 or --{name} 2,2,2,2") from None
    return values[0] if len(values) == 1 else values


@app.command()
def pretrain(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    output: OutOpt,
    data: Annotated[Optional[str], typer.Option("--data", help="fashion-mnist[:folder], mnist5k, digits, or an image-folder path (overrides data.source).")] = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Nested distillation: a dense checkpoint (folder, file or hf-hub:ORG/NAME) of the recipe's largest size that every trained size learns from (sets teacher.source; templates start from its SVD).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value, e.g. --set train.lr=1e-3 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint (OUTPUT stem + .ckpt.safetensors).")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N] (default: a GPU when present).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a template bundle under the Kronecker constraint, nested sizes trained together (torchrun-ready)."""
    import shlex

    rank = int(os.environ.get("RANK", "0"))
    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--json")]
    command = "weit " + shlex.join(argv)

    def go():
        from weit_cli.commands.pretrain import pretrain as pt

        with _StepProgress("pretrain", not as_json and rank == 0) as progress:
            return pt(recipe, output, data=data, teacher=teacher, overrides=overrides, resume=resume, force=force, device=device,
                      command=command, callback=progress)

    def render(r):
        v = r.get("val") or {}
        rows = [("wrote", f"{r['output']}, {r['recipe']}"), ("steps", str(r["steps"]))]
        if r.get("resumed_from"):
            rows.append(("resumed from step", str(r["resumed_from"])))
        rows.append(("nested sizes", f"depths {r['nested']['depths']}, widths {r['nested']['widths']}"))
        if r.get("teacher"):
            rows.append(("teacher", f"{r['teacher']['source']} (weight {r['teacher']['weight']:g})"))
        for name in ("largest", "smallest"):
            if f"val_acc_{name}" in v:
                rows.append((f"val acc {name}", f"{100 * v[f'val_acc_{name}']:.2f}%"))
            elif f"val_action_mse_{name}" in v:
                rows.append((f"val action MSE {name}", f"{v[f'val_action_mse_{name}']:.4f}"))
            elif f"val_loss_{name}" in v:
                rows.append((f"val loss {name}", f"{v[f'val_loss_{name}']:.4f}"))
        rows += [(f"params {k}", _human(n)) for k, n in r["params"].items()]
        rows += [("device", f"{r['device']} × {r['world_size']}"), ("wall", f"{r['wall_s']:.1f}s")]
        _table("pretrain", rows)

    if rank != 0:
        run(go, False, lambda r: None)
    else:
        run(go, as_json, render)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A bundle, scalers file, or dense checkpoint (folder, file or hf-hub:ORG/NAME).")],
    full: Annotated[bool, typer.Option("--full", help="Every provenance field as its own row (the resolved recipe too).")] = False,
    check: Annotated[bool, typer.Option("--check", help="Also read every tensor and check its values (without it a bundle or scalers file is answered from its header).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a file's kind, metadata, architecture, templates, parameter counts and where it came from."""

    def go():
        from weit_cli.commands.inspect import inspect as insp

        return insp(file, check=check)

    def render(r):
        rows = [(k, r[k]) for k in ("kind", "description") if r.get(k)]
        if r.get("templates"):
            rows += [(f"templates {t}", "×".join(map(str, s))) for t, s in r["templates"].items()]
        if r.get("nested"):
            rows.append(("nested sizes", r["nested"]))
        rows += [(f"params {k}", _human(v)) for k, v in r.get("params", {}).items()]
        for k in ("weit_format", "weit_version", "kron_order", "sha256", "bundle_sha256", "producer", "check"):
            if r.get(k):
                rows.append((k, r[k]))
        for name, content in (r.get("companion_files") or {}).items():
            said = ", ".join(f"{k} {content[k]}" for k in ("env_id", "context", "data") if content.get(k) not in (None, ""))
            rows.append(("written beside models", f"{name}{f' ({said})' if said else ''}"))
        shown = {(k.replace("_", " "), str(v)) for k, v in rows}  # a scalers file's bundle_sha256 is in both
        rows += [(k, v) for k, v in _provenance_rows(r.get("provenance") or {}, full) if (k.replace("_", " "), v) not in shown]
        _table(r["path"], rows)

    run(go, as_json, render)


def _provenance_rows(prov: dict[str, Any], full: bool) -> list[tuple[str, str]]:
    """Provenance as rows a person reads: the command first, then every plain field, and one level
    into records (`reconstruction_error qkv`); the resolved recipe and deeper records only with
    --full, where every leaf is a row named by its dotted path. --json has the record as written."""
    def leaves(prefix: str, v: Any, depth: int):
        if isinstance(v, dict) and v and depth != 0:
            for k, x in v.items():
                yield from leaves(f"{prefix}.{k}" if prefix else str(k), x, depth - 1)
        elif not isinstance(v, dict) or full:
            if v is None or v == "":
                return
            yield prefix, v if isinstance(v, str) else json.dumps(v, default=str)

    rows = []
    for k in sorted(prov, key=lambda k: k != "command"):  # stable: the record's own order otherwise
        if k == "recipe" and not full:
            continue
        for name, value in leaves(k, prov[k], -1 if full else 1):
            rows.append((name if full else name.replace(".", " ").replace("_", " "), value))
    return rows


class _StepProgress:
    """A rich progress bar on stderr fed by a library's StepInfo callback (off for --json); where stderr
    is no terminal, a plain line at most every WEIT_PROGRESS_INTERVAL seconds instead (`_plain_lines`)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar, self.task = label, enabled and sys.stderr.isatty(), None, None
        self.last_line = None  # monotonic time of the last plain line

    def _plain(self, info) -> None:
        import time

        from weit_cli.training import progress

        now = time.monotonic()
        if self.last_line is None:
            self.last_line = now  # the clock starts at the first step
        if now - self.last_line < progress.interval() and info.step < info.total_steps:
            return
        self.last_line = now
        eta = f", eta {info.eta_s:.0f} s" if info.eta_s != float("inf") and info.step < info.total_steps else ""
        extra = "".join(f", {k} {v:.4g}" for k, v in info.metrics.items())
        progress.say(f"{self.label}: step {info.step}/{info.total_steps}, loss {info.loss:.4g}, {info.steps_per_sec:.2f} it/s{eta}{extra}")

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=_err_console(), transient=True,
            )
            self.bar.__enter__()
        return self

    def __call__(self, info) -> None:
        if self.bar is None:
            self._plain(info)
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=info.total_steps, info="")
        extra = " ".join(f"{k} {v:.3f}" for k, v in info.metrics.items())
        text = f"loss {info.loss:.3f} lr {info.lr:.1e} {info.steps_per_sec:.1f} it/s {extra}".rstrip()
        self.bar.update(self.task, completed=info.step, info=text)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


@app.command("fit-scalers")
def fit_scalers_cmd(
    bundle: Annotated[Path, typer.Argument(help="Template bundle (.safetensors).")],
    output: OutOpt,
    data: Annotated[str, typer.Option(help="fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image folder.")],
    depth: Annotated[Optional[str], typer.Option(help="Target blocks (default: the bundle's). Families with stages: per stage, e.g. 1,1,1,1; one number sets every stage.")] = None,
    width: Annotated[Optional[str], typer.Option(help="Embedding width; families with stages: channels per stage, or one number for stage 1 (default: the bundle's).")] = None,
    mlp_ratio: Annotated[Optional[float], typer.Option(help="Target MLP hidden width / width.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier outputs (default: the data's class count).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = FIT_SCALERS.steps,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup then cosine).")] = FIT_SCALERS.lr,
    warmup: Annotated[Optional[int], typer.Option(help="Warmup steps (default: 10% of --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = FIT_SCALERS.batch_size,
    train_subset: Annotated[Optional[float], typer.Option(help="Fit on part of the training split: fraction ≤ 1 or image count.")] = None,
    no_small: Annotated[bool, typer.Option("--no-small", help="Train the scalers only; keep norms, biases and embeddings as resized.")] = False,
    reset_head: Annotated[bool, typer.Option("--reset-head", help="Start a fresh classifier (automatic when the class count differs).")] = False,
    distill: Annotated[float, typer.Option(help="Weight of KL(bundle's largest model ‖ target) in the loss, 0–1 (0: off).")] = FIT_SCALERS.distill,
    temperature: Annotated[float, typer.Option(help="Distillation softmax temperature.")] = FIT_SCALERS.temperature,
    depth_rule: Annotated[str, typer.Option(help="Initial depth rule: auto | prefix | interp | stack | interleave | identity.")] = FIT_SCALERS.depth_rule,
    width_rule: Annotated[str, typer.Option(help="Initial width rule: tile | tile-nodiv.")] = FIT_SCALERS.width_rule,
    seed: Annotated[int, typer.Option(help="Seed of the data split and order.")] = SEED,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    calibrate_batches: Annotated[int, typer.Option(help="BatchNorm models: batches of the fitting data that re-estimate the running statistics after fitting.")] = FIT_SCALERS.calibrate_batches,
    checkpoint_every: Annotated[int, typer.Option(help="Write a resumable checkpoint every N steps (OUTPUT stem + .ckpt.safetensors; 0: never).")] = FIT_SCALERS.checkpoint_every,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fit from its checkpoint (same command plus --resume).")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fit scalers for one target size with the templates frozen (for 'materialize --scalers')."""

    def go():
        from weit_cli.commands.fit_scalers import fit_scalers

        subset = int(train_subset) if train_subset is not None and train_subset > 1 else train_subset
        with _StepProgress("fit-scalers", not as_json) as progress:
            return fit_scalers(
                bundle, output, data=data, depth=_sizes(depth, "depth"), width=_sizes(width, "width"), mlp_ratio=mlp_ratio,
                num_classes=num_classes, calibrate_batches=calibrate_batches, steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, train_subset=subset, train_small=not no_small,
                reset_head=reset_head, distill=distill, temperature=temperature, depth_rule=depth_rule, width_rule=width_rule, seed=seed,
                device=device, force=force, resume=resume, checkpoint_every=checkpoint_every, on_step=progress,
            )

    def render(r):
        _table("fit-scalers", [
            ("wrote", r["output"]),
            *([("resumed from step", str(r["resumed_from"]))] if r.get("resumed_from") else []),
            ("model", r["description"]),
            ("trained", f"{', '.join(r['trained'])} ({_human(r['params'])} values), {r['steps']} steps in {r['fit_seconds']:.1f}s"),
            ("loss", f"{r['loss_first']:.4f} → {r['loss_last']:.4f}"),
            _before_after(r),
            *([("BN statistics", r["bn_statistics"])] if r.get("bn_statistics") else []),
            ("bundle sha256", r["bundle_sha256"]),
            ("next", _materialize_hint(r)),
        ])

    run(go, as_json, render)


def _before_after(r: dict[str, Any]) -> tuple[str, str]:
    k, what = _metric(r, "val_{}_before", (("acc", "images"), ("action_mse", "windows"), ("loss", "images")))
    return f"val {r['metric']}", f"{r[f'val_{k}_before']:.4f} → {r[f'val_{k}_after']:.4f} ({r['val_count']} {what})"


def _metric(r: dict[str, Any], pattern: str, choices: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """The first (metric key, label) of `choices` whose `pattern.format(key)` is in the result `r`:
    a task's metric names its result keys (`Task.metric_key`), so a render finds which it got."""
    return next((k, label) for k, label in choices if pattern.format(k) in r)


def _materialize_hint(r: dict[str, Any]) -> str:
    return (
        f"weit materialize BUNDLE --scalers {r['output']} {' '.join(r['size_options'])} "
        + (f"--num-classes {r['architecture']['num_classes']} " if "num_classes" in r["architecture"] else "")
        + "-o MODEL"
    )


@app.command()
def finetune(
    model: Annotated[Path, typer.Argument(help="Model to train: a materialized timm, diffusers or transformers folder, a .safetensors file, or a hub id hf-hub:ORG/NAME[@REVISION][/SUBFOLDER].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder (metrics.json, best/, last/).")],
    data: Annotated[str, typer.Option(help="fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image folder.")],
    epochs: Annotated[int, typer.Option(help="Epochs over the training split.")],
    init: Annotated[str, typer.Option(help="weit (MODEL's weights) | random (the library's own init) | weight-selection (needs --from).")] = FINETUNE.init,
    source: Annotated[Optional[Path], typer.Option("--from", help="Larger dense checkpoint (folder, file or hf-hub:ORG/NAME) for --init weight-selection.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = FINETUNE.lr,
    warmup: Annotated[float, typer.Option(help="Linear warmup, in epochs (may be fractional).")] = FINETUNE.warmup,
    schedule: Annotated[str, typer.Option(help="cosine (to --min-lr-ratio) | constant, after warmup.")] = FINETUNE.schedule,
    min_lr_ratio: Annotated[float, typer.Option(help="Final learning rate as a fraction of --lr (cosine).")] = FINETUNE.min_lr_ratio,
    batch_size: Annotated[int, typer.Option(help="Images per step over all processes.")] = FINETUNE.batch_size,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on norms, biases, embeddings).")] = FINETUNE.weight_decay,
    grad_clip: Annotated[float, typer.Option(help="Clip the global gradient norm (0: off).")] = FINETUNE.grad_clip,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = FINETUNE.label_smoothing,
    train_subset: Annotated[Optional[float], typer.Option(help="Train on part of the training split: fraction ≤ 1 or image count.")] = None,
    data_seed: Annotated[int, typer.Option(help="Seed of the validation split and the training subset.")] = SEED,
    ema: Annotated[float, typer.Option(help="Keep an EMA of the weights with this decay (warm-up power 0.75); it is scored and written (0: off).")] = FINETUNE.ema,
    reset_head: Annotated[bool, typer.Option("--reset-head", help="Start a fresh classifier (automatic when the class count differs).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")] = SEED,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in the output folder.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a model of any family with its own library's layout, no constraint (classifiers on images,
    image generators on the diffusion loss, control models on trajectories), from weit's weights or a baseline
    initialisation; DDP under torchrun."""

    def go():
        from weit_cli.commands.finetune import finetune as ft

        subset = int(train_subset) if train_subset is not None and train_subset > 1 else train_subset
        quiet = as_json or int(os.environ.get("RANK", "0")) != 0
        with _StepProgress("finetune", not quiet) as progress:
            return ft(
                model, output, data=data, epochs=epochs, init=init, source=source, lr=lr, warmup=warmup,
                schedule=schedule, min_lr_ratio=min_lr_ratio, batch_size=batch_size, weight_decay=weight_decay,
                grad_clip=grad_clip, label_smoothing=label_smoothing, train_subset=subset, data_seed=data_seed,
                reset_head=reset_head, seed=seed, resume=resume, force=force, device=device, on_step=progress,
                ema=ema,
            )

    def render(r):
        if int(os.environ.get("RANK", "0")) != 0:
            return
        f, b = r["final"], r["best"] or {}
        k, _ = _metric(r, "test_{}_by_epoch", (("acc", ""), ("action_mse", ""), ("loss", "")))
        if k == "acc":
            pct = lambda v: "–" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        else:
            pct = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
        _table("finetune", [
            ("run", r["output"]),
            ("model", f"{r['description']} ({r['init']['init']} init{', new head' if r['new_head'] else ''})"),
            ("trained", f"{r['epochs']} epochs, {r['steps']} steps, {r['world_size']} process(es) on {r['device']}"),
            *([(f"test {k} by epoch", " ".join(pct(a) for a in r[f"test_{k}_by_epoch"]))] if any(a is not None for a in r[f"test_{k}_by_epoch"]) else []),
            ("last", f"val {pct(f.get(f'val_{k}'))}, test {pct(f.get(f'test_{k}'))}"),
            ("best", f"epoch {b.get('epoch', '–')}: val {pct(b.get(f'val_{k}'))}, test {pct(b.get(f'test_{k}'))}"),
            ("wrote", ", ".join(r["files"])),
        ])

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints the summary
    run(go, as_json and main_rank, render)


@app.command()
def sample(
    model: Annotated[Path, typer.Argument(help="A materialized generator: a diffusers folder (config.json, weights, scheduler_config.json), .safetensors, or hf-hub:ORG/NAME.")],
    output: OutOpt,
    cls: Annotated[Optional[int], typer.Option("--class", help="Class of every image (default: all classes in turn, one grid column each).")] = None,
    n: Annotated[int, typer.Option("-n", help="Images in the grid.")] = SAMPLE.n,
    steps: Annotated[int, typer.Option(help="DDIM sampling steps.")] = SAMPLE.steps,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1: none).")] = SAMPLE.guidance,
    seed: Annotated[int, typer.Option(help="Seed of the starting noise: the same seed gives the same PNG bytes.")] = SEED,
    batch_size: Annotated[int, typer.Option(help="Images per sampling batch (the images do not depend on it).")] = SAMPLE.batch_size,
    scale: Annotated[Optional[int], typer.Option(help="Enlarge the grid N× (nearest neighbour; default: each image ≥ 112 px, ×4 for 28 px).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Draw a seeded PNG grid of samples from a materialized image generator."""

    def go():
        from weit_cli.commands.sample import sample_grid
        from weit_cli.training.progress import heartbeat

        with heartbeat(f"sample: {n} images, {steps} DDIM steps"):
            return sample_grid(model, output, cls=cls, n=n, steps=steps, guidance=guidance, seed=seed,
                               batch_size=batch_size, device=device, force=force, scale=scale)

    def render(r):
        what = f"class {r['class']}" if r["class"] is not None else "every class in turn"
        _table("sample", [
            ("wrote", r["output"]),
            ("model", r["description"]),
            ("images", f"{r['n']} ({what}), {r['steps']} DDIM steps, guidance {r['guidance']:g}, seed {r['seed']}"),
            ("scale", f"×{r['scale']} (nearest neighbour)"),
            ("scheduler", r["scheduler"]),
            ("sha256", r["sha256"]),
        ])

    run(go, as_json, render)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="A materialized model (folder or .safetensors), any family.")],
    data: Annotated[Optional[str], typer.Option(help="Classifiers and generators: fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image folder (its test split is used).")] = None,
    env: Annotated[Optional[str], typer.Option(help="Control models: the environment to roll out in, e.g. Hopper-v5 (default: the one of its control_config.json).")] = None,
    episodes: Annotated[Optional[int], typer.Option(help=f"Control models: rollout episodes; episode i resets with seed + i (default {EVALUATE.episodes}).")] = None,
    target_return: Annotated[Optional[float], typer.Option(help="Control models: the return to condition on (default: the best return of the training data).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Control models: cut episodes after this many steps (default: the environment's time limit).")] = None,
    num_samples: Annotated[int, typer.Option(help="Generators: images sampled (balanced over the classes) and real test images compared.")] = EVALUATE.num_samples,
    steps: Annotated[int, typer.Option(help="Generators: DDIM sampling steps.")] = SAMPLE.steps,
    guidance: Annotated[float, typer.Option(help="Generators: classifier-free guidance scale (1: none).")] = SAMPLE.guidance,
    seed: Annotated[int, typer.Option(help="Seed of the data split and the samples.")] = SEED,
    batch_size: Annotated[int, typer.Option(help="Images per evaluation batch.")] = EVALUATE.batch_size,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a model: classifiers by test accuracy and loss on --data; generators by a Fréchet distance in
    weit's judge-classifier features (not Inception-FID) and the class accuracy of their samples;
    control models by rollouts in --env (returns, normalised score mean and spread, wall time)."""

    def go():
        from weit_cli.commands.evaluate import evaluate as ev
        from weit_cli.training.progress import heartbeat

        with heartbeat(f"evaluate {model}"):
            return ev(model, data=data, num_samples=num_samples, steps=steps, guidance=guidance, seed=seed,
                      batch_size=batch_size, device=device, env=env, episodes=episodes, target_return=target_return,
                      max_steps=max_steps)

    def render(r):
        if r["task"] == "control":
            _table("evaluate", [
                ("model", r["description"]),
                ("rollouts", f"{r['episodes']} episodes in {r['env_id']}, target return {r['target_return']:g}, seeds {r['seed']}..{r['seed'] + r['episodes'] - 1}"),
                ("returns", " ".join(f"{x:.1f}" for x in r["returns"])),
                ("return", f"{r['mean_return']:.1f} ± {r['std_return']:.1f}"),
                ("normalised score", f"{r['mean_score']:.1f} ± {r['std_score']:.1f} (0 random, 100 expert)"),
                ("wall", f"{r['wall_s']:.2f}s"),
            ])
            return
        rows = [("model", r["description"]), ("data", r["split"])]
        rows += [(k.replace("_", " "), f"{v:.4f}") for k, v in r.items() if k.endswith(("_acc", "_loss")) and isinstance(v, float)]
        if "fid_judge" in r:
            rows += [
                ("FID (judge)", f"{r['fid_judge']:.4f} ({r['n_fake']} samples vs {r['n_real']} real)"),
                ("class accuracy", f"{100 * r['class_accuracy']:.2f}% of samples judged their class"),
                ("judge sha256", f"{r['judge_sha256']} (test accuracy {100 * r['judge_test_accuracy']:.1f}%)"),
                *_judge_reference_rows(r.get("judge_references")),
                ("note", r["note"]),
            ]
        _table("evaluate", rows)

    run(go, as_json, render)


def _judge_reference_rows(refs: dict | None) -> list[tuple[str, str]]:
    """`evaluate`'s reading aid: the judge's FID and class accuracy of real images and of junk."""
    if not refs:
        return []
    return [(f"  {label}", f"FID {refs[k]['fid_judge']:.2f}, class accuracy {100 * refs[k]['class_accuracy']:.1f}%")
            for k, label in (("real_train", "real images (floor)"), ("blank", "blank images"), ("noise", "Gaussian noise"))]


@app.command("list-archs")
def list_archs(as_json: JsonOpt = False) -> None:
    """List the architecture families weit can template."""

    def go():
        from weit_cli.arch._registry import list_families

        return {"families": list_families()}

    run(go, as_json, lambda r: print("\n".join(r["families"])))


def _print_version(value: bool) -> None:
    """Eager: runs while the options are parsed, before click asks for a subcommand (a plain option
    of the root callback only runs when one follows, so `weit --version` was 'Missing command')."""
    if value:
        from weit_cli import __version__

        print(f"weit {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


if __name__ == "__main__":
    app()
