"""One resume guard: a resumed run must be the run that wrote what it continues from.

Each command records its run's identity when it starts — fit-scalers the sha256 of its options, data,
bundle and target (`fingerprint`), pretrain its resolved recipe's and its teacher's sha256, finetune
its resolved options (args.json) — and `--resume` compares the recorded values with the current ones
key by key (`differing`). The keys that differ (and the recorded values) go to the command's
`refuse`, which words the error:
each command keeps its own message. `same_run` makes the comparison a `Loop.resume` check, for
identities kept in the checkpoint's state."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from weit_cli.errors import InputError


def fingerprint(identity: Mapping[str, Any]) -> str:
    """The sha256 of `identity` as key-sorted JSON: equal for equal values, whatever the key order."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def differing(recorded: Mapping[str, Any], now: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """The `keys` (in their order) whose recorded value is not the current one; a missing key is None."""
    return [k for k in keys if recorded.get(k) != now.get(k)]


Refuse = Callable[[list[str], Mapping[str, Any]], InputError]  # (the differing keys, what was recorded) → the error


def check_same_run(recorded: Mapping[str, Any], now: Mapping[str, Any], keys: Iterable[str], refuse: Refuse) -> None:
    """Raise `refuse(the differing keys, recorded)` unless the run recorded is the run now."""
    diff = differing(recorded, now, keys)
    if diff:
        raise refuse(diff, recorded)


def same_run(now: Mapping[str, Any], refuse: Refuse) -> Callable[[dict[str, Any]], None]:
    """A `Loop.resume(check)` check: the checkpoint's state must hold `now`'s values (the state the
    loop wrote must include them: `Loop(state=lambda: {**now, …})`)."""
    return lambda state: check_same_run(state, now, list(now), refuse)
