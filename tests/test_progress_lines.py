"""Plain progress lines where stderr is no terminal (CI logs): long phases say what they do at a steady
interval instead of nothing; as a library weit stays silent."""

from __future__ import annotations

import json
import time

import pytest
from conftest import weit

from weit_cli.training import progress


@pytest.fixture
def lines():
    got: list[str] = []
    progress.plain_lines(got.append, interval=0.1)
    yield got
    progress.plain_lines(None)


def test_a_heartbeat_beats_while_its_phase_runs_and_is_silent_for_a_short_one(lines):
    with progress.heartbeat("quick"):
        pass
    assert lines == [], "a phase shorter than the interval (a refused command) writes nothing"
    with progress.heartbeat("Hopper-v5: generating behaviour data"):
        time.sleep(0.55)
    beats = lines
    assert 3 <= len(beats) <= 6 and all(b.startswith("Hopper-v5: generating behaviour data: ") and b.endswith(" s") for b in beats)
    n = len(lines)
    time.sleep(0.3)
    assert len(lines) == n, "the heartbeat stops with its phase"


def test_silent_as_a_library(capfd):
    progress.plain_lines(None)
    with progress.heartbeat("quiet"):
        progress.say("nobody hears this")
    out = capfd.readouterr()
    assert out.out == out.err == ""


def test_a_training_command_writes_step_lines_to_a_log(tmp_path, monkeypatch):
    """CliRunner's stderr is no terminal, as in CI: pretrain writes `weit: pretrain: step k/N …` lines
    at the interval, and the last step always; stdout stays one JSON object."""
    from test_teacher import TINY

    monkeypatch.setenv("WEIT_PROGRESS_INTERVAL", "0.1")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    r = weit("pretrain", recipe, "-o", tmp_path / "b.safetensors", "--set", "train.steps=6", "--json")
    assert json.loads(r.stdout)["steps"] == 6
    steps = [ln for ln in r.stderr.splitlines() if ln.startswith("weit: pretrain: step ")]
    assert steps and steps[-1].startswith("weit: pretrain: step 6/6, loss ") and "it/s" in steps[-1], r.stderr


def test_progress_lines_are_off_on_other_ranks_and_on_terminals(monkeypatch):
    import io
    import sys

    from weit_cli.cli_runtime import plain_lines as _plain_lines

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    try:
        monkeypatch.setenv("RANK", "1")
        _plain_lines()
        progress.say("from rank 1")
        monkeypatch.setenv("RANK", "0")
        _plain_lines()
        progress.say("from rank 0")
        monkeypatch.setattr(log, "isatty", lambda: True)  # a terminal gets the progress bar instead
        _plain_lines()
        progress.say("on a terminal")
    finally:
        progress.plain_lines(None)
    assert log.getvalue() == "weit: from rank 0\n"
