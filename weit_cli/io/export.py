"""Writing a composed model: dense tensors streamed one at a time from a sized bundle (`write_model`,
the streaming core) into the files an `Exporter` lays out.

A family names its exporter (`Adapter.exporter`): the folder another library loads — timm's local-dir
(`TimmLocalDir`), diffusers' model folder (`DiffusersFolder`) or a Hugging Face transformers folder
as `save_pretrained` writes it (`TransformersFolder`); another layout is another `Exporter`
subclass, with no change to the streaming core. An output ending in .safetensors gets the bare
weights file instead (`SafetensorsFile`), its header holding the family exporter's metadata."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import weit_cli.core.kron as kron
from weit_cli import __version__
from weit_cli.core.bundle import COMPANIONS, Bundle
from weit_cli.core.checks import state_problems
from weit_cli.errors import InputError
from weit_cli.io.files import atomic_dir, atomic_file, one_thread, write_safetensors

if TYPE_CHECKING:
    import torch

#: Streams the composed dense weights into one safetensors file at the given path.
WriteWeights = Callable[[Path], None]
#: JSON files beside the weights: file name → content (core/bundle.COMPANIONS).
Companions = dict[str, dict[str, Any]]


class Exporter(ABC):
    """A file layout a composed model is written in."""

    format: ClassVar[str]

    @abstractmethod
    def metadata(self, arch) -> dict[str, str]:
        """Header metadata of the weights file that lets a loader rebuild the module (all that a
        bare .safetensors carries)."""

    @abstractmethod
    def write(self, out: Path, arch, weights: WriteWeights, force: bool, files: Companions | None = None) -> list[str]:
        """Write `out` atomically (nothing is left on failure); returns the files written. `files`:
        other JSON files of the model (the bundle's companion files), written into the same folder."""

    @abstractmethod
    def summary(self, arch, out: Path) -> dict[str, Any]:
        """What a command reports about the written model: `format`, `load` (how to load it) and
        the fields a loader needs."""

    def bare_summary(self, arch, out: Path) -> dict[str, Any]:
        """`summary` of a bare .safetensors file holding this exporter's metadata."""
        return {"format": SafetensorsFile.format, "load": f"safetensors.torch.load_file('{out}')"}


class TimmLocalDir(Exporter):
    """timm's local-dir folder: config.json (architecture, model_args, pretrained_cfg) and
    model.safetensors, for `timm.create_model('local-dir:…', pretrained=True)`. `config(arch)` is
    the family's config.json."""

    format = "timm"

    def __init__(self, config: Callable[[Any], dict[str, Any]]):
        self.config = config

    def metadata(self, arch) -> dict[str, str]:
        cfg = self.config(arch)
        return {
            "model_args": json.dumps(cfg["model_args"], sort_keys=True),
            "pretrained_cfg": json.dumps(cfg["pretrained_cfg"], sort_keys=True),  # input size (CNNs are size-agnostic)
            "architecture": cfg["architecture"],
        }

    def write(self, out: Path, arch, weights: WriteWeights, force: bool, files: Companions | None = None) -> list[str]:
        return _write_folder(out, self.config(arch), weights, force, files)

    def summary(self, arch, out: Path) -> dict[str, Any]:
        cfg = self.config(arch)
        load = f"timm.create_model('local-dir:{out}', pretrained=True)"
        return {"format": self.format, "architecture": cfg["architecture"], "model_args": cfg["model_args"], "load": load}

    def bare_summary(self, arch, out: Path) -> dict[str, Any]:
        cfg = self.config(arch)
        args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
        load = f"timm.create_model('{cfg['architecture']}', checkpoint_path='{out}', {args})"
        return {"format": SafetensorsFile.format, "architecture": cfg["architecture"], "model_args": cfg["model_args"], "load": load}


class DiffusersFolder(Exporter):
    """diffusers' model folder: config.json (diffusers' own layout: `_class_name`,
    `_diffusers_version` and the model's init arguments, as `save_config` writes it) and
    diffusion_pytorch_model.safetensors, for `<class>.from_pretrained(folder)`. `config(arch)` is the
    family's config without `_diffusers_version`, which is the installed diffusers' (read from its
    package metadata: importing diffusers takes seconds).

    `companions(arch)` names other JSON files written into the same folder, atomically with the model:
    the hook for the generation task's `scheduler_config.json`, which diffusers' schedulers read from
    the same folder (`DDPMScheduler.from_pretrained(folder)`)."""

    format = "diffusers"
    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(
        self, config: Callable[[Any], dict[str, Any]], companions: Callable[[Any], dict[str, dict[str, Any]]] | None = None
    ):
        self._config = config
        self.companions = companions or (lambda arch: {})

    def config(self, arch) -> dict[str, Any]:
        from importlib.metadata import version

        return {**self._config(arch), "_diffusers_version": version("diffusers")}

    def metadata(self, arch) -> dict[str, str]:
        return {"config": json.dumps(self.config(arch), sort_keys=True)}

    def write(self, out: Path, arch, weights: WriteWeights, force: bool, files: Companions | None = None) -> list[str]:
        files = {"config.json": self.config(arch), **self.companions(arch), **(files or {})}
        with atomic_dir(out, force) as tmp, one_thread():
            weights(tmp / self.weights_name)
            for name, content in files.items():
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        return [str(out / self.weights_name), *(str(out / name) for name in files)]

    def summary(self, arch, out: Path) -> dict[str, Any]:
        cfg = self.config(arch)
        load = f"diffusers.{cfg['_class_name']}.from_pretrained('{out}')"
        return {"format": self.format, "class_name": cfg["_class_name"], "config": cfg, "load": load}

    def bare_summary(self, arch, out: Path) -> dict[str, Any]:
        cfg = self.config(arch)
        load = (
            f"m = diffusers.{cfg['_class_name']}.from_config(CONFIG); "
            f"m.load_state_dict(safetensors.torch.load_file('{out}')), CONFIG being the file's 'config' metadata"
        )
        return {"format": SafetensorsFile.format, "class_name": cfg["_class_name"], "config": cfg, "load": load}


class TransformersFolder(Exporter):
    """A Hugging Face transformers folder, as `save_pretrained` lays it out: config.json (the config
    class's fields with `model_type` and `architectures`) and model.safetensors, for
    `transformers.<architectures[0]>.from_pretrained(folder)`. `config(arch)` is the family's
    config.json; `config_class` names its transformers config class (to rebuild a bare file)."""

    format = "transformers"

    def __init__(self, config: Callable[[Any], dict[str, Any]], config_class: str):
        self.config = config
        self.config_class = config_class

    def metadata(self, arch) -> dict[str, str]:
        # The whole config.json: a bare file then holds all that from_pretrained would read.
        return {"config": json.dumps(self.config(arch), sort_keys=True)}

    def write(self, out: Path, arch, weights: WriteWeights, force: bool, files: Companions | None = None) -> list[str]:
        return _write_folder(out, self.config(arch), weights, force, files)

    def summary(self, arch, out: Path) -> dict[str, Any]:
        cfg = self.config(arch)
        cls = cfg["architectures"][0]
        return {"format": self.format, "class": cls, "config": cfg, "load": f"transformers.{cls}.from_pretrained('{out}')"}

    def bare_summary(self, arch, out: Path) -> dict[str, Any]:
        cfg = self.config(arch)
        cls = cfg["architectures"][0]
        config = f"json.loads(safetensors.safe_open('{out}', 'pt').metadata()['config'])"
        load = (
            f"m = transformers.{cls}(transformers.{self.config_class}(**{config})); "
            f"m.load_state_dict(safetensors.torch.load_file('{out}'))"
        )
        return {"format": SafetensorsFile.format, "class": cls, "config": cfg, "load": load}


def _write_folder(out: Path, config: dict[str, Any], weights: WriteWeights, force: bool, files: Companions | None = None) -> list[str]:
    """model.safetensors, config.json and the companion `files` in a folder that appears whole or not at all."""
    files = files or {}
    with atomic_dir(out, force) as tmp, one_thread():
        weights(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    return [str(out / "model.safetensors"), str(out / "config.json"), *(str(out / name) for name in files)]


class SafetensorsFile(Exporter):
    """One bare .safetensors file whose header holds the metadata of the family's own exporter."""

    format = "safetensors"

    def __init__(self, native: Exporter):
        self.native = native

    def metadata(self, arch) -> dict[str, str]:
        return self.native.metadata(arch)

    def write(self, out: Path, arch, weights: WriteWeights, force: bool, files: Companions | None = None) -> list[str]:
        """The companion files ride in the header (`write_model`): a bare file has no folder."""
        with atomic_file(out, replace=force) as tmp, one_thread():
            weights(tmp)
        return [str(out)]

    def summary(self, arch, out: Path) -> dict[str, Any]:
        return self.native.bare_summary(arch, out)


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
