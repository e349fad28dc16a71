"""GGUF import: a `.gguf` file becomes a float32 safetensors checkpoint under `$BLTOOL_HOME/models`, once.

transformers reads the GGUF (dequantising it) from local files only; the converted checkpoint carries
a manifest with the GGUF's SHA-256, and later calls reuse it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bltool import ui
from bltool.artifacts import Stage, atomic_output, read_manifest, sha256_file, write_manifest
from bltool.errors import ArtifactError, BltoolError
from bltool.models.families import FAMILIES, unsupported
from bltool.models.registry import bltool_home, safe_label
from bltool.models.weights import quiet_transformers


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache directory for a GGUF file, keyed by its absolute path, size and mtime (cheap to compute;
    the manifest inside records the file's full SHA-256)."""
    gguf = gguf.absolute()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return bltool_home() / "models" / f"{safe_label(gguf.stem)}-{key}"


def gguf_checkpoint(gguf: Path, flag: str = "MODEL") -> Path:
    """Convert a GGUF file into a float32 safetensors checkpoint once; later calls reuse it."""
    target = gguf_cache_dir(gguf)
    if (target / "manifest.json").is_file():
        read_manifest(target, (Stage.IMPORT_GGUF,), flag)
        return target
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
    if config.model_type not in FAMILIES:
        raise unsupported(f"{flag}: {gguf}", config.model_type, compressed=False)
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
        with atomic_output(target, overwrite=True, flag="$BLTOOL_HOME") as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_manifest(
                tmp,
                Stage.IMPORT_GGUF,
                config={"gguf": str(gguf.absolute())},
                inputs=[{"role": "gguf", **source}],
            )
    except OSError as err:
        if (target / "manifest.json").is_file():  # another process converted it at the same time
            return target
        raise BltoolError(f"cannot write the converted model to {target}: {err}") from None
    return target
