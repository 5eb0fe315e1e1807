"""Writing a composed model: dense tensors streamed one at a time from a sized bundle (`write_model`,
the streaming core) into the files an `Exporter` lays out (`io/exporters.py`: the family's own
layout, or a bare .safetensors file for an output ending in .safetensors); another layout is another
`Exporter` subclass, with no change to the streaming core."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import weit_cli.core.kron as kron
from weit_cli import __version__
from weit_cli.core.bundle import COMPANIONS, Bundle
from weit_cli.core.checks import state_problems
from weit_cli.errors import InputError
from weit_cli.io.exporters import Exporter, SafetensorsFile
from weit_cli.io.files import write_safetensors

if TYPE_CHECKING:
    import torch


def exporter_for(adapter, out: Path) -> Exporter:
    """A bare file for an output ending in .safetensors, otherwise the family's own layout."""
    return SafetensorsFile(adapter.exporter) if Path(out).suffix == ".safetensors" else adapter.exporter


def write_model(sized: Bundle, out: Path, dtype: torch.dtype, provenance: dict[str, Any], force: bool) -> list[str]:
    """Stream the composed dense weights to `out` in the layout `exporter_for` picks."""
    import torch

    exporter = exporter_for(sized.adapter, out)
    files = sized.extra.get(COMPANIONS) or {}
    meta = {
        "format": "pt",
        "producer": f"weit {__version__}",
        "family": sized.adapter.family,
        **exporter.metadata(sized.arch),
        "provenance": json.dumps(provenance, sort_keys=True),
        **({COMPANIONS: json.dumps(files, sort_keys=True)} if files else {}),
    }

    def dtype_of(k: str) -> torch.dtype:  # counters (BatchNorm's num_batches_tracked) keep their integer type
        return sized.small[k].dtype if k in sized.small and not sized.small[k].is_floating_point() else dtype

    dense = _Streamer(sized)
    spec_list = [(k, sized.dense_shape(k), dtype_of(k), (lambda k=k: dense(k, dtype_of(k)))) for k in sized.dense_keys()]
    # Last line of defence, for every family: what is about to be written must be exactly the model
    # of the target size, or the user gets a file its library refuses (or, worse, loads partly).
    problems = state_problems(sized.adapter, sized.arch, {k: shape for k, shape, *_ in spec_list})
    if problems:
        raise InputError(
            f"the model to write does not match {sized.adapter.describe(sized.arch)}: {'; '.join(problems)}",
            "nothing was written; the bundle or scalers file is damaged (check it with 'weit inspect')",
        )
    # `files` only when there are any: an exporter written before companion files keeps working
    companions = {"files": files} if files else {}
    return exporter.write(Path(out), sized.arch, lambda path: write_safetensors(path, spec_list, meta), force, **companions)


class _Streamer:
    """Composes one dense tensor at a time into reused buffers. write_safetensors writes each tensor
    before it asks for the next, so one output buffer suffices; composing into fresh memory instead
    costs as much in page faults as the matmuls, and this keeps the peak at the largest weight."""

    def __init__(self, b: Bundle):
        self.b = b
        self.size = max((math.prod(b.dense_shape(k)) for k in b.scalers), default=0)
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _buf(self, role: str, dtype: torch.dtype) -> torch.Tensor:
        import torch

        if (role, dtype) not in self.bufs:
            self.bufs[role, dtype] = torch.empty(self.size, dtype=dtype)
        return self.bufs[role, dtype]

    def __call__(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        import torch

        b = self.b
        with torch.no_grad():
            if key in b.small:
                return b.small[key].to(dtype)
            s, t = b.scalers[key], b.template_of(key)
            ct = torch.promote_types(s.dtype, t.dtype)
            out = self._buf("out", dtype)[: math.prod(b.dense_shape(key))]
            return kron.compose(s.to(ct), t.to(ct), out=out, work=self._buf("work", ct))
