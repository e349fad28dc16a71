"""Loading safetensors weights into a built model, strictly, and keeping transformers quiet meanwhile.

A leaf module (it imports no other bltool module but errors), so the loaders of plain, adapted and
compressed models can all use it without importing each other.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from bltool.errors import ArtifactError


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' logging (load reports, deprecation notes) for the duration of a block."""
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


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
