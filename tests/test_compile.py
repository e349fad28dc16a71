"""`distill --compile` and `teacher-logits --compile`: regional torch.compile (inductor) of the decoder layers
(the student's and the live teacher's): the teacher's cached rows and the layers compiled. That a compiled
student recompiles only when a module stops its dense matmul, not as ρ moves: tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model, write_corpus

from bltool.options import from_flags
from bltool.stages import distill
from bltool.stages.build_student import BuildStudentConfig
from bltool.stages.build_student import run as build_student
from bltool.stages.prepare_data import PrepareDataConfig
from bltool.stages.prepare_data import run as prepare_data
from bltool.stages.teacher_logits import TeacherLogitsConfig
from bltool.stages.teacher_logits import run as teacher_logits
from bltool.train import distributed
from bltool.train.teacher_cache import TeacherCache

pytestmark = pytest.mark.slow


def test_teacher_logits_compile_stores_the_eager_rows(tmp_path, tokenizer):
    """`teacher-logits --compile`: the teacher's layers are compiled and the cache holds the eager run's top-k
    (the same ids, logits within float tolerance)."""


    torch._dynamo.reset()
    teacher = save_tiny_model(tmp_path / "teacher", tokenizer, "llama", layers=2, tied=True, seed=5)
    corpus = write_corpus(tmp_path / "corpus", n_docs=30, seed=2)
    data = prepare_data(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(teacher), out=str(tmp_path / "data"),
                                          heldout=0.2, seq_len=32))
    caches = {}
    for compiled in (False, True):
        caches[compiled] = TeacherCache.open(teacher_logits(TeacherLogitsConfig(
            teacher=str(teacher), data=str(data), out=str(tmp_path / f"cache-{compiled}"), tokens=6 * 32, top_k=5,
            batch_size=2, device="cpu", compile=compiled)))
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run did compile
    eager, compiled = caches[False], caches[True]
    assert eager.sequences() == compiled.sequences()
    for s in eager.sequences():
        e, c = eager.batch([s], 32, "cpu"), compiled.batch([s], 32, "cpu")
        for x, y in zip(e, c):
            # the cache stores float16: a float32 difference of 1e-6 can flip the rounding by one float16 step
            # (2⁻¹⁰ relative), so the two runs agree to one step of the stored type, not closer
            torch.testing.assert_close(y, x, rtol=2**-10, atol=1e-4)


def test_distill_compile_compiles_the_live_teacher_too(tmp_path, tokenizer):


    teacher = save_tiny_model(tmp_path / "teacher", tokenizer, "llama", layers=3, tied=True, seed=5)
    corpus = write_corpus(tmp_path / "corpus", n_docs=30, seed=2)
    data = prepare_data(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(teacher), out=str(tmp_path / "data"),
                                          heldout=0.2, seq_len=32))
    student = build_student(BuildStudentConfig(teacher=str(teacher), out=str(tmp_path / "student"), layers=2))
    for compiled in (False, True):
        config = from_flags(distill.DistillConfig, student=str(student), data=str(data),
                            out=str(tmp_path / f"o{compiled}"), teacher=str(teacher), method="kd-lora", tokens=64,
                            batch_size=2, rank=4, compile=compiled)
        run_, state = distill.prepare(config, distributed.setup("cpu"))
        state.prefetch.close()
        for model in (run_.teacher, state.student):
            layers = model.get_decoder().layers
            assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
