"""eval-icl on the real SmolLM2-135M teacher (installed by `make test`): it must do well above zero on
capitalize_first_letter and choose_first_of_3 under the 10-shot protocol.

Marked `real`; deselect with `-m "not real"`. Outside CI a missing teacher skips; in CI (CI=true) it fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bltool.cli import app

pytestmark = pytest.mark.real


def test_teacher_scores_well_above_zero(tmp_path, real_home):
    args = ["eval-icl", "smollm2-135m", "--tasks", "capitalize_first_letter,choose_first_of_3", "--n", "8",
            "--seeds", "1", "--out", str(tmp_path / "icl")]
    result = CliRunner().invoke(app, args, env={"BLTOOL_HOME": str(real_home)})
    assert result.exit_code == 0, result.stderr
    data = json.loads((Path(result.stdout.strip()) / "result.json").read_text())
    assert data["protocol"]["shots"] == 10
    for name in ("capitalize_first_letter", "choose_first_of_3"):
        task = data["tasks"][name]
        assert task["mean"] >= 0.5 and task["mean"] >= task["chance"] + 0.3, (name, task)
