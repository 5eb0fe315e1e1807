"""Writing a composed model: dense tensors streamed one at a time from a sized bundle into a bare
.safetensors file or a timm local-dir folder (config.json + model.safetensors)."""

from __future__ import annotations

import math

import json
from pathlib import Path
from typing import Any
import torch
import weit_cli.core.kron as kron
from weit_cli import __version__
from weit_cli.core.bundle import Bundle, state_problems
from weit_cli.errors import InputError
from weit_cli.io.files import atomic_dir, atomic_file, one_thread, write_safetensors


def write_model(sized: Bundle, out: Path, dtype: torch.dtype, provenance: dict[str, Any], force: bool) -> list[str]:
    """Stream the composed dense weights to `out` (bare .safetensors, or a timm local-dir folder)."""
    cfg = sized.adapter.timm_config(sized.arch)
    meta = {
        "format": "pt",
        "producer": f"weit {__version__}",
        "family": sized.adapter.family,
        "model_args": json.dumps(cfg["model_args"], sort_keys=True),
        "pretrained_cfg": json.dumps(cfg["pretrained_cfg"], sort_keys=True),  # input size (CNNs are size-agnostic)
        "architecture": cfg["architecture"],
        "provenance": json.dumps(provenance, sort_keys=True),
    }

    def dtype_of(k: str) -> torch.dtype:  # counters (BatchNorm's num_batches_tracked) keep their integer type
        return sized.small[k].dtype if k in sized.small and not sized.small[k].is_floating_point() else dtype

    dense = _Streamer(sized)
    spec_list = [(k, sized.dense_shape(k), dtype_of(k), (lambda k=k: dense(k, dtype_of(k)))) for k in sized.dense_keys()]
    # Last line of defence, for every family: what is about to be written must be exactly the timm
    # model of the target size, or the user gets a file that timm refuses (or, worse, loads partly).
    problems = state_problems(sized.adapter, sized.arch, {k: shape for k, shape, *_ in spec_list})
    if problems:
        raise InputError(
            f"the model to write does not match {sized.adapter.describe(sized.arch)}: {'; '.join(problems)}",
            "nothing was written; the bundle or scalers file is damaged (check it with 'weit inspect')",
        )
    if out.suffix == ".safetensors":
        with atomic_file(out, replace=force) as tmp, one_thread():
            write_safetensors(tmp, spec_list, meta)
        return [str(out)]
    with atomic_dir(out, force) as tmp, one_thread():
        write_safetensors(tmp / "model.safetensors", spec_list, meta)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return [str(out / "model.safetensors"), str(out / "config.json")]


class _Streamer:
    """Composes one dense tensor at a time into reused buffers. write_safetensors writes each tensor
    before it asks for the next, so one output buffer suffices; composing into fresh memory instead
    costs as much in page faults as the matmuls, and this keeps the peak at the largest weight."""

    def __init__(self, b: Bundle):
        self.b = b
        self.size = max((math.prod(b.dense_shape(k)) for k in b.scalers), default=0)
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _buf(self, role: str, dtype: torch.dtype) -> torch.Tensor:
        if (role, dtype) not in self.bufs:
            self.bufs[role, dtype] = torch.empty(self.size, dtype=dtype)
        return self.bufs[role, dtype]

    @torch.no_grad()
    def __call__(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        b = self.b
        if key in b.small:
            return b.small[key].to(dtype)
        s, t = b.scalers[key], b.template_of(key)
        ct = torch.promote_types(s.dtype, t.dtype)
        out = self._buf("out", dtype)[: math.prod(b.dense_shape(key))]
        return kron.compose(s.to(ct), t.to(ct), out=out, work=self._buf("work", ct))


