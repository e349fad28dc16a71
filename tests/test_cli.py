"""The command line as a shell sees it: usage errors are one line and exit 2; `--help` and a bad flag
are answered without importing torch or transformers (which take seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case is a fresh interpreter

PROBE = """
import sys
sys.argv = ["bltool", *sys.argv[1:]]
from bltool.cli import main
try:
    main()
except SystemExit as stop:
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    print("exit", stop.code, "imported", heavy, file=sys.stdout)
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["distill", "--bogus"], "No such option: --bogus"),
    (["distill"], "Missing option '--student'"),
    (["compress", "x", "--out", "y", "--tau-rank", "abc"], "'--tau-rank'"),
    (["frobnicate"], "No such command"),
])
def test_usage_errors_are_one_line_exit_2_and_light(args, needle):
    done = _run(*args)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], done.stderr
    assert "--help" in lines[0]
    assert done.stdout.strip().endswith("exit 2 imported []"), done.stdout


def test_help_and_version_import_neither_torch_nor_transformers():
    for args in (["--help"], ["distill", "--help"], ["--version"]):
        done = _run(*args)
        assert done.stdout.strip().endswith("exit 0 imported []"), (args, done.stdout[-500:], done.stderr)
    assert "--budget" in _run("distill", "--help").stdout
