"""The layout checks every reader and writer shares: a bundle's tensors (`tensor_problems`) and a
dense state (`state_problems`, `check_state`) against the family's own layout of the architecture
(`reference_shapes`), every problem listed at once."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from weit_cli.errors import InputError, WeitError

if TYPE_CHECKING:
    from torch import Tensor

    from weit_cli.arch.base import Adapter
    from weit_cli.core.bundle import Bundle


def check_consistent(b: Bundle, source: str, record: dict[str, Any] | None = None) -> None:
    """A bundle's tensors against its own metadata: every templated and small key of its declared
    architecture present with the right shape, nothing extra, and the templates as the `templates`
    record says. A hand-edited or damaged file fails here, not as a checkpoint its library refuses."""
    problems = tensor_problems(b, record)
    if problems:
        raise InputError(
            f"{source} does not match its own architecture ({b.adapter.describe(b.arch)}): {'; '.join(problems)}",
            "the file is damaged or was edited; write it again with the command that made it",
        )


def tensor_problems(b: Bundle, record: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with `b`'s tensors for `b.arch` (empty: nothing), named as in the file
    (`templates.qkv`, `scalers.blocks.0.attn.qkv.weight`, `small.norm.weight`). `record` is the
    file's `templates` metadata ({type: {count, p, q, kernel}}), checked when given."""
    ad, arch = b.adapter, b.arch
    missing: list[str] = []
    unexpected: list[str] = []
    shapes: list[str] = []
    other: list[str] = []
    record = record if isinstance(record, dict) and all(isinstance(r, dict) for r in record.values()) else None
    # Templates: the family's types at the file's template size, with the recorded counts.
    sizes = {r.get("p") for r in record.values()} if record else {int(t.shape[1]) for t in b.templates.values() if t.dim() >= 3}
    try:
        types = ad.template_types(arch, sizes.pop() if len(sizes) == 1 else None)
    except WeitError as e:
        return [e.message]
    for t, v in sorted(b.templates.items()):
        want = types.get(t)
        if want is None or (record is not None and t not in record):
            unexpected.append(f"templates.{t}")
            continue
        n = record[t].get("count") if record is not None else (v.shape[0] if v.dim() else 0)
        expect = (n, want.p, want.q, *want.kernel)
        if tuple(v.shape) != expect:
            shapes.append(f"templates.{t} {tuple(v.shape)}≠{expect}")
        elif not v.is_floating_point():
            other.append(f"templates.{t} is not floating point")
    if record is not None:
        missing += [f"templates.{t}" for t in record if t not in b.templates]
    # Dense keys: those of the module of `arch`; templated ones as scalers, the rest as small.
    ref = reference_shapes(ad, arch)
    for k in sorted(ref, key=natural):
        t = ad.template_type_of(k, arch)
        store, name = (b.scalers, f"scalers.{k}") if t is not None else (b.small, f"small.{k}")
        if k not in store:
            missing.append(name)
        elif t is None:
            if tuple(store[k].shape) != ref[k]:
                shapes.append(f"{name} {tuple(store[k].shape)}≠{ref[k]}")
        elif t not in b.templates:
            missing.append(f"templates.{t}")
        else:
            s, tmpl = store[k], b.templates[t]
            if s.dim() != 3 or tmpl.dim() < 3 or s.shape[0] != tmpl.shape[0]:
                shapes.append(f"{name} {tuple(s.shape)} (templates.{t} {tuple(tmpl.shape)})")
            elif b.dense_shape(k) != ref[k]:
                shapes.append(f"{name} {tuple(s.shape)} (dense {b.dense_shape(k)}≠{ref[k]})")
            elif not s.is_floating_point():
                other.append(f"{name} is not floating point")
    unexpected += [f"scalers.{k}" for k in sorted(b.scalers, key=natural) if k not in ref or ad.template_type_of(k, arch) is None]
    unexpected += [f"small.{k}" for k in sorted(b.small, key=natural) if k not in ref or ad.template_type_of(k, arch) is not None]
    return _listed(list(dict.fromkeys(missing)), unexpected, shapes) + other


def reference_shapes(adapter: Adapter, arch: Any) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the module of `arch`, the truth every check compares with: the family's
    own layout (`Adapter.state_shapes`), so no module is built and no model library imported
    (building an 86M-parameter model on the meta device cost ~3 s of a 7 s materialize, mostly importing its library)."""
    return dict(adapter.state_shapes(arch))


def check_state(adapter: Adapter, arch: Any, state: dict[str, Tensor]) -> None:
    """Strict: list every missing, unexpected or mis-shaped key at once."""
    parts = state_problems(adapter, arch, {k: tuple(v.shape) for k, v in state.items()})
    if parts:
        raise InputError(
            f"checkpoint does not match {adapter.describe(arch)}: {'; '.join(parts)}",
            f"pass {'/'.join(adapter.hints.guessed)} if they were guessed wrong, or check the file" if adapter.hints.guessed else "check the file",
        )


def state_problems(adapter: Adapter, arch: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every missing, unexpected and mis-shaped key of a dense state (key → shape) at once."""
    ref = reference_shapes(adapter, arch)
    missing = sorted(set(ref) - set(shapes), key=natural)
    unexpected = sorted(set(shapes) - set(ref), key=natural)
    wrong = [k for k in ref if k in shapes and tuple(ref[k]) != tuple(shapes[k])]
    return _listed(missing, unexpected, [f"{k} {tuple(shapes[k])}≠{tuple(ref[k])}" for k in wrong])


def _listed(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> list[str]:
    """The non-empty groups of a layout check, each as a few of its keys."""
    groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
    return [f"{name} {few(keys)}" for name, keys in groups if keys]


def few(xs: list[str], n: int = 4) -> str:
    return ", ".join(xs[:n]) + (f" (+{len(xs) - n} more)" if len(xs) > n else "")


def natural(k: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", k)]
