"""Domain errors. The library raises these; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class BltoolError(Exception):
    """A failure the user can act on. Exit code 1 (a runtime failure)."""

    exit_code = 1


class UsageError(BltoolError):
    """Bad input: a flag, a path, an alias, or artifacts that do not belong together. Exit code 2."""

    exit_code = 2


class ArtifactError(UsageError):
    """An input artifact is missing, corrupt, or was made by another stage than expected."""


class Interrupted(BltoolError):
    """A run stopped by SIGTERM / SIGINT after writing a checkpoint. Exit code 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
