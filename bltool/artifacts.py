"""Artifact conventions shared by every stage.

An artifact is a directory: data files (safetensors, Arrow, JSON) plus `manifest.json`, written by the
producing stage. The manifest records the stage, bltool version, full config, the input artifacts with
their content hashes, the creation time, and a table of the artifact's own files (bytes and SHA-256).
The artifact's hash is the SHA-256 of that file table, so a consumer can cite its inputs by content
without rereading gigabytes of weights.

Directories are written atomically: the stage builds a temporary sibling and renames it into place, so
a killed or failed stage leaves nothing at `--out`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from bltool import __version__
from bltool.errors import ArtifactError, BltoolError, UsageError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 22


class Stage:
    """The `stage` a manifest records: which command made the artifact. Spelled here only."""

    PREPARE_DATA = "prepare-data"
    IMPORT_GGUF = "import-gguf"  # a GGUF file converted into $BLTOOL_HOME/models
    BUILD_STUDENT = "build-student"
    TEACHER_LOGITS = "teacher-logits"
    DISTILL = "distill"
    DISTILL_CHECKPOINT = "distill-checkpoint"  # a resumable checkpoint, not an output
    COMPRESS = "compress"
    EVAL_PPL = "eval-ppl"
    EVAL_ICL = "eval-icl"
    EVAL_HARNESS = "eval-harness"  # EleutherAI lm-evaluation-harness tasks (the `harness` extra)
    BENCH = "bench"
    BENCH_SERVING = "bench-serving"
    CAPACITY = "capacity"
    REPORT = "report"


# Stages whose output is a model (a checkpoint directory with config.json and safetensors weights).
MODEL_STAGES = (Stage.IMPORT_GGUF, Stage.BUILD_STUDENT, Stage.DISTILL, Stage.COMPRESS)

# Directory names the example scripts give stage outputs inside a run directory; a model found in
# one is named after its run (runs/bl-0.4/compressed → bl-0.4-compressed), so that two runs' students
# get different default output paths and table columns.
STAGE_DIRS = ("distilled", "compressed")


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """SHA-256 of a JSON value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_arrow(path: Path, rows: list[dict] | pa.Table) -> None:
    """Write rows (or a table) as one Arrow IPC stream file, the format `datasets.Dataset.from_file`
    reads. Meant for files inside an `atomic_output` directory, which is what makes them atomic."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def write_json(path: Path, value: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


Inputs = Iterable[tuple[str, "str | os.PathLike[str] | None"]]  # (flag, path) pairs; a None path is skipped


def check_output_dir(out: Path, overwrite: bool, flag: str = "--out", *, stage: str | None = None,
                     inputs: Inputs = (), holders: Inputs = ()) -> None:
    """Checked before any work: `out` is apart from the stage's `inputs` (`check_apart`), and an existing,
    non-empty `out` is replaced only with `overwrite`, and then only if it is an earlier output of `stage`
    (`check_replaceable`; every stage passes its own)."""
    out = Path(out)
    check_apart(out, inputs, flag, holders)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {out} already exists and is not empty; pass --overwrite to replace it")
    if stage is not None and out.is_dir() and any(out.iterdir()):
        check_replaceable(out, stage, flag)
    parent = next(p for p in Path(out).absolute().parents if p.exists())  # where the output will be made
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: {parent} is not writable (read-only or no permission)")


def check_apart(out: Path, inputs: Inputs, flag: str = "--out", holders: Inputs = ()) -> None:
    """Refuse an output that is one of the stage's inputs, contains one, or lies inside one, symlinks
    resolved: replacing it would destroy that input, writing it would change it. `holders` are inputs an
    output may lie inside but neither be nor contain (report's RUN_DIRs, directories that collect outputs)."""
    target = _real(out)
    for inside_ok, pairs in ((False, inputs), (True, holders)):
        for source_flag, path in pairs:
            if path is None or str(path) == "":
                continue
            source = _real(path)
            if target == source:
                relation = "is the same path as"
            elif source.is_relative_to(target):
                relation = "contains"
            elif target.is_relative_to(source) and not inside_ok:
                relation = "is inside"
            else:
                continue
            raise UsageError(f"{flag} {out} {relation} {source_flag} {path}: choose an {flag} outside the "
                             "stage's inputs")


def _real(path: str | os.PathLike[str]) -> Path:
    """The absolute path with every symlink along it resolved (as far as the path exists)."""
    return Path(path).expanduser().resolve()


# What --overwrite may replace, in words, where the stage name is not a command.
_REPLACEABLE = {Stage.DISTILL_CHECKPOINT: "a `bltool distill` checkpoint", Stage.IMPORT_GGUF: "a converted GGUF"}


def check_replaceable(out: Path, stage: str, flag: str = "--out") -> None:
    """--overwrite replaces only an earlier output of the same stage: refuse a non-empty directory whose
    manifest names another stage, or that has no manifest (a user's own folder)."""
    out = Path(out)
    made = None
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError, AttributeError):
        made = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("stage")
    if made == stage:
        return
    found = (f"the output of `bltool {made}`" if isinstance(made, str) and made else
             f"not a bltool output (no readable {MANIFEST})")
    wanted = _REPLACEABLE.get(stage, f"an earlier `bltool {stage}` output")
    raise UsageError(f"{flag} {out} is {found}; --overwrite replaces only {wanted}: choose another {flag} or "
                     "empty it first")


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes without error.

    The temporary directory is a sibling of `out` (same filesystem, so the final rename is atomic).
    On any exception, KeyboardInterrupt included, it is removed and `out` is left as it was.
    """
    out = Path(out).absolute()
    check_output_dir(out, overwrite, flag)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield tmp
        for path in tmp.rglob("*"):  # some writers create 0600 files; give them the umask's mode
            if path.is_file():
                os.chmod(path, 0o666 & ~_umask())
        recover_output(out)  # a replacement killed half-way earlier
        if out.exists():  # out → backup, tmp → out, drop backup: a kill in between leaves the backup
            backup = _backup(out)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # parents this call made, if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        code = _disk_errno(err)
        if code in _FULL:
            raise BltoolError(f"{flag} {out}: cannot write ({os.strerror(code)}); nothing was written") from None
        raise


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # the disk, not the program, said no


def _disk_errno(err: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one a Rust-backed writer (safetensors,
    tokenizers) puts in its message as "(os error N)"."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None


def _backup(out: Path) -> Path:
    return out.parent / f".{out.name}.replaced"


def recover_output(out: Path) -> None:
    """Finish what a process killed while replacing `out` left: the old `out` back in place if the new
    one never arrived, or the old one dropped if it did."""
    out, backup = Path(out).absolute(), _backup(Path(out).absolute())
    if not backup.exists():
        return
    if out.exists():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(backup, out)


def remove_stale_temporaries(out: Path) -> None:
    """Drop the temporary siblings that killed writers of `out` left behind (call only where no other
    process can be writing `out`, e.g. a run's own checkpoint directory)."""
    out = Path(out).absolute()
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """Bytes and SHA-256 of every file under `directory` except the manifest (relative POSIX names)."""
    directory = Path(directory)
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name == MANIFEST or name.startswith("."):
            continue
        table[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return table


def write_manifest(
    directory: Path,
    stage: str,
    config: dict[str, Any],
    inputs: list[dict[str, Any]],
    **sections: Any,
) -> dict[str, Any]:
    """Write `manifest.json` describing the files already in `directory`; return the manifest."""
    files = file_table(directory)
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "bltool_version": __version__,
        "created_at": now_iso(),
        "config": config,
        "inputs": inputs,
        **sections,
        "files": files,
        "hash": sha256_json(files),
    }
    write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path, stages: tuple[str, ...] | None = None, flag: str = "PATH") -> dict:
    """Read and check an artifact's manifest: it exists, parses, comes from one of `stages`, and every
    file it lists is present with its recorded size and SHA-256 (see `verify_hashes`)."""
    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(f"{flag}: {directory} does not exist")
    if not directory.is_dir():
        raise ArtifactError(f"{flag}: {directory} is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        wanted = " or ".join(f"`bltool {s}`" for s in stages) if stages else "a bltool stage"
        raise ArtifactError(f"{flag}: {directory} has no {MANIFEST}; make it with {wanted}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{flag}: {path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or "stage" not in manifest or "files" not in manifest:
        raise ArtifactError(f"{flag}: {path} is not a bltool manifest")
    if stages is not None and manifest["stage"] not in stages:
        wanted = " or ".join(f"`bltool {s}`" for s in stages)
        raise ArtifactError(
            f"{flag}: {directory} was made by `bltool {manifest['stage']}`, expected the output of {wanted}"
        )
    hashes = verify_hashes()
    for name, entry in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{flag}: {file} is missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(
                f"{flag}: {file} has {size} bytes, its manifest says {entry['bytes']} (truncated or modified)"
            )
        if hashes and _checked_sha256(file) != entry["sha256"]:
            raise ArtifactError(f"{flag}: {file} does not match the SHA-256 in its {MANIFEST} (modified or corrupt)")
    return manifest


VERIFY_ENV = "BLTOOL_VERIFY"
_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) → SHA-256, hashed once per process


def verify_hashes() -> bool:
    """Whether reading an artifact checks each file's SHA-256 against its manifest (the default), or
    only its size ($BLTOOL_VERIFY=size, for inputs too large to hash on every read)."""
    mode = os.environ.get(VERIFY_ENV, "") or "sha256"
    if mode not in ("sha256", "size"):
        raise UsageError(f"${VERIFY_ENV} must be sha256 or size, got {mode!r}")
    return mode == "sha256"


def _checked_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        _checked[key] = sha256_file(path)
    return _checked[key]


def artifact_ref(directory: Path, manifest: dict, role: str) -> dict[str, Any]:
    """How a consumer cites an input artifact in its own manifest."""
    return {
        "role": role,
        "path": str(Path(directory).absolute()),
        "stage": manifest["stage"],
        "hash": manifest["hash"],
    }


def check_safetensors(path: Path, flag: str = "PATH") -> None:
    """Check that a .safetensors file is complete: a parseable header whose tensors fit the file.

    safetensors layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer;
    each tensor's `data_offsets` index that buffer, so the file must be exactly 8 + N + max(end).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(handle.read(n).decode("utf-8"))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as err:
        raise ArtifactError(f"{flag}: {path} is not a valid safetensors file ({err})") from None
    if 8 + n + end != size:
        raise ArtifactError(
            f"{flag}: {path} is truncated or corrupt: tensors need {8 + n + end} bytes, file has {size}"
        )
