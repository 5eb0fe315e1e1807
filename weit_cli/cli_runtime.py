"""How a `weit` command runs: a library call mapped to one line and an exit code on failure, SIGTERM
taken as Ctrl-C, click's usage errors as JSON under --json, plain progress lines where stderr is no
terminal, and which torchrun process this is. Nothing here imports torch."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import typer


class WeitApp(typer.Typer):
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


def rank() -> int:
    """This process's rank under torchrun (0 alone): only rank 0 prints summaries and progress."""
    return int(os.environ.get("RANK", "0"))


def err_console():
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
    plain_lines()
    try:
        result = fn()
    except WeitError as e:
        fail(e.message, e.hint, e.exit_code, as_json)
    except KeyboardInterrupt:
        fail("interrupted", "nothing was written", EXIT_INTERRUPTED, as_json)
    except Exception as e:  # a bug in weit, not the user's fault: one line, traceback on request
        if os.environ.get("WEIT_DEBUG"):
            raise
        msg = f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        fail(msg, "re-run with WEIT_DEBUG=1 for a traceback and report it", 1, as_json)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        render(result)


def plain_lines() -> None:
    """Where stderr is no terminal (a CI log, `2> file`), long phases write plain progress lines there
    (`weit: …`), at most one every WEIT_PROGRESS_INTERVAL seconds (default 10), on the main process only."""
    from weit_cli.training import progress

    if sys.stderr.isatty() or rank() != 0:
        progress.plain_lines(None)
        return
    try:
        every = float(os.environ.get("WEIT_PROGRESS_INTERVAL", "10"))
    except ValueError:
        every = 10.0
    progress.plain_lines(lambda line: print(f"weit: {line}", file=sys.stderr, flush=True), every if every > 0 else 10.0)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def fail(message: str, hint: str, code: int, as_json: bool) -> None:
    from weit_cli.errors import one_line

    message, hint = one_line(message), one_line(hint)  # internal errors too
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "hint": hint, "exit_code": code}) + "\n")
    else:
        from rich.markup import escape

        line = f"[bold red]error:[/] {escape(message)}"
        if hint:
            line += f" [dim]— {escape(hint)}[/]"
        err_console().print(line, soft_wrap=True)
    raise typer.Exit(code)
