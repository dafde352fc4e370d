"""Where a model comes from, as far as its files say: the Hub model it derives from, its licence
and languages -- what a model card's `base_model`, `license` and `language` inherit.

A base is named three ways in a run config: a Hub id (itself), a local folder (the metadata of its
own README.md, which `vitune init-model --preset`, `vitune merge` and `vitune train` write, so a
chain of local folders keeps naming the original Hub model) or a .gguf file (its general.* metadata).
A local path is never a Hub id: where none is known, the folder is only named in a card's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vitune.models.gguf import general_metadata, is_gguf

CARD = "README.md"
HUB = "https://huggingface.co"


@dataclass(frozen=True)
class Lineage:
    """Where a model comes from, as far as its files say."""

    base_model: str | list | None = None  # Hub id(s) of the model it derives from; never a local path
    licence: dict = field(default_factory=dict)  # license (and license_name, license_link) as its card gives them
    relation: str | None = None  # its own card's base_model_relation
    language: list | None = None
    local: str | None = None  # the local folder or .gguf file it was loaded from, named in the body

    def shown(self) -> str:
        """The base in words, with a link when it is on the Hub."""
        hub = self.base_model if isinstance(self.base_model, str) else None
        linked = f"[{hub}]({HUB}/{hub})" if hub else None
        if self.local and linked:
            return f"{linked} (loaded from the local `{self.local}`)"
        if self.local:
            return f"the local model `{self.local}` (no Hub id known, so the metadata names no base model)"
        return linked or "an unknown model"

    def loadable(self) -> str:
        """What to pass to from_pretrained for the base: its Hub id, else the local folder."""
        return self.base_model if isinstance(self.base_model, str) else (self.local or "BASE_MODEL")


def lineage(name_or_path: str) -> Lineage:
    """The lineage of a model as `model.name_or_path` names it: a Hub id, a local folder (its card's
    metadata), a .gguf file (its general.* metadata)."""
    path = Path(name_or_path).expanduser()
    if is_gguf(name_or_path) and path.is_file():
        return gguf_lineage(path, local=name_or_path)
    if path.is_dir():
        meta = card_metadata(path)
        return Lineage(meta.get("base_model"), _licence(meta), meta.get("base_model_relation"), meta.get("language"),
                       local=name_or_path)
    return Lineage(name_or_path) if is_hub_id(name_or_path) else Lineage(local=name_or_path)


def gguf_lineage(path: Path, local: str | None = None, hub_id: str | None = None) -> Lineage:
    """The lineage a GGUF file states: the Hub repository it was converted from (or failing that, the
    model it was built on), its licence and languages. `hub_id`: known better (a preset's table)."""
    meta = general_metadata(path)
    found = hub_id or next(filter(None, (_hub_id_in(meta.get(key)) for key in (
        "general.source.huggingface.repository", "general.source.url", "general.base_model.0.repo_url"))), None)
    licence = str(meta.get("general.license") or "")
    languages = meta.get("general.languages")
    return Lineage(found, {"license": licence} if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", licence) else {},
                   language=list(languages) if languages else None, local=local)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub model id (org/name or name) rather than a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith((".", "/", "~", "runs/")) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_id_in(value) -> str | None:
    """A Hub id from a GGUF field: `org/name`, or a https://huggingface.co/org/name address."""
    found = re.fullmatch(r"(?:https?://(?:www\.)?huggingface\.co/)?([\w.-]+/[\w.-]+)/?", str(value or "").strip())
    return found.group(1) if found and is_hub_id(found.group(1)) else None


def card_metadata(folder: Path) -> dict:
    """The YAML metadata of the folder's README.md ({} without one, or when it does not parse)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # anyone's README.md: a broken YAML header means no metadata to inherit, not a failure
        return {}


def _licence(meta: dict) -> dict:
    return {key: meta[key] for key in ("license", "license_name", "license_link") if meta.get(key)}
