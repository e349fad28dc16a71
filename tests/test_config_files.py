"""Every stage's options round-trip through `--config FILE`: the same non-default values given as flags and
given in a TOML file build equal configs; a flag given beats the file; unknown keys and wrong types are
refused naming --config; a manifest replays its own stage only. Every option of every stage command is
covered, so a new command or option without values here fails. With no options given, a command builds
its config's defaults (the CLI has no defaults of its own)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bltool import options
from bltool.cli import app, main, parse_config
from bltool.configs import STAGE_CONFIGS, DistillConfig

# command → {TOML key: a value that is not the default}; `None` leaves an option at its default, for options
# that contradict another one given here (each says why).
VALUES: dict[str, dict] = {
    "prepare-data": {"inputs": ["a.txt", "b"], "tokenizer": "tok", "out": "o", "heldout": 0.1, "seq-len": 64,
                     "glob": "*.md", "text-field": "body", "id-field": "", "doc-sep": "<s>", "overwrite": True},
    "build-student": {"teacher": "t", "out": "o", "layers": 3, "mode": "last", "overwrite": True},
    "teacher-logits": {"teacher": "t", "data": "d", "out": "o", "tokens": "4k", "seed": 3, "top-k": 8,
                       "sample": None,  # not with --top-k
                       "temperature": 2.0, "batch-size": 3, "chunk": 16, "save-seconds": 1.5, "resume": True,
                       "dtype": "float32", "device": "cpu", "compile": True,
                       "overwrite": None},  # not with --resume
    "distill": {"student": "s", "data": "d", "out": "o", "teacher": "t",
                "method": None,  # budgeted-lora, the default: --budget needs it
                "tokens": "1.5k", "batch-size": 2, "grad-accum": 3, "lr": 0.001, "warmup": 0.1, "warmup-cap": 5,
                "grad-clip": 0.5, "temperature": 2.0, "kd-weight": 0.5, "rank": 4, "lora-alpha": 8.0,
                "lora-dropout": 0.0, "target-modules": ["q_proj", "v_proj"], "budget": 0.4, "decay-start": 0.2,
                "decay-end": 0.5, "rho-ema": 0.5, "tau-drop": 0.1, "seed": 7, "save-every": 10,
                "checkpoint-dir": "ck", "resume": True, "teacher-logits": "tl", "chunk": 64, "device": "cpu",
                "dtype": "float32", "compile": True, "activation-checkpointing": True, "eval-every": 5,
                "eval-tokens": "2k", "overwrite": True},
    "compress": {"model": "m", "out": "o", "tau-rank": 0.3, "tau-drop": 0.1, "tau-svd": 0.6, "k-max": 8,
                 "dense-fallback": False, "densify": True, "overwrite": True},
    "eval-ppl": {"model": "m", "data": "d", "out": "o", "max-tokens": 100, "batch-size": 2, "dtype": "float32",
                 "device": "cpu", "chunk": 32, "overwrite": True},
    "eval-icl": {"model": "m", "out": "o", "probes": ["builtin", "extra.json"], "tasks": "a,b", "n": 3, "shots": 2,
                 "seeds": 2, "batch-size": 4, "dtype": "float32", "device": "cpu", "overwrite": True},
    "eval-harness": {"model": "m", "tasks": ["arc_easy", "piqa"], "out": "o", "num-fewshot": 5, "limit": 0.5,
                     "batch-size": 2, "device": "cpu", "dtype": "float32", "include-path": "{tmp}",
                     "overwrite": True},
    "bench": {"model": "m", "baseline": "b", "out": "o", "device": "cpu", "dtype": "float32", "threads": 2,
              "kernel": "mm", "prefill-tokens": 64, "decode-batch": [1, 2], "decode-context": 16, "decode-steps": 4,
              "warmup": 1, "repeats": 3, "modules": False, "end-to-end": False, "engine": "vllm", "eager": True,
              "kv-cache-gib": 1.5, "concurrency": 4, "prompt-len": 32, "output-len": 8, "requests": 16,
              "overwrite": True},
    "bench-serving": {"model": "m", "out": "o", "chunk": 32, "concurrency": 2, "prompt-len": 24, "output-len": 6,
                      "requests": 8, "page-size": 32, "repeats": 1, "dtype": "float32", "device": "cpu",
                      "seed": 1, "engine": "vllm", "eager": True, "overwrite": True},
    "capacity": {"models": ["m1", "m2"], "gpu-mem": "2GiB", "workload": None,  # not with --prompt-len
                 "prompt-column": "p", "output-column": "o", "prompt-len": "uniform:8:40",
                 "output-len": "geometric:8", "samples": 100, "chunk": 32, "mem-util": 0.8,
                 "activation-reserve": "1MiB", "dtype": "float32", "rate": 2.0, "target-util": 0.5,
                 "iteration-time": 0.01, "iteration-stat": "mean", "prefill-tps": 100.0, "decode-tps": 50.0,
                 "max-seqs": 3, "validate": True, "validate-requests": 16, "page-size": 32, "seed": 2, "out": "o",
                 "overwrite": True},
    "report": {"runs": ["r1", "r2"], "out": "o", "title": "t", "note": "n", "readme": "README.md",
               "allow-mixed": True, "overwrite": True},
}
# Options a command needs beyond its required ones to make a valid config.
NEEDED = {"bench": {"baseline"}, "capacity": {"prompt-len", "output-len"}, "distill": {"teacher", "budget"}}


def _given(command: str, tmp_path: Path) -> dict:
    return {k: (v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v)
            for k, v in VALUES[command].items() if v is not None}


def _toml(value) -> str:
    return json.dumps(value)  # a JSON string, number, boolean or list of them is also TOML


def _write_toml(path: Path, values: dict) -> Path:
    path.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in values.items()), encoding="utf-8")
    return path


def _argv(command: str, values: dict) -> list[str]:
    """The same values as a command line, spelled as each option takes them."""
    leaves = {leaf.name.replace("_", "-"): leaf for leaf in options.leaves(STAGE_CONFIGS[command])}
    positional, flags = [], []
    for key, value in values.items():
        leaf = leaves[key]
        if leaf.spec.argument:
            positional += value if isinstance(value, list) else [value]
        elif isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list) and leaf.spec.multiple:
            for item in value:
                flags += [f"--{key}", item]
        elif isinstance(value, list):
            flags += [f"--{key}", ",".join(str(v) for v in value)]
        else:
            flags += [f"--{key}", str(value)]
    return [command, *positional, *flags]


def _stage_commands() -> set[str]:
    return {info.name or info.callback.__name__ for info in app.registered_commands} - {"teachers"}


def test_every_stage_command_and_option_is_covered():
    assert _stage_commands() == set(STAGE_CONFIGS) == set(VALUES)
    for command, config_class in STAGE_CONFIGS.items():
        names = {leaf.name.replace("_", "-") for leaf in options.leaves(config_class)}
        assert set(VALUES[command]) == names, (command, names ^ set(VALUES[command]))


@pytest.mark.parametrize("command", sorted(VALUES))
def test_flags_and_config_file_build_the_same_config(command, tmp_path):
    values = _given(command, tmp_path)
    from_flags = parse_config(_argv(command, values))
    from_file = parse_config([command, "--config", str(_write_toml(tmp_path / "c.toml", values))])
    assert from_flags == from_file
    # and every value given is not the default, so the comparison sees each option arrive
    config_class = STAGE_CONFIGS[command]
    defaults = {leaf.name: leaf.default for leaf in options.leaves(config_class)}
    built = options.record(from_file)
    for key in values:
        name = key.replace("-", "_")
        default = list(defaults[name]) if isinstance(defaults[name], tuple) else defaults[name]
        assert built[name] != default, (command, key)


@pytest.mark.parametrize("command", sorted(VALUES))
def test_without_options_a_command_builds_its_configs_defaults(command, tmp_path):
    """The CLI has no defaults of its own: given only what is required, the config holds its fields' defaults."""
    config_class = STAGE_CONFIGS[command]
    leaves = {leaf.name: leaf for leaf in options.leaves(config_class)}
    needed = {name.replace("_", "-") for name, leaf in leaves.items() if leaf.required} | NEEDED.get(command, set())
    values = {k: v for k, v in _given(command, tmp_path).items() if k in needed}
    built = parse_config(_argv(command, values))
    expected = options.build(config_class, {k.replace("-", "_"): options.cli_value(leaves[k.replace("-", "_")], v, "")
                                            for k, v in values.items()})
    assert built == expected
    for leaf in options.leaves(config_class):  # a parsed field's default as typed is its default
        if leaf.spec.text is not None:
            assert leaf.spec.parser(leaf.spec.text, leaf.flag) == leaf.default, leaf.name


def test_a_flag_given_beats_the_file(tmp_path):
    path = _write_toml(tmp_path / "c.toml", {"batch-size": 4, "tokens": "4k", "compile": True})
    base = ["distill", "--student", "s", "--data", "d", "--out", "o", "--teacher", "t", "--budget", "0.5"]
    config = parse_config([*base, "--batch-size", "2", "--config", str(path)])
    assert config.batch_size == 2 and config.tokens == 4000 and config.compile
    assert parse_config([*base, "--config", str(path)]).batch_size == 4


@pytest.mark.parametrize("text, needles", [
    ("bogus = 1\n", ["unknown key 'bogus'", "--bogus"]),
    ('batch-size = "four"\n', ["batch-size must be an integer", "'four'"]),
    ("batch-size = 2.5\n", ["batch-size must be an integer"]),
    ("compile = 1\n", ["compile must be true or false"]),
    ('tokens = "lots"\n', ["tokens", "--tokens must be a count"]),
    ("target-modules = [1, 2.5]\n", ["target-modules"]),
    ("batch-size = \n", ["not valid TOML"]),
])
def test_a_bad_config_file_is_one_line_naming_config_and_the_key(text, needles, tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(typer.BadParameter, match="--config|bad.toml"):
        parse_config(["distill", "--config", str(path)])
    monkeypatch.setattr("sys.argv", ["bltool", "distill", "--student", "s", "--config", str(path)])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'--config'" in lines[0] and str(path) in lines[0], lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_manifest_replays_its_own_stage_only_and_never_its_output(tmp_path):
    config = options.from_flags(DistillConfig, student="s", data="d", out="runs/x", teacher="t", method="kd-lora",
                                rank=4, tokens=640, resume=True, checkpoint_dir="ck", overwrite=True)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"stage": "distill", "config": config.record()}), encoding="utf-8")
    replayed = parse_config(["distill", "--config", str(manifest), "--out", "runs/y"])
    flat = {**config.record(), "target_modules": config.lora.target_modules}
    assert replayed == options.from_flags(DistillConfig, **{**flat, "out": "runs/y", "resume": False,
                                                            "checkpoint_dir": None, "overwrite": False})
    result = CliRunner().invoke(app, ["distill", "--config", str(manifest)])  # --out is not taken from it
    assert result.exit_code == 2 and "Missing option '--out'" in result.stderr
    result = CliRunner().invoke(app, ["compress", "--config", str(manifest), "--out", "o"])
    assert result.exit_code == 2
    assert "a manifest of `bltool distill`, not of `bltool compress`" in " ".join(result.stderr.split())


def test_the_config_layers_copies_agree_with_the_components():
    """bltool.configs holds a few constants of heavy components (so the CLI starts without torch or numpy)."""
    from bltool import configs
    from bltool.adapt.lowrank import KERNELS
    from bltool.models.layer_selection import MODE_ALIASES, MODES
    from bltool.serve.engines import ENGINES
    from bltool.serve.queueing import DTYPE_BYTES
    from bltool.train.teacher_cache import MAX_SAMPLES

    assert configs.KERNELS == KERNELS
    assert (configs.MODES, configs.MODE_ALIASES) == (MODES, MODE_ALIASES)
    assert configs.KV_DTYPES == tuple(DTYPE_BYTES) and configs.MAX_SAMPLES == MAX_SAMPLES
    assert configs.ENGINES == tuple(ENGINES)
