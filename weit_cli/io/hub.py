"""Models named by their Hugging Face hub id: `hf-hub:ORG/NAME[@REVISION][/SUBFOLDER]`.

timm's spelling (`timm.create_model('hf-hub:ORG/NAME')`), for every family; a subfolder names the
model inside a pipeline repository (diffusers keeps a pipeline's transformer in `transformer/`). The id is resolved through `huggingface_hub`'s own cache, so `HF_HUB_OFFLINE=1`
reads whatever is cached and nothing else; only configs and safetensors weights are fetched (weit
never unpickles). Resolved, a hub model is an ordinary local folder: every reader of models takes
the folder, and the provenance records the id and the commit it resolved to (`hub_record`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weit_cli.errors import InputError

PREFIX = "hf-hub:"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID = re.compile(rf"^(?P<org>{_PART})/(?P<name>{_PART})(?:@(?P<rev>[A-Za-z0-9._-]+))?(?:/(?P<sub>{_PART}(?:/{_PART})*))?/?$")
SPELLING = "hf-hub:ORG/NAME[@REVISION][/SUBFOLDER], e.g. hf-hub:ORG/NAME@main/transformer"


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{PREFIX}{self.repo_id}{rev}{sub}"


def is_hub_id(source: Any) -> bool:
    """A source spelled as a hub id (`hf-hub:…`), whether or not it parses."""
    return isinstance(source, (str, Path)) and str(source).startswith(PREFIX)


def parse(source: str) -> HubId:
    """`hf-hub:ORG/NAME[@REVISION][/SUBFOLDER]` → its parts; anything else is a one-line error."""
    m = _ID.match(str(source)[len(PREFIX):])
    if m is None or ".." in str(source):
        raise InputError(f"'{source}' is not a hub id weit reads", f"spell it {SPELLING}")
    return HubId(f"{m['org']}/{m['name']}", m["rev"], m["sub"])


def resolve(source: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """A model source as a local path, and for a hub id the record the provenance keeps
    ({source, repo_id, revision (the commit), subfolder}); a local path passes through unchanged."""
    if not is_hub_id(source):
        return Path(source), None
    hub = parse(str(source))
    snapshot = _snapshot(hub)
    folder = snapshot / hub.subfolder if hub.subfolder else snapshot
    if not folder.is_dir():
        raise InputError(f"{hub} has no folder '{hub.subfolder}' in the cached snapshot", "check the subfolder's name (e.g. transformer)")
    if not any(folder.glob("*.safetensors")):
        raise InputError(
            f"{hub} holds no safetensors weights in the cache",
            "weit reads only safetensors from the hub (it never unpickles); convert the weights or pick a repository that ships them",
        )
    record = {"source": str(hub), "repo_id": hub.repo_id, "revision": snapshot.name}
    if hub.subfolder:
        record["subfolder"] = hub.subfolder
    return folder, record


def _snapshot(hub: HubId) -> Path:
    """The snapshot folder of `hub` in huggingface_hub's cache (fetched first when online)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    prefix = f"{hub.subfolder}/" if hub.subfolder else ""
    patterns = [f"{prefix}*.json", f"{prefix}*.safetensors", f"{prefix}*.txt"]
    try:
        return Path(snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        where = constants.HF_HUB_CACHE
        how = f"fetch it once where the hub is reachable: hf download {hub.repo_id}" + (f" --revision {hub.revision}" if hub.revision else "")
        if constants.HF_HUB_OFFLINE:
            raise InputError(f"{hub} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE is set", how) from None
        raise InputError(f"{hub} could not be fetched and is not in the Hugging Face cache ({where})", how) from None
    except HfHubHTTPError as e:  # not found, gated, unauthorised
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{hub} could not be fetched: {first[:160]}", "check the id and your access (hf auth login)") from None
    except ValueError as e:  # huggingface_hub's own check of the id and revision
        raise InputError(f"'{hub}' is not a valid hub id: {str(e).splitlines()[0][:160]}", f"spell it {SPELLING}") from None
