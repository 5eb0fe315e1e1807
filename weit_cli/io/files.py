"""Reading and writing weit's safetensors files and dense checkpoints.

Writes are atomic (temp file in the target folder, then `os.replace`) and streamed: tensors are
produced one at a time, so materializing a model needs little more memory than the model itself.
Reads check the header size before parsing and never unpickle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weit_cli import FORMAT_VERSION, KRON_ORDER, __version__
from weit_cli.errors import InputError, OutputError

if TYPE_CHECKING:
    from torch import Tensor

KIND_TEMPLATES = "weit.templates"
KIND_SCALERS = "weit.scalers"
MAX_HEADER = 100 * 1024 * 1024

#: safetensors' dtype names, by torch dtype name (`torch.float32` → "float32"): no torch at import.
_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


# ---------------------------------------------------------------------------------------------- writing
def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output without --force, and a folder we could not write to, before any work."""
    if path.exists() and not force:
        raise OutputError(f"{path} already exists", "pass --force to replace it, or choose another -o")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist", f"create it first: mkdir -p {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable", "choose another -o")


@contextmanager
def atomic_file(path: Path, replace: bool = True):
    """Yield a temp path beside `path`; move it into place only if the block succeeds.

    `replace=False` (no --force) never clobbers: the temp file is hard-linked to `path`, which fails
    if another process created `path` since `check_output` looked, instead of silently overwriting it."""
    path = Path(path)
    with _interrupts_deferred() as allow_interrupts:  # none between creating the temp file and the try that removes it
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise OutputError(f"cannot write in {path.parent}: {e.strerror}", "check the folder's permissions") from None
        os.close(fd)
        try:
            allow_interrupts()
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            if replace:
                os.replace(tmp, path)
            else:
                _link_new(Path(tmp), path)
        except OSError as e:
            _unlink(tmp)
            raise OutputError(f"cannot write {path}: {e.strerror}", "check free disk space and permissions") from None
        except BaseException:
            _unlink(tmp)
            raise


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path} already exists (another process wrote it meanwhile)", "pass --force to replace it, or choose another -o") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):  # a filesystem without hard links: check, then rename (racy, as before)
            raise OutputError(f"{path} already exists", "pass --force to replace it, or choose another -o") from None
        os.replace(tmp, path)
        return
    _unlink(tmp)


@contextmanager
def atomic_dir(path: Path, force: bool):
    """Yield a temp folder beside `path`; move it into place (replacing an old one) on success."""
    path = Path(path)
    with _interrupts_deferred() as allow_interrupts:  # none between creating the temp folder and the try that removes it
        try:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        except OSError as e:
            raise OutputError(f"cannot write in {path.parent}: {e.strerror}", "check the folder's permissions") from None
        try:
            allow_interrupts()
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~_umask())
            _move_dir_into_place(tmp, path, force)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"cannot write {path}: {e.strerror}", "check free disk space and permissions") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def _interrupts_deferred():
    """Hold SIGINT and SIGTERM back (the OS keeps them pending) until the block calls the function it is
    given, or ends: an interrupt that landed between creating a temp file and entering the `try` that
    removes it would leave the file behind (seen under load in tests/test_interrupt.py). POSIX main
    thread only; elsewhere nothing is held back."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    restored = False

    def allow() -> None:
        nonlocal restored
        if not restored:
            restored = True
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    try:
        yield allow
    finally:
        allow()


def _move_dir_into_place(tmp: Path, path: Path, force: bool) -> None:
    """A folder cannot be renamed over a non-empty one: set the old one aside first. Other writers
    may do the same at the same moment (the old one is gone when we move it, or a new one appears
    before our rename), so retry; with --force the last rename wins, without it the first."""
    exists = OutputError(f"{path} already exists", "pass --force to replace it")
    for _ in range(50):
        old = None
        if os.path.lexists(path):
            if not force:
                raise exists
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            try:
                os.replace(path, old / "x")
            except FileNotFoundError:
                pass  # another writer set it aside first
        try:
            os.replace(tmp, path)
            return
        except BaseException as e:
            if old is not None and (old / "x").exists() and not os.path.lexists(path):
                os.replace(old / "x", path)  # put the previous result back
            if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                if not force:
                    raise exists from None
                continue  # another writer's folder landed in between: set it aside and try again
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    raise OutputError(f"{path} kept being replaced by other writers", "write to another path")


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files and folders (`.NAME.*.tmp`, `.NAME.*.old`) that a killed writer of
    `path` left beside it. Only for a path this process owns (e.g. resuming its own run): a live
    writer's temp file would be removed too."""
    import glob

    path = Path(path)
    gone = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if p.suffix in (".tmp", ".old"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]],
    metadata: dict[str, str],
) -> None:
    """Stream tensors into a safetensors file at `path` (already a temp path: see atomic_file).

    `specs` lists (name, shape, dtype, make) sorted as they should be written; `make()` is called
    once per tensor, right before it is written, so only one dense tensor lives at a time. Each
    tensor is fully written before the next `make()` runs: a `make()` may reuse one buffer.
    """
    import torch

    specs = list(specs)
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype, _ in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[str(dtype).removeprefix("torch.")], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in sorted(metadata.items())}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in specs:
            t = make().detach()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, announced {shape} {dtype}")
            f.write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], force: bool = False) -> None:
    """Write a dict of tensors atomically, keys sorted."""
    path = Path(path)
    check_output(path, force)
    specs = [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in sorted(tensors.items())]
    with atomic_file(path, replace=force) as tmp:
        write_safetensors(tmp, specs, metadata)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without trusting its size field."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", "check the path")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file", "point to the .safetensors file inside it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path} is not a safetensors file (only {size} bytes)", "the file is empty or truncated")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n > size - 8:
            raise InputError(
                f"{path} is not a valid safetensors file (header claims {n} bytes, file has {size})",
                "the file is corrupt, truncated or of another format",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path} is not a valid safetensors file (unreadable header)", "the file is corrupt") from None
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise InputError(f"{path} is not a valid safetensors file (bad entry {k!r})", "the file is corrupt") from None
    if 8 + n + end > size:
        raise InputError(f"{path} is truncated ({size} bytes, needs {8 + n + end})", "re-create or re-download it")
    return header


def load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path} could not be read: {str(e).splitlines()[0]}", "the file is corrupt") from None
    return tensors, dict(header.get("__metadata__") or {})


def load_weit(path: Path, kind: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a weit file, checking `weit_format` and `kind` before anything else."""
    weit_header(path, kind)
    tensors, meta = load_safetensors(path)
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise InputError(f"{path} holds non-finite values (NaN or Inf) in '{bad}'", "the file is corrupt or training diverged")
    return tensors, meta


def weit_header(path: Path, kind: str) -> dict[str, Any]:
    """The safetensors header of a weit file of `kind`, its `kind`, `weit_format` and `kron_order`
    checked (no tensor read)."""
    path = Path(path)
    header = read_header(path)
    meta = dict(header.get("__metadata__") or {})
    what = {KIND_TEMPLATES: "template bundle", KIND_SCALERS: "scalers file"}[kind]
    found = meta.get("kind")
    if found != kind:
        got = f"a '{found}' file" if found else "not a weit file"
        hint = {
            KIND_TEMPLATES: "make one with 'weit pretrain' or 'weit extract-templates'",
            KIND_SCALERS: "make one with 'weit fit-scalers'",
        }[kind]
        raise InputError(f"{path} is {got}, expected a {what} ('{kind}')", hint)
    if meta.get("weit_format") != FORMAT_VERSION:
        raise InputError(
            f"{path} has weit_format {meta.get('weit_format')!r}; this weit reads format {FORMAT_VERSION}",
            "re-create the file with this version of weit",
        )
    if meta.get("kron_order", KRON_ORDER) != KRON_ORDER:
        raise InputError(f"{path} uses kron_order {meta['kron_order']!r}", f"this weit supports '{KRON_ORDER}' only")
    return header


@contextmanager
def one_thread():
    """Run torch ops on one intra-op thread, restoring the caller's setting afterwards.

    For many small or thin ops (checking a bundle, composing weights between disk writes) more threads
    gain little on an idle machine, while on a busy one OpenMP's barriers make every op wait for a
    descheduled thread: on the loaded 2-core test machine, checking an 86M-parameter bundle's 156 tensors
    took 2.3 s with 2 threads, and materializing that 86M-parameter model 3.5–6.6 s instead of 0.8–1.8 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def first_nonfinite(tensors: dict[str, Tensor]) -> str | None:
    """The first key holding NaN or Inf, if any."""
    import torch

    with one_thread():
        for k, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                return k
    return None


def base_metadata(kind: str, **fields: Any) -> dict[str, str]:
    meta = {"weit_format": FORMAT_VERSION, "kind": kind, "weit_version": __version__, "kron_order": KRON_ORDER}
    for k, v in fields.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


WEIGHT_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.pth", "model.pt",  # timm's, in its order of preference
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",  # diffusers' model folders
)


def weights_file(folder: Path) -> Path | None:
    """The weights file of a timm or diffusers model folder, in their order of preference."""
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def checkpoint_sha256(path: Path) -> str:
    """Digest of a checkpoint for provenance: its weights file (or, weightless, its config.json)."""
    path = Path(path)
    if path.is_dir():
        found = weights_file(path) or (path / "config.json")
        return sha256(found) if found.is_file() else ""
    return sha256(path)


def _library_config(conf: Any) -> dict[str, Any]:
    """The init arguments of a config saved by diffusers' `save_config` (it names the model's
    `_class_name`): every top-level key is one, kept as written, `_class_name` included, so that a
    family can tell a model of another class."""
    if not isinstance(conf, dict) or not isinstance(conf.get("_class_name"), str):
        return {}
    return dict(conf)


def load_dense(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A dense checkpoint: a timm local-dir, diffusers or transformers model folder, a bare
    safetensors file, or a torch file (weights only).

    Returns the state dict and hints about the architecture: timm's `model_args` (from config.json or
    the header) as keys, its `pretrained_cfg`, under `config` the whole config.json (or a header's
    `config` entry) for libraries whose config is not timm's, and a diffusers config's keys.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", "check the path")
    hints: dict[str, Any] = {}
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                conf = json.loads(cfg.read_text())
                hints.update(conf.get("model_args") or {})
                hints["config"] = conf
                if isinstance(conf.get("pretrained_cfg"), dict):  # input size of size-agnostic CNNs
                    hints["pretrained_cfg"] = conf["pretrained_cfg"]
                hints.update(_library_config(conf))
            except (ValueError, AttributeError, UnicodeDecodeError):
                raise InputError(f"{cfg} is not valid JSON", "fix or remove it") from None
        found = weights_file(path)
        if found is None:
            raise InputError(
                f"{path} holds no model.safetensors, pytorch_model.bin or diffusion_pytorch_model.safetensors",
                "point to a timm or diffusers model folder, or a weights file",
            )
        path = found
    if path.suffix == ".safetensors":
        meta = read_header(path).get("__metadata__") or {}
        if meta.get("kind") in (KIND_TEMPLATES, KIND_SCALERS):
            raise InputError(f"{path} is a {meta['kind']} file, not a dense checkpoint", "pass a timm model file or folder")
        if "config" in meta:  # a bare file that a library-config exporter wrote (its config.json)
            try:
                hints = {**_library_config(json.loads(meta["config"])), **hints}
            except (ValueError, AttributeError):
                pass
        for key in ("model_args", "pretrained_cfg", "config"):
            if key in meta:
                try:
                    value = json.loads(meta[key])
                except ValueError:
                    continue
                if isinstance(value, dict):
                    hints = {**value, **hints} if key == "model_args" else {key: value, **hints}
        state, _ = load_safetensors(path)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad files; all mean the same to a user
            if "weights_only" in str(e) or "Unpickler" in str(e):
                why = "it holds pickled Python objects, which weit never unpickles"
            else:
                why = (str(e).splitlines()[0] if str(e) else type(e).__name__)[:160]
            raise InputError(f"{path} could not be loaded as weights: {why}", "pass a safetensors file or a plain tensor state dict") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InputError(f"{path} does not hold a state dict of tensors", "pass a model state dict")
        state = {k.removeprefix("module."): v for k, v in obj.items()}
    if not state:
        raise InputError(f"{path} holds no tensors", "pass a model checkpoint")
    bad = first_nonfinite(state)
    if bad is not None:
        raise InputError(f"{path} holds non-finite values (NaN or Inf) in '{bad}'", "the checkpoint is corrupt or diverged")
    return state, hints
