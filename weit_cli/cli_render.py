"""What `weit` shows a person: one table per command's result, and the progress bar (or plain lines)
of a training phase. A result names its task's metric (`metric_info`, tasks/metric.py) and keys the
scores by role (`val_metric`, `test_metric_by_epoch`), so no renderer knows a task or its metric.
Nothing here imports torch: rich is imported when something is shown."""

from __future__ import annotations

import json
import sys
from typing import Any

from weit_cli.cli_runtime import err_console
from weit_cli.tasks.metric import Metric


def table(title: str, rows: list[tuple[str, Any]]) -> None:
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


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def metric(r: dict[str, Any]) -> Metric:
    """The metric a result was scored by (its `metric_info`)."""
    return Metric.from_dict(r["metric_info"])


# ------------------------------------------------------------------------------------------ commands
def extract_templates(r: dict[str, Any]) -> None:
    rows = [("wrote", r["output"]), ("templates", r["templates"])]
    rows += [(f"rel. error {t}", f"{e:.3e}") for t, e in r["relative_error"].items()]
    d = r.get("distillation")
    if d:
        m = metric(d)
        rows += [(f"rel. error {t} (distilled)", f"{e:.3e}") for t, e in d["relative_error_after"].items()]
        rows.append((f"teacher {m.label}", f"{d['teacher_metric']:.4f} on {d['eval_split']}"))
        rows.append((f"student {m.label}", f"{d['student_metric_before']:.4f} (SVD) → {d['student_metric_after']:.4f} ({d['steps']} steps)"))
    rows += [(f"params {k}", human(v)) for k, v in r["params"].items()]
    table("extract-templates", rows)
    _warnings(r)


def _warnings(r: dict[str, Any]) -> None:
    for w in r.get("warnings", []):
        err_console().print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


def materialize(r: dict[str, Any]) -> None:
    rows = [
        ("wrote", ", ".join(r["files"])),
        ("model", r.get("description", "")),
        ("params", human(r["params"])),
        ("load with", r["export"]["load"]),
    ]
    if r.get("bn_statistics"):
        rows.append(("BN statistics", r["bn_statistics"]))
    table("materialize", rows)
    _warnings(r)


def pretrain(r: dict[str, Any]) -> None:
    v, m = r.get("val") or {}, metric(r)
    rows = [("wrote", f"{r['output']}, {r['recipe']}"), ("steps", str(r["steps"]))]
    if r.get("resumed_from"):
        rows.append(("resumed from step", str(r["resumed_from"])))
    rows.append(("nested sizes", f"depths {r['nested']['depths']}, widths {r['nested']['widths']}"))
    if r.get("teacher"):
        rows.append(("teacher", f"{r['teacher']['source']} (weight {r['teacher']['weight']:g})"))
    rows += [(f"val {m.row_label} {name}", m.format(v[f"val_metric_{name}"])) for name in ("largest", "smallest") if f"val_metric_{name}" in v]
    rows += [(f"params {k}", human(n)) for k, n in r["params"].items()]
    rows += [("device", f"{r['device']} × {r['world_size']}"), ("wall", f"{r['wall_s']:.1f}s")]
    table("pretrain", rows)


def inspect(r: dict[str, Any], full: bool) -> None:
    rows = [(k, r[k]) for k in ("kind", "description") if r.get(k)]
    if r.get("templates"):
        rows += [(f"templates {t}", "×".join(map(str, s))) for t, s in r["templates"].items()]
    if r.get("nested"):
        rows.append(("nested sizes", r["nested"]))
    rows += [(f"params {k}", human(v)) for k, v in r.get("params", {}).items()]
    for k in ("weit_format", "weit_version", "kron_order", "sha256", "bundle_sha256", "producer", "check"):
        if r.get(k):
            rows.append((k, r[k]))
    for name, content in (r.get("companion_files") or {}).items():
        said = ", ".join(f"{k} {content[k]}" for k in ("env_id", "context", "data") if content.get(k) not in (None, ""))
        rows.append(("written beside models", f"{name}{f' ({said})' if said else ''}"))
    shown = {(k.replace("_", " "), str(v)) for k, v in rows}  # a scalers file's bundle_sha256 is in both
    rows += [(k, v) for k, v in provenance_rows(r.get("provenance") or {}, full) if (k.replace("_", " "), v) not in shown]
    table(r["path"], rows)


def provenance_rows(prov: dict[str, Any], full: bool) -> list[tuple[str, str]]:
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


def fit_scalers(r: dict[str, Any]) -> None:
    m = metric(r)
    table("fit-scalers", [
        ("wrote", r["output"]),
        *([("resumed from step", str(r["resumed_from"]))] if r.get("resumed_from") else []),
        ("model", r["description"]),
        ("trained", f"{', '.join(r['trained'])} ({human(r['params'])} values), {r['steps']} steps in {r['fit_seconds']:.1f}s"),
        ("loss", f"{r['loss_first']:.4f} → {r['loss_last']:.4f}"),
        (f"val {m.label}", f"{r['val_metric_before']:.4f} → {r['val_metric_after']:.4f} ({r['val_count']} {r['val_examples']})"),
        *([("BN statistics", r["bn_statistics"])] if r.get("bn_statistics") else []),
        ("bundle sha256", r["bundle_sha256"]),
        ("next", materialize_hint(r)),
    ])
    _warnings(r)


def materialize_hint(r: dict[str, Any]) -> str:
    return (
        f"weit materialize BUNDLE --scalers {r['output']} {' '.join(r['size_options'])} "
        + (f"--num-classes {r['architecture']['num_classes']} " if "num_classes" in r["architecture"] else "")
        + "-o MODEL"
    )


def finetune(r: dict[str, Any]) -> None:
    f, b, m = r["final"], r["best"] or {}, metric(r)

    def score(rec: dict[str, Any], split: str) -> str:  # a run resumed from before the role keys has only the legacy ones
        return m.format(rec.get(f"{split}_metric", rec.get(f"{split}_{m.name}")))

    by_epoch = r["test_metric_by_epoch"]
    table("finetune", [
        ("run", r["output"]),
        ("model", f"{r['description']} ({r['init']['init']} init{', new head' if r['new_head'] else ''})"),
        ("trained", f"{r['epochs']} epochs, {r['steps']} steps, {r['world_size']} process(es) on {r['device']}"),
        *([(f"test {m.name} by epoch", " ".join(m.format(a) for a in by_epoch))] if any(a is not None for a in by_epoch) else []),
        ("last", f"val {score(f, 'val')}, test {score(f, 'test')}"),
        ("best", f"epoch {b.get('epoch', '–')}: val {score(b, 'val')}, test {score(b, 'test')}"),
        ("wrote", ", ".join(r["files"])),
    ])


def sample(r: dict[str, Any]) -> None:
    what = f"class {r['class']}" if r["class"] is not None else "every class in turn"
    table("sample", [
        ("wrote", r["output"]),
        ("model", r["description"]),
        ("images", f"{r['n']} ({what}), {r['steps']} DDIM steps, guidance {r['guidance']:g}, seed {r['seed']}"),
        ("scale", f"×{r['scale']} (nearest neighbour)"),
        ("scheduler", r["scheduler"]),
        ("sha256", r["sha256"]),
    ])


def evaluate(r: dict[str, Any]) -> None:
    if r.get("scored_by") == "rollouts":
        table("evaluate", [
            ("model", r["description"]),
            ("rollouts", f"{r['episodes']} episodes in {r['env_id']}, target return {r['target_return']:g}, seeds {r['seed']}..{r['seed'] + r['episodes'] - 1}"),
            ("returns", " ".join(f"{x:.1f}" for x in r["returns"])),
            ("return", f"{r['mean_return']:.1f} ± {r['std_return']:.1f}"),
            ("normalised score", f"{r['mean_score']:.1f} ± {r['std_score']:.1f} (0 random, 100 expert)"),
            ("wall", f"{r['wall_s']:.2f}s"),
        ])
        return
    m, split = metric(r), r["split"].partition(" ")[0]
    rows = [("model", r["description"]), ("data", r["split"]), (f"{split} {m.name}", f"{r[f'{split}_metric']:.4f}")]
    if f"{split}_{m.name}" != f"{split}_loss":  # the mean loss, unless the metric is that loss (a generator's)
        rows.append((f"{split} loss", f"{r[f'{split}_loss']:.4f}"))
    if "fid_judge" in r:
        rows += [
            ("FID (judge)", f"{r['fid_judge']:.4f} ({r['n_fake']} samples vs {r['n_real']} real)"),
            ("class accuracy", f"{100 * r['class_accuracy']:.2f}% of samples judged their class"),
            ("judge sha256", f"{r['judge_sha256']} (test accuracy {100 * r['judge_test_accuracy']:.1f}%)"),
            *_judge_reference_rows(r.get("judge_references")),
            ("note", r["note"]),
        ]
    table("evaluate", rows)


def _judge_reference_rows(refs: dict | None) -> list[tuple[str, str]]:
    """`evaluate`'s reading aid: the judge's FID and class accuracy of real images and of junk."""
    if not refs:
        return []
    return [(f"  {label}", f"FID {refs[k]['fid_judge']:.2f}, class accuracy {100 * refs[k]['class_accuracy']:.1f}%")
            for k, label in (("real_train", "real images (floor)"), ("blank", "blank images"), ("noise", "Gaussian noise"))]


# ------------------------------------------------------------------------------------------ progress
class StepProgress:
    """A rich progress bar on stderr fed by a library's StepInfo callback (off for --json); where stderr
    is no terminal, a plain line at most every WEIT_PROGRESS_INTERVAL seconds instead
    (`cli_runtime.plain_lines`)."""

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
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err_console(), transient=True,
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
