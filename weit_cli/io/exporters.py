"""The layouts a composed model is written in (`Exporter`), each family naming its own
(`Adapter.exporter`): the folder another library loads — timm's local-dir (`TimmLocalDir`),
diffusers' model folder (`DiffusersFolder`) or a Hugging Face transformers folder as
`save_pretrained` writes it (`TransformersFolder`); another layout is another `Exporter` subclass.
An output ending in .safetensors gets the bare weights file instead (`SafetensorsFile`), its header
holding the family exporter's metadata.

Family-neutral and below the families: it knows bytes on disk (`io/files.py`), not bundles, so
`arch/` imports it; the streaming writer that feeds an exporter is `io/export.py`."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from weit_cli.io.files import atomic_dir, atomic_file, one_thread

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
