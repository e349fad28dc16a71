"""build-student (docs/method.md §1): the student is exactly the chosen teacher layers plus embeddings, final
norm and LM head, saved as a plain Hugging Face checkpoint whose KV cache is addressed correctly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_refused, distilled_student, save_tiny_model, tiny_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from bltool.artifacts import read_manifest
from bltool.cli import app
from bltool.models.families import FAMILIES
from bltool.models.loading import load_model, resolve_model, tokenizer_identity
from bltool.stages.build_student import BuildStudentConfig, run, student_config

MIXED_6_OF_12 = [0, 2, 4, 7, 9, 11]
QWEN2_LAYER_TYPES = ["sliding_attention" if i % 3 == 1 else "full_attention" for i in range(12)]
PROMPT = "the model river house green teacher"


def save_sliding_qwen2(path: Path, tokenizer) -> Path:
    """A tiny Qwen2 whose layers mix full and sliding-window (8) attention, with random biases."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2", len(tokenizer), 12, tied=False)
    config.use_sliding_window = True
    config.sliding_window = 8
    config.layer_types = list(QWEN2_LAYER_TYPES)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teachers(tiny_llama, tiny_mistral, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A 12-layer teacher of every family: the tiny Llama (tied embeddings), the tiny Mistral (untied), a Qwen2
    mixing sliding-window and full attention, and for any other family a plain untied one."""
    qwen2 = save_sliding_qwen2(tmp_path_factory.mktemp("qwen2") / "teacher", tokenizer)
    known = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": qwen2}
    return {model_type: known.get(model_type) or save_tiny_model(tmp_path_factory.mktemp(model_type) / "teacher",
                                                                 tokenizer, model_type, 12, tied=False, seed=1)
            for model_type in FAMILIES}


@pytest.fixture(scope="module")
def build(teachers, tmp_path_factory):
    """build(arch, layers, mode) → (student dir, teacher dir), each student built once per module."""
    root = tmp_path_factory.mktemp("students")
    cache: dict[tuple, Path] = {}

    def _build(arch: str, layers: int = 6, mode: str = "mixed"):
        key = (arch, layers, mode)
        if key not in cache:
            out = root / f"{arch}-{layers}-{mode}"
            assert run(BuildStudentConfig(teacher=str(teachers[arch]), out=str(out), layers=layers, mode=mode)) == out
            cache[key] = out
        return cache[key], teachers[arch]

    return _build


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def prompt_ids(path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(PROMPT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4
    return torch.tensor([ids])


class Skip(torch.nn.Module):
    """Stands in for a teacher layer the student does not keep."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


OTHER_MODES = [(4, "last", [8, 9, 10, 11]), (3, "middle", [4, 5, 6]), (5, "truncated", [0, 1, 2, 3, 4])]
# every family: 6 of 12 layers mixed, and one other mode (the families take the others in turn)
CASES = ([(arch, 6, "mixed", MIXED_6_OF_12) for arch in FAMILIES]
         + [(arch, *OTHER_MODES[i % len(OTHER_MODES)]) for i, arch in enumerate(FAMILIES)])


@pytest.mark.parametrize(("arch", "layers", "mode", "indices"), CASES)
def test_tensors_are_the_chosen_teacher_layers(build, arch, layers, mode, indices):
    student_dir, teacher_dir = build(arch, layers, mode)
    family = FAMILIES[arch]
    student = load_file(student_dir / "model.safetensors")
    teacher = load_file(teacher_dir / "model.safetensors")
    expected = {}
    for key, tensor in teacher.items():
        if key.startswith(f"{family.layers}."):
            index, rest = key[len(family.layers) + 1:].split(".", 1)
            if int(index) in indices:
                expected[f"{family.layers}.{indices.index(int(index))}.{rest}"] = tensor
        else:
            expected[key] = tensor
    assert sorted(student) == sorted(expected)
    for key, tensor in expected.items():
        assert student[key].dtype == tensor.dtype, key
        assert torch.equal(student[key], tensor), key
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert torch.equal(student["model.norm.weight"], teacher["model.norm.weight"])
    if "lm_head.weight" not in teacher:  # tied: the LM head is the embedding, in the teacher and the student
        assert "lm_head.weight" not in student
    else:
        assert torch.equal(student["lm_head.weight"], teacher["lm_head.weight"])
        assert not torch.equal(student["lm_head.weight"], student["model.embed_tokens.weight"])
    assert {k for k in student if k.endswith(".bias")} == {
        f"{family.layers}.{j}.{p}.bias" for j in range(layers) for p in family.biases}


@pytest.mark.parametrize(("arch", "layers", "mode", "indices"), CASES)
def test_reloads_with_plain_transformers(build, arch, layers, mode, indices):
    from transformers import AutoTokenizer

    student_dir, teacher_dir = build(arch, layers, mode)
    student, info = load(student_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    teacher, _ = load(teacher_dir)
    assert student.config.model_type == teacher.config.model_type == arch
    student_layers = student.get_submodule(FAMILIES[arch].layers)
    assert student.config.num_hidden_layers == layers == len(student_layers)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "tie_word_embeddings", "rope_parameters", "rms_norm_eps"):
        assert getattr(student.config, key) == getattr(teacher.config, key), key
    for j, layer in enumerate(student_layers):
        assert layer.self_attn.layer_idx == j
    # in memory too: the head is (tied to) the teacher's
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    if teacher.config.tie_word_embeddings:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    saved = json.loads((student_dir / "config.json").read_text())
    assert saved["num_hidden_layers"] == layers

    student_tok = AutoTokenizer.from_pretrained(student_dir)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    assert tokenizer_identity(student_tok) == tokenizer_identity(teacher_tok)
    text = "Ünïcode café — the teacher"
    assert student_tok(text)["input_ids"] == teacher_tok(text)["input_ids"]


@pytest.mark.parametrize(("arch", "layers", "mode", "indices"), CASES)
def test_manifest_records_teacher_and_layers(build, arch, layers, mode, indices):
    from transformers import AutoTokenizer

    student_dir, teacher_dir = build(arch, layers, mode)
    manifest = read_manifest(student_dir, ("build-student",))
    assert manifest["stage"] == "build-student"
    assert manifest["student"]["teacher_layers"] == indices
    assert manifest["student"]["layers"] == layers
    assert manifest["student"]["mode"] == ("first" if mode == "truncated" else mode)
    assert manifest["teacher"]["layers"] == 12 and manifest["teacher"]["model_type"] == arch
    assert manifest["config"]["teacher"] == str(teacher_dir)
    (teacher_input,) = manifest["inputs"]
    assert teacher_input["role"] == "teacher" and teacher_input["path"] == str(teacher_dir)
    assert teacher_input["kind"] == "dir"
    assert len(teacher_input["content"]["model.safetensors"]) == 64
    identity = tokenizer_identity(AutoTokenizer.from_pretrained(teacher_dir))
    assert manifest["tokenizer"]["fingerprint"] == identity["fingerprint"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])


@pytest.mark.parametrize(("arch", "layers", "mode", "indices"), CASES)
def test_logits_equal_teacher_with_other_layers_skipped(build, arch, layers, mode, indices):
    """Independent reference: the teacher itself, its dropped layers replaced by the identity (each kept
    layer keeps its own attention type), computes what the student must compute."""
    student_dir, teacher_dir = build(arch, layers, mode)
    student, _ = load(student_dir)
    teacher, _ = load(teacher_dir)
    parent, _, name = FAMILIES[arch].layers.rpartition(".")
    setattr(teacher.get_submodule(parent), name, torch.nn.ModuleList(
        [layer if i in indices else Skip() for i, layer in enumerate(teacher.get_submodule(FAMILIES[arch].layers))]
    ))
    ids = torch.randint(1, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(ids, use_cache=False).logits
        got = student(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_cached_generation_equals_uncached_greedy_loop(build, arch):
    student_dir, _ = build(arch)
    student, _ = load(student_dir)
    student.generation_config.eos_token_id = None  # always generate the full length
    student.generation_config.pad_token_id = 0
    prompt = prompt_ids(student_dir)
    new_tokens = 20  # prompt + new tokens is longer than qwen2's sliding window (8)
    with torch.no_grad():
        generated = student.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            return_dict_in_generate=True, output_logits=True,
        )
        ids = prompt
        step_logits = []
        for _ in range(new_tokens):
            logits = student(ids, use_cache=False).logits[:, -1]
            step_logits.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert generated.sequences.tolist() == ids.tolist()
    for cached, plain in zip(generated.logits, step_logits, strict=True):
        torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_full_depth_first_student_is_the_teacher(build, arch):
    student_dir, teacher_dir = build(arch, 12, "first")
    student, _ = load(student_dir)
    teacher, _ = load(teacher_dir)
    ids = prompt_ids(student_dir).repeat(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=1e-6)
    if arch == "qwen2":
        assert student.config.layer_types == QWEN2_LAYER_TYPES


@pytest.mark.parametrize(("layers", "mode", "indices"),
                         [(6, "mixed", MIXED_6_OF_12), (4, "last", [8, 9, 10, 11]), (5, "first", [0, 1, 2, 3, 4])])
def test_layer_types_are_cut(build, layers, mode, indices):
    student_dir, teacher_dir = build("qwen2", layers, mode)
    teacher_types = json.loads((teacher_dir / "config.json").read_text())["layer_types"]
    assert teacher_types == QWEN2_LAYER_TYPES
    saved = json.loads((student_dir / "config.json").read_text())
    assert saved["layer_types"] == [QWEN2_LAYER_TYPES[i] for i in indices]
    student, _ = load(student_dir)
    assert student.config.layer_types == [QWEN2_LAYER_TYPES[i] for i in indices]
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [
        8 if QWEN2_LAYER_TYPES[i] == "sliding_attention" else None for i in indices
    ]


def test_student_config_cuts_explicit_layer_types_and_leaves_teacher_alone():
    config = tiny_config("llama", 300, 12, tied=True)
    config.layer_types = [f"type{i}" for i in range(12)]
    cut = student_config(config, MIXED_6_OF_12)
    assert cut.num_hidden_layers == 6
    assert cut.layer_types == ["type0", "type2", "type4", "type7", "type9", "type11"]
    assert config.num_hidden_layers == 12 and config.layer_types == [f"type{i}" for i in range(12)]
    assert cut.hidden_size == config.hidden_size and cut.vocab_size == config.vocab_size
    plain = student_config(tiny_config("llama", 300, 12, tied=True), [1, 5])
    assert plain.num_hidden_layers == 2 and getattr(plain, "layer_types", None) is None


# ---------------------------------------------------------------------------------------------------
# The command line


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_nothing_left(parent: Path, expected: set[str]):
    assert {p.name for p in parent.iterdir()} == expected


@pytest.fixture
def bin_only_teacher(tmp_path, tiny_llama) -> Path:
    teacher = tmp_path / "bin-teacher"
    teacher.mkdir()
    for file in tiny_llama.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, teacher / file.name)
    torch.save(load_file(tiny_llama / "model.safetensors"), teacher / "pytorch_model.bin")
    return teacher


@pytest.fixture
def truncated_teacher(tmp_path, tiny_llama) -> Path:
    teacher = tmp_path / "cut-teacher"
    shutil.copytree(tiny_llama, teacher)
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 1000)
    return teacher


def test_cli_success_prints_only_the_output_path(tmp_path, tiny_llama):
    out = tmp_path / "runs" / "student"
    result = invoke("build-student", "--teacher", str(tiny_llama), "--out", str(out), "--layers", "3",
                    "--mode", "last")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert "[9, 10, 11]" in result.stderr
    assert read_manifest(out, ("build-student",))["student"]["teacher_layers"] == [9, 10, 11]
    assert_nothing_left(out.parent, {"student"})


def test_cli_refuses_existing_output_then_overwrites(tmp_path, tiny_llama):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("build-student", "--teacher", str(tiny_llama), "--out", str(out), "--layers", "2")
    assert_refused(result, "--out", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only an earlier build-student output, never a folder of the user's
    result = invoke("build-student", "--teacher", str(tiny_llama), "--out", str(out), "--layers", "2", "--overwrite")
    assert_refused(result, "--out", "--overwrite", "not a bltool output")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert invoke("build-student", "--teacher", str(tiny_llama), "--out", str(out), "--layers", "3").exit_code == 0
    result = invoke("build-student", "--teacher", str(tiny_llama), "--out", str(out), "--layers", "2", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert read_manifest(out, ("build-student",))["student"]["teacher_layers"] == [0, 11]
    assert_nothing_left(tmp_path, {"student"})


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("layers-13", ["--layers", "13", "12"]),
        ("layers-0", ["--layers", "0"]),
        ("layers-negative", ["--layers"]),
        ("unknown-mode", ["--mode", "sideways"]),
        ("unknown-alias", ["--teacher", "no-such-teacher", "smollm2-135m"]),
        ("missing-path", ["--teacher", "does-not-exist", "does not exist"]),
        ("truncated", ["--teacher", "model.safetensors", "truncated"]),
        ("bin-only", ["--teacher", "pytorch_model.bin", "safetensors"]),
        ("no-config", ["--teacher", "config.json"]),
    ],
)
def test_cli_bad_inputs(case, needles, tmp_path, tiny_llama, request):
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "student"
    teacher, layers, mode = str(tiny_llama), "6", "mixed"
    if case == "layers-13":
        layers = "13"
    elif case == "layers-0":
        layers = "0"
    elif case == "layers-negative":
        layers = "-2"
    elif case == "unknown-mode":
        mode = "sideways"
    elif case == "unknown-alias":
        teacher = "no-such-teacher"
    elif case == "missing-path":
        teacher = str(tmp_path / "does-not-exist" / "teacher")
    elif case == "truncated":
        teacher = str(request.getfixturevalue("truncated_teacher"))
    elif case == "bin-only":
        teacher = str(request.getfixturevalue("bin_only_teacher"))
    elif case == "no-config":
        (tmp_path / "empty").mkdir()
        teacher = str(tmp_path / "empty")
    result = invoke("build-student", "--teacher", teacher, "--out", str(out), "--layers", layers, "--mode", mode)
    assert_refused(result, *needles)
    assert_nothing_left(runs, set())


def test_cli_missing_required_options_is_usage_error(tmp_path):
    result = invoke("build-student", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2
    assert "--teacher" in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("arch", list(FAMILIES))  # qwen2: q/k/v biases, which the merge scales by ρ
@pytest.mark.parametrize("form", ["distilled", "compressed"])
def test_a_bltool_student_as_teacher_is_the_plain_model_it_computes(form, arch, tmp_path, teachers):
    """A distilled (adapters: ρ ∈ {0, 0.3, 1}, gates) or compressed (low-rank layers) student as --teacher: merged
    into a plain checkpoint, so a full-depth `first` student computes what bltool.load_model's teacher does."""
    teacher, _ = distilled_student(tmp_path / "distilled", teachers[arch], rhos=(0.0, 0.3, 1.0))
    if form == "compressed":
        done = invoke("compress", str(teacher), "--out", str(tmp_path / "compressed"), "--no-dense-fallback")
        assert done.exit_code == 0, done.stderr
        teacher = tmp_path / "compressed"
        assert any(m["layout"] == "lowrank" for m in read_manifest(teacher)["compressed"]["modules"])
    out = tmp_path / "student"
    result = invoke("build-student", "--teacher", str(teacher), "--out", str(out), "--layers", "12", "--mode", "first")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == arch
    assert read_manifest(out, ("build-student",))["teacher"]["merged_modules"] > 0
    student, _ = load(out)  # plain transformers
    reference = load_model(resolve_model(str(teacher)))
    ids = torch.randint(1, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert invoke("build-student", "--teacher", str(teacher), "--out", str(tmp_path / "s6")).exit_code == 0
