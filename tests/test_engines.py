"""The engine table (bltool/serve/engines.py): what each engine's page size is, that an unknown engine is
refused in one line naming the table's engines, by every command that takes --engine, and that the
server capacity --validate makes again from a measurement is the engine's, behind the server protocol."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from bltool.cli import app
from bltool.errors import UsageError
from bltool.models.loading import resolve_model
from bltool.serve.engines import ENGINES, Server, engine, measured_engine
from bltool.serve.serving import TransformersServer


def test_page_sizes():
    transformers, vllm = engine("transformers"), engine("vllm")
    assert transformers.page_size(0, "cpu") == transformers.page_size(0, "cuda") == 16
    assert transformers.page_size(24, "cpu") == 24
    # vLLM's own defaults: 16 on CUDA; 128 on the CPU, whose attention takes multiples of 32 only
    assert vllm.page_size(0, "cuda:0") == 16 and vllm.page_size(0, "cpu") == 128
    assert vllm.page_size(48, "cuda") == 48 and vllm.page_size(64, "cpu") == 64
    with pytest.raises(UsageError, match="--page-size: vLLM's CPU attention takes pages of a multiple of 32"):
        vllm.page_size(48, "cpu")


def test_unknown_engine_is_refused_naming_the_table():
    with pytest.raises(UsageError) as err:
        engine("tgi")
    assert str(err.value) == "--engine must be one of transformers, vllm, got 'tgi'"
    assert list(ENGINES) == ["transformers", "vllm"]
    # a measurement from before --engine was made on transformers
    assert measured_engine({}) is ENGINES["transformers"]
    assert measured_engine({"engine": "vllm"}) is ENGINES["vllm"]


@pytest.mark.parametrize("command", [["bench", "m", "--baseline", "b"], ["bench-serving", "m"]])
def test_every_command_refuses_an_unknown_engine_in_one_line(command, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*command, "--engine", "tgi", "--out", str(out)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: --engine must be one of transformers, vllm, got 'tgi'"]
    assert not out.exists()


def test_bench_warns_that_transformers_options_do_not_apply_to_vllm(tmp_path):
    """The warning comes from the stage, before vLLM is looked for."""
    result = CliRunner().invoke(app, ["bench", "m", "--baseline", "b", "--engine", "vllm", "--threads", "2",
                                      "--out", str(tmp_path / "out")])
    assert "warning: --threads, --kernel and --no-modules apply to --engine transformers only" in result.stderr


def test_the_measured_server_is_made_again(tiny_llama):
    """capacity --validate: a transformers measurement gives transformers' server on the measured device and
    dtype, which follows the server protocol."""
    ref = resolve_model(str(tiny_llama))
    measured = {"device": "cpu", "dtype": "bfloat16"}
    server = measured_engine(measured).measured_server(ref, measured, None, 64)
    assert isinstance(server, TransformersServer) and isinstance(server, Server)
    assert server.vocab_size == server.config.vocab_size and server.describe()["engine"] == "transformers"
    assert next(server.model.parameters()).dtype == torch.bfloat16
    server.close()
