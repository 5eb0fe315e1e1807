"""Task name → Task class. A family says which task trains its models (`Adapter.task`); every
command gets its task from there (`task_for`), so no command names a task or a family."""

from __future__ import annotations

from typing import Any

from weit_cli.errors import WeitError


def _tasks() -> dict[str, Any]:
    from weit_cli.tasks.classification import Classification
    from weit_cli.tasks.control import Control
    from weit_cli.tasks.generation import Generation

    return {t.name: t for t in (Classification, Generation, Control)}


def task_class(adapter):
    """The Task class of `adapter`'s models, unbuilt: what a command asks of it (its metric, whether
    it samples or rolls out) needs no options."""
    tasks = _tasks()
    if adapter.task not in tasks:
        raise WeitError(f"no task '{adapter.task}' for a {adapter.family} model", f"known tasks: {', '.join(sorted(tasks))}")
    return tasks[adapter.task]


def task_for(adapter, **options):
    """The task that trains `adapter`'s models, built from the commands' task options
    (`label_smoothing`); an option the task does not have is refused in one line."""
    return task_class(adapter).from_options(**options)
