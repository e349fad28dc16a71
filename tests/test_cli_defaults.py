"""Every CLI default equals its stage config's default, so `bltool X` and `run(XConfig(...))` do the same
thing. Options are matched to config fields by name; the few that the CLI parses (counts, sizes, lists)
are compared after parsing, exactly as the command does it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from bltool.cli import app
from bltool.stages.bench import BenchConfig
from bltool.stages.bench_serving import BenchServingConfig
from bltool.stages.build_student import BuildStudentConfig
from bltool.stages.capacity import CapacityConfig
from bltool.stages.compress import CompressConfig
from bltool.stages.distill import DistillConfig
from bltool.stages.eval_harness import EvalHarnessConfig
from bltool.stages.eval_icl import EvalIclConfig
from bltool.stages.eval_ppl import EvalPplConfig
from bltool.stages.prepare_data import PrepareDataConfig
from bltool.stages.report import ReportConfig
from bltool.stages.teacher_logits import TeacherLogitsConfig
from bltool.units import parse_bytes, parse_count, parse_int_list, parse_names

CONFIGS = {
    "prepare-data": (PrepareDataConfig,),
    "build-student": (BuildStudentConfig,),
    "eval-ppl": (EvalPplConfig,),
    "eval-icl": (EvalIclConfig,),
    "eval-harness": (EvalHarnessConfig,),
    "distill": (DistillConfig,),
    "teacher-logits": (TeacherLogitsConfig,),
    "capacity": (CapacityConfig,),
    "compress": (CompressConfig,),
    # `bench --serving` (deprecated) builds the second
    "bench": (BenchConfig, BenchServingConfig),
    "bench-serving": (BenchServingConfig,),
    "report": (ReportConfig,),
}
# (command, option) → (config field, how the command turns the option into the field's value)
PARSED = {
    ("distill", "tokens"): ("tokens", lambda v: parse_count(v, "--tokens")),
    ("teacher-logits", "tokens"): ("tokens", lambda v: parse_count(v, "--tokens")),
    ("distill", "eval_tokens"): ("eval_tokens", lambda v: parse_count(v, "--eval-tokens")),
    ("distill", "target_modules"): ("target_modules", parse_names),
    ("capacity", "activation_reserve"): ("activation_reserve", lambda v: parse_bytes(v, "--activation-reserve")),
    ("bench", "decode_batch"): ("decode_batch", lambda v: parse_int_list(v, "--decode-batch")),
    ("eval-icl", "probes"): ("probes", lambda v: tuple(v or ("builtin",))),
    ("prepare-data", "id_field"): ("id_field", lambda v: v or None),
}
# Options that choose which config to build rather than set a field.
CLI_ONLY = {("bench", "serving"), ("bench", "repeats")}


def _commands():
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        if name in CONFIGS:
            yield name, info.callback


def _field_defaults(config_cls) -> dict:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_every_stage_command_is_covered():
    assert {name for name, _ in _commands()} == set(CONFIGS)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_cli_defaults_equal_config_defaults(command):
    callback = dict(_commands())[command]
    configs = [_field_defaults(cls) for cls in CONFIGS[command]]
    fields = [{f.name for f in dataclasses.fields(cls)} for cls in CONFIGS[command]]
    compared = 0
    for name, param in inspect.signature(callback).parameters.items():
        if param.default is inspect.Parameter.empty or (command, name) in CLI_ONLY:
            continue  # a required option or argument
        field, convert = PARSED.get((command, name), (name, lambda v: v))
        owners = [i for i, names in enumerate(fields) if field in names]
        assert owners, f"bltool {command} --{name.replace('_', '-')} sets no field of {CONFIGS[command]}"
        for i in owners:
            if field in configs[i]:
                assert convert(param.default) == configs[i][field], (command, name)
                compared += 1
    assert compared >= 3


def test_the_check_catches_a_drifted_default(monkeypatch):
    """Break one config default and the comparison above must notice."""
    spec = [(f.name, f.type) if f.default is dataclasses.MISSING else
            (f.name, f.type, dataclasses.field(default=0.25 if f.name == "tau_rank" else f.default))
            for f in dataclasses.fields(CompressConfig)]
    monkeypatch.setitem(CONFIGS, "compress", (dataclasses.make_dataclass("Drifted", spec),))
    with pytest.raises(AssertionError, match="tau_rank"):
        test_cli_defaults_equal_config_defaults("compress")
