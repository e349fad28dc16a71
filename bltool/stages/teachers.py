"""teachers: the known model aliases and whether each is usable on this machine."""

from __future__ import annotations

from dataclasses import dataclass

from bltool.models.gguf import gguf_cache_dir
from bltool.models.registry import AliasEntry, load_registry, registry_path


@dataclass(frozen=True)
class TeacherStatus:
    name: str
    origin: str  # "built-in" or the registry file it came from
    target: str  # the file or directory the alias points at ("" when unknown)
    available: bool  # the target exists
    converted: bool | None  # for a GGUF target: the safetensors conversion is cached
    install: str  # how to make it available

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _status(entry: AliasEntry) -> TeacherStatus:
    target = entry.target
    available = target is not None and target.exists()
    converted = None
    if available and target.suffix.lower() == ".gguf":
        converted = (gguf_cache_dir(target) / "manifest.json").is_file()
    return TeacherStatus(entry.name, entry.origin, str(target or ""), available, converted, entry.install)


def run() -> list[TeacherStatus]:
    return [_status(entry) for entry in load_registry().values()]


def registry_file() -> str:
    return str(registry_path())
