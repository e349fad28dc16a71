"""Options as data: a stage's frozen config dataclass is the one source of its command-line options.

Each leaf field of a config is one flag, named as the field (`batch_size` ↔ `--batch-size`); its
metadata (`option(...)`) carries the help text, the parser of what users type (`2M`, `80GiB`, `1,8,32`),
whether it is a positional argument, and per-field checks. Fields may be grouped into frozen
sub-dataclasses (`group(...)`); the flags, a config file's keys and a manifest's "config" section stay
flat. The CLI builds its Typer options from `leaves(...)`, `build(...)` turns parsed values into the
config, `record(...)` gives the flat dict a manifest records, and `read_file(...)` reads `--config FILE`
(TOML, or a manifest.json to replay a run). Torch-free, like everything the CLI imports at its top.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from bltool.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover (Python 3.10)
    import tomli as tomllib

KEY = "bltool"  # the metadata key of an option's `Spec`
# Manifest keys a replay (`--config manifest.json`) does not take over: where the new run writes and how it
# treats what is there are the user's to give (`--out` must be given again; required where the stage has it).
NOT_REPLAYED = ("out", "overwrite", "resume", "checkpoint_dir")


@dataclass(frozen=True)
class Spec:
    """What a field needs to be a flag."""

    help: str
    parser: Callable[[Any, str], Any] | None = None  # (what was typed, flag) → field value
    text: str | None = None  # the default as typed on the command line, for a parsed field ("2M")
    argument: bool = False  # a positional argument, not an option
    multiple: bool = False  # repeatable option / several arguments (a tuple field)
    decls: tuple[str, ...] = ()  # explicit flag spellings (e.g. ("--compile",) for a flag with no --no- form)
    show_default: bool = True
    checks: tuple[Callable[[Any, str], None], ...] = ()  # (value, flag) → raise UsageError naming the flag


@dataclass(frozen=True)
class Leaf:
    """One flag: its field's name, the path of groups above it, its type and its spec."""

    name: str
    path: tuple[str, ...]
    type: Any
    spec: Spec
    field: dataclasses.Field

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    @property
    def required(self) -> bool:
        return self.field.default is MISSING and self.field.default_factory is MISSING

    @property
    def default(self) -> Any:
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return self.field.default


def option(default: Any = MISSING, *, help: str, parser: Callable[[Any, str], Any] | None = None,
           text: str | None = None, argument: bool = False, multiple: bool = False, decls: tuple[str, ...] = (),
           show_default: bool = True, checks: tuple = ()) -> Any:
    """A config field that is a flag (or a positional argument)."""
    spec = Spec(help=help, parser=parser, text=text, argument=argument, multiple=multiple, decls=decls,
                show_default=show_default, checks=tuple(checks))
    return dataclasses.field(default=default, metadata={KEY: spec})


def group(cls: type) -> Any:
    """A field holding a frozen sub-dataclass of options (its leaves are flat flags)."""
    return dataclasses.field(default_factory=cls, metadata={KEY: "group"})


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def leaves(cls: type, path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every flag of a config class, in field order, groups expanded in place."""
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(KEY)
        if meta == "group":
            out.extend(leaves(hints[f.name], (*path, f.name)))
        elif isinstance(meta, Spec):
            out.append(Leaf(f.name, path, hints[f.name], meta, f))
        else:
            raise TypeError(f"{cls.__name__}.{f.name} is neither an option(...) nor a group(...)")
    names = [leaf.name for leaf in out]
    if len(names) != len(set(names)):
        raise TypeError(f"{cls.__name__}: two options share a name in {names}")
    return out


def check_fields(config: Any) -> None:
    """Run the per-field checks of `config`'s own (not grouped) options, in field order."""
    for f in dataclasses.fields(config):
        spec = f.metadata.get(KEY)
        if isinstance(spec, Spec):
            for check in spec.checks:
                check(getattr(config, f.name), flag_of(f.name))


def at_least(low: int | float) -> Callable[[Any, str], None]:
    def check(value, flag):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    return check


def convert(leaf: Leaf, raw: Any) -> Any:
    """A value as the command line gives it (strings for parsed fields, lists for repeated ones) → the field's."""
    if leaf.spec.multiple:
        return tuple(raw) if raw else leaf.default
    if raw is None:
        return None
    if leaf.spec.parser is not None:
        return leaf.spec.parser(raw, leaf.flag)
    return raw


def build(cls: type, values: dict[str, Any]) -> Any:
    """The config from command-line values keyed by flag name (snake case); absent keys take defaults."""
    kwargs = {}
    by_name = {leaf.name: leaf for leaf in leaves(cls)}
    for f in dataclasses.fields(cls):
        if f.metadata.get(KEY) == "group":
            kwargs[f.name] = build(typing.get_type_hints(cls)[f.name], values)
        elif f.name in values:
            kwargs[f.name] = convert(by_name[f.name], values[f.name])
    return cls(**kwargs)


def from_flags(cls: type, **values: Any) -> Any:
    """The config from field values keyed by flag name (already parsed, as Python code gives them), groups
    filled in: `from_flags(DistillConfig, student=..., rank=4)`."""
    names = {leaf.name for leaf in leaves(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)}")

    def make(klass):
        hints = typing.get_type_hints(klass)
        kwargs = {f.name: make(hints[f.name]) if f.metadata.get(KEY) == "group" else values[f.name]
                  for f in dataclasses.fields(klass) if f.metadata.get(KEY) == "group" or f.name in values}
        return klass(**kwargs)

    return make(cls)


def record(config: Any) -> dict[str, Any]:
    """The config as flat JSON types keyed by flag name (snake case): what a manifest records."""
    out = {}
    for leaf in leaves(type(config)):
        value = config
        for part in (*leaf.path, leaf.name):
            value = getattr(value, part)
        out[leaf.name] = list(value) if isinstance(value, tuple) else value
    return out


# ---------------------------------------------------------------------------------------------------
# --config FILE


def _expected(leaf: Leaf) -> str:
    if leaf.spec.multiple:
        return "a list of strings"
    if leaf.spec.parser is not None:
        return "a string as the flag takes it (or a number / a list)"
    base = [t for t in typing.get_args(leaf.type) if t is not type(None)] or [leaf.type]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base[0], str(base[0]))


def cli_value(leaf: Leaf, value: Any, where: str) -> Any:
    """A value from a config file (TOML or a manifest's JSON) as the command line would give it, checked
    against the field's type; a wrong one is refused naming the file and the key."""
    key = leaf.name.replace("_", "-")
    bad = UsageError(f"{where}: {key} must be {_expected(leaf)}, got {value!r}")
    if value is None:
        optional = type(None) in typing.get_args(leaf.type)
        if not optional:
            raise bad
        return None
    if leaf.spec.multiple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad
        return list(items)
    if leaf.spec.parser is not None:
        if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise bad
        try:
            leaf.spec.parser(value, leaf.flag)
        except UsageError as err:
            raise UsageError(f"{where}: {key}: {err}") from None
        return value
    base = [t for t in typing.get_args(leaf.type) if t is not type(None)] or [leaf.type]
    kind = base[0]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover (every option type is one of the above)
        ok = False
    if not ok:
        raise bad
    return value


def read_file(path: str | Path, cls: type, stage: str) -> dict[str, Any]:
    """`--config FILE` for the stage `stage` (config class `cls`): TOML keyed by flag names (`batch-size = 4`),
    or a bltool manifest.json of the same stage (its "config" section, less NOT_REPLAYED). Returns command-line
    values keyed by field name, for click's default_map (so flags given on the command line win)."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{where}: cannot read it ({err.__class__.__name__})") from None
    if path.suffix == ".json":
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict) or "stage" not in manifest:
            raise UsageError(f"{where}: not a bltool manifest.json (no \"stage\" and \"config\")")
        if manifest["stage"] != stage:
            raise UsageError(f"{where}: a manifest of `bltool {manifest['stage']}`, not of `bltool {stage}`")
        items = {k: v for k, v in manifest["config"].items() if k not in NOT_REPLAYED}
    else:
        try:
            items = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{where}: not valid TOML ({err})") from None
    by_name = {leaf.name: leaf for leaf in leaves(cls)}
    values = {}
    for key, value in items.items():
        name = key.replace("-", "_")
        if name not in by_name:
            raise UsageError(f"{where}: unknown key {key!r}: `bltool {stage}` has no option "
                             f"--{name.replace('_', '-')}")
        values[name] = cli_value(by_name[name], value, where)
    return values
