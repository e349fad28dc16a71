"""Where a model comes from and how it is loaded.

A model is named anywhere by one of:
- a local Hugging Face checkpoint directory (config.json + safetensors; a family of bltool/models/families.py),
- a `.gguf` file, converted once into a cached safetensors checkpoint (bltool/models/gguf.py),
- an alias, built in or from the user's registry (bltool/models/registry.py).

`resolve_model` turns that into a local checkpoint directory; `load_model` loads it strictly, rebuilding
students that carry adapters (`distill`) or compressed low-rank modules (`compress`) from their manifest.
Nothing here touches the network: transformers is always called on local files, with
`use_safetensors=True` and without `trust_remote_code`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bltool.adapt.adapters import load_adapted
from bltool.adapt.compression import load_compressed
from bltool.artifacts import (
    MANIFEST,
    MODEL_STAGES,
    STAGE_DIRS,
    check_safetensors,
    read_manifest,
    sha256_file,
    sha256_json,
)
from bltool.errors import ArtifactError, UsageError
from bltool.models.families import family_of, unsupported
from bltool.models.gguf import gguf_cache_dir, gguf_checkpoint
from bltool.models.registry import load_registry, registry_path, safe_label
from bltool.models.weights import quiet_transformers


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


def _dir_label(path: Path) -> str:
    path = path.absolute()
    if path.name in STAGE_DIRS and path.parent.name:
        return safe_label(f"{path.parent.name}-{path.name}")
    return safe_label(path.name)


def resolve_model(spec: str, flag: str = "MODEL", convert: bool = True) -> ModelRef:
    """Turn a path or alias into a local checkpoint directory, converting a GGUF file if needed."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            check_checkpoint_dir(path, flag)
            return ModelRef(spec, _dir_label(path), "dir", path, path)
        if path.suffix.lower() == ".gguf":
            converted = gguf_checkpoint(path, flag) if convert else gguf_cache_dir(path)
            return ModelRef(spec, safe_label(path.stem), "gguf", path, converted)
        raise UsageError(f"{flag}: {spec} is a file but not a .gguf; give a checkpoint directory or alias")
    registry = load_registry()
    if spec in registry:
        entry = registry[spec]
        if entry.target is None or not entry.target.exists():
            where = f" ({entry.target} not found)" if entry.target is not None else ""
            how = f"; install it with `{entry.install}`" if entry.install else ""
            raise UsageError(f"{flag}: teacher {spec!r} is not available on this machine{where}{how}")
        inner = resolve_model(str(entry.target), flag=f"{flag} (alias {spec!r})", convert=convert)
        return ModelRef(spec, safe_label(spec), "alias", inner.source, inner.path)
    if "/" in spec or spec.endswith(".gguf") or spec.startswith("."):
        raise UsageError(f"{flag}: {spec} does not exist")
    known = ", ".join(sorted(registry)) or "none"
    raise UsageError(
        f"{flag}: {spec!r} is neither a path nor a known alias (known: {known}; add aliases to {registry_path()})"
    )


def model_inputs(flag: str, spec: str | None) -> list[tuple[str, Path]]:
    """The paths a model named on the command line stands for, as a stage declares its inputs to
    `check_output_dir`: the directory or .gguf file (an alias: its target) and a GGUF's converted
    checkpoint. Nothing is checked or converted here; a name that stands for nothing gives none."""
    if spec is None:
        return []
    path = Path(spec).expanduser()
    if not path.exists():
        entry = load_registry().get(spec)
        if entry is None or entry.target is None or not entry.target.exists():
            return []
        path = entry.target
    if path.is_file() and path.suffix.lower() == ".gguf":
        return [(flag, path), (flag, gguf_cache_dir(path))]
    return [(flag, path)]


def refuse_adapted(ref: ModelRef, flag: str, reader: str) -> None:
    """Refuse, in one line, a `distill` output that still carries its adapters where `reader` cannot load
    one (it stores `q_proj.base.weight`, `q_proj.lora_A`, ... in place of `q_proj.weight`)."""
    manifest = artifact_manifest(ref.path, flag)
    if manifest is not None and manifest.get("adapters"):
        raise UsageError(f"{flag} {ref.spec} is a `bltool distill` output (a gated LoRA student), which {reader} "
                         f"cannot load; pass its compressed form (`bltool compress {ref.spec} --out DIR`)")


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
    if family_of(model_type) is None:
        raise unsupported(f"{flag}: {path}", model_type)
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


def artifact_manifest(path: Path, flag: str | None = None) -> dict | None:
    """The bltool manifest of a model directory (checked: made by a stage that makes models, every file
    whole), or None for a plain Hugging Face checkpoint."""
    if not (Path(path) / MANIFEST).is_file():
        return None
    return read_manifest(Path(path), MODEL_STAGES, flag or str(path))


def load_model(ref: ModelRef, dtype=None, device: str = "cpu", flag: str = "MODEL"):
    """Load a causal LM strictly: every checkpoint key used, every model weight present.

    Students that carry adapters (`distill` kd-lora / budgeted-lora) or compressed low-rank modules
    (`compress`) are rebuilt from their manifest first, so every stage takes them like any model.
    """
    manifest = artifact_manifest(ref.path, flag)
    if manifest is not None and manifest.get("adapters"):
        return load_adapted(ref.path, manifest["adapters"], dtype=dtype, flag=flag).to(device).eval()
    if manifest is not None and manifest.get("compressed"):
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


def checkpoint_parameters(path: Path) -> int:
    """Parameters a checkpoint directory stores, from the safetensors headers (no weights are loaded). Tied
    embeddings are stored once; a compressed student stores its deployed (low-rank) form."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total
