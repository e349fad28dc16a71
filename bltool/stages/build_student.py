"""build-student: copy chosen teacher layers, plus embeddings, final norm and LM head, into a smaller
model that is a plain Hugging Face checkpoint (docs/method.md §1). A teacher that bltool made (a distilled
or compressed student) is first made the plain model computing the same function.

The student is built from a copy of the teacher's config (layers renumbered as §1 says), and the chosen
teacher layers' weights are then loaded into it under their new indices, strictly.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

from bltool import ui
from bltool.adapt.compression import as_dense
from bltool.artifacts import Stage, atomic_output, check_output_dir, write_manifest
from bltool.configs import BuildStudentConfig
from bltool.models.families import FAMILIES
from bltool.models.layer_selection import select_layers
from bltool.models.loading import (
    count_parameters,
    load_model,
    load_tokenizer,
    model_content_hash,
    model_inputs,
    resolve_model,
    tokenizer_identity,
)
from bltool.models.weights import quiet_transformers

PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


def student_config(teacher_config, indices: list[int]):
    """The teacher's config for n = len(indices) layers, per-layer lists cut to the chosen layers."""
    config = copy.deepcopy(teacher_config)
    n_teacher = teacher_config.num_hidden_layers
    config.num_hidden_layers = len(indices)
    for key in PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n_teacher:
            setattr(config, key, [value[i] for i in indices])
    return config


def student_state_dict(teacher_state: dict, indices: list[int], layers: str) -> dict:
    """Teacher tensors renamed for the student: layer indices[j] → layer j, other layers dropped. `layers`
    is the decoder layers' prefix (the family's `layers`)."""
    position = {teacher_index: j for j, teacher_index in enumerate(indices)}
    state = {}
    for key, tensor in teacher_state.items():
        index, _, rest = key[len(layers) + 1:].partition(".") if key.startswith(f"{layers}.") else ("", "", "")
        if not (index.isdigit() and rest):
            state[key] = tensor
        elif int(index) in position:
            state[f"{layers}.{position[int(index)]}.{rest}"] = tensor
    return state


def run(config: BuildStudentConfig) -> Path:
    check_output_dir(Path(config.out), config.overwrite, stage=Stage.BUILD_STUDENT,
                     inputs=model_inputs("--teacher", config.teacher))
    teacher_ref = resolve_model(config.teacher, flag="--teacher")
    teacher = load_model(teacher_ref, flag="--teacher")
    merged = as_dense(teacher)  # a distilled or compressed teacher: the plain model computing the same function
    tokenizer = load_tokenizer(teacher_ref, flag="--teacher")
    n_teacher = teacher.config.num_hidden_layers
    indices = select_layers(n_teacher, config.layers, config.mode)

    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        student = AutoModelForCausalLM.from_config(student_config(teacher.config, indices), dtype=teacher.dtype)
    layers = FAMILIES[teacher.config.model_type].layers  # load_model refused any other type; as_dense made it plain
    student.load_state_dict(student_state_dict(teacher.state_dict(), indices, layers), strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.eval()

    with atomic_output(Path(config.out), config.overwrite) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(
            tmp,
            Stage.BUILD_STUDENT,
            config=asdict(config),
            inputs=[{"role": "teacher", **teacher_ref.describe(), "content": model_content_hash(teacher_ref)}],
            teacher={"layers": n_teacher, "parameters": count_parameters(teacher), "model_type":
                     teacher.config.model_type, "merged_modules": merged},
            student={"layers": len(indices), "teacher_layers": indices, "mode": config.mode,
                     "parameters": count_parameters(student), "dtype": str(student.dtype).replace("torch.", "")},
            tokenizer=tokenizer_identity(tokenizer),
        )
    ui.info(f"student: teacher layers {indices} of {n_teacher} ({count_parameters(student):,} parameters)")
    return Path(config.out)

