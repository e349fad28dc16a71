"""teacher-logits: sharded by rank under torchrun (2 gloo processes store exactly the rows 1 process does),
resumable (a run stopped by SIGTERM or killed outright continues with --resume and ends with the rows of an
uninterrupted run; --resume with other settings is refused; distill refuses the unfinished run), old
single-file caches still read, and the in-place top-k statistics against a float64 reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from helpers import assert_refused, save_tiny_model, write_corpus
from typer.testing import CliRunner

from bltool.artifacts import read_manifest, write_manifest
from bltool.cli import app
from bltool.models import devices
from bltool.stages import teacher_logits as stage
from bltool.stages.prepare_data import PrepareDataConfig
from bltool.stages.prepare_data import run as prepare_data
from bltool.train.teacher_cache import FILE, SCHEMA, TeacherCache, teacher_topk, teacher_topk_rows

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
TOKENS = str(9 * SEQ)  # 9 sequences: 5 batches of 2, an uneven split over 2 ranks


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("teacher-logits")
    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=2, tied=True, seed=5)
    corpus = write_corpus(root / "corpus", n_docs=40, seed=2)
    data = prepare_data(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(teacher), out=str(root / "data"),
                                          heldout=0.2, seq_len=SEQ))
    return {"teacher": teacher, "data": data, "root": root}


def args(setting, out, *extra) -> list[str]:
    return ["teacher-logits", "--teacher", str(setting["teacher"]), "--data", str(setting["data"]), "--out",
            str(out), "--tokens", TOKENS, "--top-k", "5", "--batch-size", "2", "--device", "cpu", *extra]


def invoke(setting, out, *extra):
    return CliRunner().invoke(app, args(setting, out, *extra))


def rows(path: Path) -> dict[int, tuple[torch.Tensor, ...]]:
    cache = TeacherCache.open(path)
    return {s: cache.batch([s], SEQ, "cpu") for s in cache.sequences()}


def assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys() and len(ra) == read_manifest(a)["coverage"]["sequences"]
    for sequence in ra:
        for x, y in zip(ra[sequence], rb[sequence]):
            assert torch.equal(x, y), sequence


@pytest.fixture(scope="module")
def whole(setting):
    """An uninterrupted single-process run, one part per batch."""
    out = setting["root"] / "whole"
    result = invoke(setting, out, "--save-seconds", "0")
    assert result.exit_code == 0, result.stderr
    return out


def _cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_manifest_records_the_shards_and_the_output_is_whole(setting, whole):
    manifest = read_manifest(whole, ("teacher-logits",))
    shards = manifest["shards"]
    assert len(shards) == 5 and sum(s["rows"] for s in shards) == manifest["coverage"]["sequences"] == 9
    assert sorted(tuple(p) for s in shards for p in s["positions"]) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert all((whole / s["file"]).is_file() for s in shards) and set(manifest["files"]) == {s["file"] for s in shards}
    assert not stage.partial_path(whole).exists()
    assert manifest["tail"]["mean_mass"] > 0 and manifest["timing"]["tokens"] == manifest["coverage"]["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["topk", "sampled"])
def test_two_gloo_ranks_store_the_rows_of_one_process(setting, form, request, tmp_path):
    whole = request.getfixturevalue("whole" if form == "topk" else "sampled")
    make = args if form == "topk" else sampled_args
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "bltool", *make(setting, one)], capture_output=True, text=True,
                            env=_cli_env(), timeout=300)
    assert single.returncode == 0, single.stderr
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(29500 + (os.getpid() + 7) % 1000), "-m", "bltool", *make(setting, two)],
                           capture_output=True, text=True, env=_cli_env(), timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    assert ranks.stdout.strip() == str(two)  # only rank 0 prints the path
    manifest = read_manifest(two)
    assert {s["rank"] for s in manifest["shards"]} == {0, 1} and manifest["timing"]["processes"] == 2
    assert sum(s["rows"] for s in manifest["shards"]) == 9
    assert_same_rows(one, two)
    assert_same_rows(one, whole)  # and one part per batch or one part per rank: the same rows


def _stop_at(monkeypatch, call: int) -> None:
    """SIGTERM to this process during the `call`-th teacher forward pass (as a scheduler would send it)."""
    calls = []
    forward = stage.hidden_states

    def stopping(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*a, **kw)

    monkeypatch.setattr(stage, "hidden_states", stopping)


def test_stopped_run_resumes_to_the_rows_of_an_uninterrupted_one(setting, whole, monkeypatch, tmp_path):
    out = tmp_path / "cache"
    partial = stage.partial_path(out)
    _stop_at(monkeypatch, 3)
    stopped = invoke(setting, out, "--save-seconds", "1000")  # the stop completes the part in progress
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped by SIGTERM" in stopped.stderr and "--resume" in stopped.stderr
    assert not out.exists() and not (partial / "manifest.json").exists()
    done = [json.loads(p.read_text()) for p in (partial / "shards").glob("part-*.json")]
    assert [d["positions"] for d in done] == [[[0, 6]]]  # three batches, complete
    monkeypatch.undo()

    # the unfinished run is never taken for a cache
    student = setting["root"] / "student"
    if not student.exists():
        assert CliRunner().invoke(app, ["build-student", "--teacher", str(setting["teacher"]), "--layers", "1",
                                        "--out", str(student)]).exit_code == 0
    for given in (partial, out):
        refused = CliRunner().invoke(app, ["distill", "--student", str(student), "--data", str(setting["data"]),
                                           "--teacher-logits", str(given), "--out", str(tmp_path / "d"),
                                           "--method", "kd-lora", "--tokens", str(2 * SEQ), "--batch-size", "2"])
        assert_refused(refused, "--teacher-logits", "unfinished", "--resume")
    # starting over needs --overwrite; resuming needs the same settings
    assert_refused(invoke(setting, out), "--resume", "--overwrite", "unfinished")
    assert_refused(invoke(setting, out, "--resume", "--top-k", "6"), "--resume", "--top-k (5 there, 6 here)")
    # --dtype auto where it now means bf16 (a CPU with native bf16, patched in): the teacher's precision is
    # kept, and naming it (auto resolved to float32 there) resumes
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    bf16 = {"BLTOOL_CPU_BF16": "1"}
    assert_refused(CliRunner().invoke(app, args(setting, out, "--resume"), env=bf16),
                   "--resume", "--dtype (the teacher ran in float32 there, bfloat16 here)")
    assert_refused(invoke(setting, out, "--resume", "--dtype", "bfloat16"), "--resume", "--dtype")

    resumed = CliRunner().invoke(app, args(setting, out, "--resume", "--save-seconds", "0", "--dtype", "float32"),
                                 env=bf16)
    assert resumed.exit_code == 0, resumed.stderr
    monkeypatch.undo()
    assert not partial.exists()
    manifest = read_manifest(out)
    assert manifest["timing"]["resumed"] and manifest["timing"]["tokens"] == 3 * SEQ  # batches 3 and 4 only
    assert_same_rows(whole, out)
    assert_refused(invoke(setting, out, "--resume"), "--resume", "finished")


def test_a_bf16_teacher_writes_the_same_stored_types_and_the_float32_rows_within_bf16_rounding(setting, whole,
                                                                                                tmp_path):
    """The cache stores float16 logits and float32 log-sum-exp and tail whatever the teacher's dtype (the
    statistics are worked in float32); the manifest records the dtype the teacher ran in, and the rows read
    back as the float32 teacher's within bf16's rounding."""
    out = tmp_path / "bf16"
    result = invoke(setting, out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    assert read_manifest(out)["teacher"]["dtype"] == "bfloat16"
    assert read_manifest(whole)["teacher"]["dtype"] == "float32"
    for shard in read_manifest(out)["shards"]:
        with pa.OSFile(str(out / shard["file"])) as f:
            assert pa.ipc.open_stream(f).schema.equals(SCHEMA)
    low, high = rows(out), rows(whole)
    assert low.keys() == high.keys()
    agree = total = 0
    for sequence in high:
        ids16, logits16, lse16, tail16 = low[sequence]
        ids32, logits32, lse32, tail32 = high[sequence]
        assert logits16.dtype == lse16.dtype == torch.float32  # as distill reads them
        # measured: 1e-3 (lse), 4e-3 (logits), 1e-5 (tail) on this tiny random teacher
        torch.testing.assert_close(lse16, lse32, rtol=0, atol=0.01)
        torch.testing.assert_close(tail16, tail32, rtol=0, atol=1e-3)
        same = ids16 == ids32  # the logits of the ids both hold in the same place
        torch.testing.assert_close(logits16[same], logits32[same], rtol=0, atol=0.02)
        agree += int((ids16[..., 0] == ids32[..., 0]).sum())
        total += ids32[..., 0].numel()
    assert agree >= 0.9 * total  # the top-1 id, where bf16 may swap near-ties
    assert not all(torch.equal(low[s][2], high[s][2]) for s in high)  # bf16 did round (not float32 twice)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_completed_parts(setting, whole, tmp_path):
    """SIGKILL (no handler runs): the part being written is dropped, the completed ones are kept."""
    out = tmp_path / "killed"
    shards = stage.partial_path(out) / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "bltool", *args(setting, out, "--save-seconds", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_cli_env())
    deadline = time.monotonic() + 120
    while not list(shards.glob("part-*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    if out.exists():  # finished before the kill landed: nothing to resume, and nothing to check here
        pytest.skip("the run finished before it could be killed")
    kept = len(list(shards.glob("part-*.json")))
    assert kept >= 1 and not out.exists()
    resumed = invoke(setting, out, "--resume", "--save-seconds", "0")
    assert resumed.exit_code == 0, resumed.stderr
    assert read_manifest(out)["timing"]["tokens"] < read_manifest(out)["coverage"]["tokens"]
    assert_same_rows(whole, out)


def test_a_failure_keeps_the_completed_batches(setting, whole, monkeypatch, tmp_path):
    out = tmp_path / "failed"
    forward, calls = stage.hidden_states, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory, say")
        return forward(*a, **kw)

    monkeypatch.setattr(stage, "hidden_states", failing)
    failed = invoke(setting, out, "--save-seconds", "1000")
    assert failed.exit_code == 1 and "out of memory, say" in failed.stderr
    monkeypatch.undo()
    resumed = invoke(setting, out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert read_manifest(out)["timing"]["tokens"] == 7 * SEQ  # the first batch was kept
    assert_same_rows(whole, out)


def test_a_single_file_cache_from_before_sharding_still_reads(whole, tmp_path):
    import pyarrow as pa

    old = tmp_path / "old"
    old.mkdir()
    manifest = read_manifest(whole)
    tables = [pa.ipc.open_stream(pa.memory_map(str(whole / s["file"]))).read_all() for s in manifest["shards"]]
    table = pa.concat_tables(tables)
    with pa.OSFile(str(old / FILE), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    sections = {k: v for k, v in manifest.items() if k in ("teacher", "coverage", "tail", "tokenizer")}
    write_manifest(old, "teacher-logits", manifest["config"], manifest["inputs"], **sections)
    assert_same_rows(whole, old)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_topk_statistics_match_float64_when_the_top_k_hold_nearly_all_mass(t):
    """The tail's mass is summed over its own terms, so it stays exact to float32 where 1 − Σ top-k has no
    precision left (tails of 1e-3 … 1e-9); where every tail term underflows it is still finite."""
    g = torch.Generator().manual_seed(1)
    n, v, k, d = 12, 300, 8, 300
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    z[:, :k] += torch.linspace(10.0, 25.0, n, dtype=torch.float64)[:, None] * t  # ever more peaked rows
    z[-1, k:] -= 200.0 * t  # every tail term underflows float32
    head = torch.nn.Linear(d, v, bias=False, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(torch.eye(v, d))
    ids, values, lse, tail = teacher_topk_rows(z.float(), head, k, t, chunk=5)
    z32 = z.float().double()  # what the head computes, exactly
    top = z32.topk(k, -1)
    want_lse = torch.logsumexp(z32 / t, -1) - top.values[:, 0] / t
    want_tail = torch.logsumexp((z32 / t).scatter(-1, top.indices, float("-inf")), -1) - torch.logsumexp(z32 / t, -1)
    assert torch.equal(ids.long(), top.indices)
    assert torch.allclose(values.double(), top.values - top.values[:, :1], atol=1e-5)
    assert torch.allclose(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    assert float(want_tail[:-1].exp().max()) < 1e-2  # the top k hold nearly all the mass
    assert torch.allclose(tail[:-1].double().exp(), want_tail[:-1].exp(), rtol=1e-5, atol=0)
    assert torch.isfinite(tail[-1]) and float(tail[-1]) == pytest.approx(float(want_tail[-1]), rel=1e-5)
    # and the (B, T, d) form is the same computation
    batched = teacher_topk(torch.cat([z.float(), z.float()[:1]])[None], head, k, t, chunk=3)
    assert all(torch.equal(a[0], b) for a, b in zip(batched, (ids, values, lse, tail)))


def test_bad_input(setting, tmp_path):
    assert_refused(invoke(setting, tmp_path / "x", "--resume"), "--resume", "no unfinished")
    assert_refused(invoke(setting, tmp_path / "x", "--save-seconds", "-1"), "--save-seconds")


# -- the sampled form (--sample N) ------------------------------------------------------------------------

DRAWS = 16


def sampled_args(setting, out, *extra) -> list[str]:
    return ["teacher-logits", "--teacher", str(setting["teacher"]), "--data", str(setting["data"]), "--out",
            str(out), "--tokens", TOKENS, "--sample", str(DRAWS), "--batch-size", "2", "--device", "cpu", *extra]


def invoke_sampled(setting, out, *extra):
    return CliRunner().invoke(app, sampled_args(setting, out, *extra))


@pytest.fixture(scope="module")
def sampled(setting):
    """An uninterrupted single-process sampled run, one part per batch."""
    out = setting["root"] / "sampled"
    result = invoke_sampled(setting, out, "--save-seconds", "0")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def student(setting):
    out = setting["root"] / "student"
    if not out.exists():
        result = CliRunner().invoke(app, ["build-student", "--teacher", str(setting["teacher"]), "--layers", "1",
                                          "--out", str(out)])
        assert result.exit_code == 0, result.stderr
    return out


def test_sampled_cache_holds_the_teachers_draws_and_records_its_form(setting, sampled):
    """Every stored position holds exactly the N draws that the inverse CDF of the teacher's float64
    softmax(z/T) gives at that sequence's uniforms, and the teacher's entropy; the manifest names the form,
    N, T, the estimator and the bytes per token."""
    from bltool.eval.nll import hidden_states
    from bltool.models.loading import load_model, resolve_model
    from bltool.train.batches import PackedSequences
    from bltool.train.teacher_cache import sample_uniforms

    manifest = read_manifest(sampled, ("teacher-logits",))
    made = manifest["cache"]
    assert (made["form"], made["samples"], made["temperature"], made["estimator"]) == ("sampled", DRAWS, 3.0, "rs-kd")
    size = sum((sampled / s["file"]).stat().st_size for s in manifest["shards"])
    assert made["bytes_per_token"] == round(size / manifest["coverage"]["tokens"], 1)
    assert 1 < made["mean_distinct"] <= DRAWS and "tail" not in manifest
    assert manifest["config"]["top_k"] is None
    schema = pa.ipc.open_stream(pa.memory_map(str(sampled / manifest["shards"][0]["file"]))).schema
    assert schema.field("sample_ids").type.value_type == pa.uint16()  # a vocabulary of 300

    cache = TeacherCache.open(sampled)
    assert cache.form == "sampled" and cache.samples == DRAWS and len(cache) == 9
    teacher = load_model(resolve_model(str(setting["teacher"])), dtype=torch.float64)
    train = PackedSequences(Path(setting["data"]) / "train.arrow")
    for sequence in cache.sequences()[:3]:
        tokens = torch.tensor(list(train[sequence]))[None]
        with torch.no_grad():
            z = teacher.lm_head(hidden_states(teacher, tokens, None))[0, :-1]  # (L-1, V) float64
        log_p = torch.log_softmax(z / 3.0, -1)
        want = torch.searchsorted(log_p.exp().cumsum(-1), sample_uniforms(0, sequence, len(z), DRAWS), right=True)
        ids, counts, entropy = cache.batch([sequence], SEQ, "cpu")
        got = torch.zeros(len(z), z.shape[-1]).scatter_add_(-1, ids[0, :len(z)], counts[0, :len(z)])
        assert torch.equal(got, torch.zeros_like(got).scatter_add_(-1, want, torch.ones(want.shape)))
        assert torch.allclose(entropy[0, :len(z)].double(), -(log_p.exp() * log_p).sum(-1), rtol=1e-4)
        assert (counts[0, len(z):] == 0).all()  # past the row's end: nothing


def test_sampled_rows_round_trip_through_writer_and_reader(tmp_path):
    """The draws over a 70k vocabulary are those of the float64 inverse CDF; CacheWriter → TeacherCache
    (ids too large for uint16) gives back each position's distinct ids and counts (summing to N), the
    entropy, and zeros past each row's end."""
    from bltool.train.teacher_cache import CacheWriter, padded_samples, sampled_schema, teacher_sample_rows

    g = torch.Generator().manual_seed(3)
    v, d, n, lengths = 70_000, 8, 12, [6, 4]
    head = torch.nn.Linear(d, v, bias=False)
    torch.nn.init.normal_(head.weight, std=3.0, generator=g)
    rows = torch.randn(sum(lengths) - len(lengths), d, generator=g)
    uniforms = torch.rand(len(rows), n, generator=g, dtype=torch.float64)
    ids, counts, unique, entropy = teacher_sample_rows(rows, head, 2.0, uniforms, chunk=3)
    # the draws (over 274 blocks of the two-level inverse CDF) are those of the float64 inverse CDF
    log_p = torch.log_softmax(head(rows).double() / 2.0, -1)
    want = torch.searchsorted(log_p.exp().cumsum(-1), uniforms, right=True).sort(-1).values
    assert torch.equal(torch.repeat_interleave(ids.long(), counts.long()), want.reshape(-1))
    assert torch.allclose(entropy, -(log_p.exp() * log_p).sum(-1), rtol=1e-5)
    assert sampled_schema(v).field("sample_ids").type.value_type == pa.int32()
    writer = CacheWriter(tmp_path / "part.arrow", vocab=v)
    writer.write_samples([7, 2], ids, counts, unique, entropy, lengths)
    writer.close()
    assert writer.distinct == int(unique.sum()) and writer.positions == len(rows)
    cache = TeacherCache(tmp_path, {"config": {"top_k": None, "sample": n, "temperature": 2.0},
                                    "shards": [{"file": "part.arrow", "rows": 2}]})
    got_ids, got_counts, got_entropy = cache.batch([7, 2], 8, "cpu")
    want_ids, want_counts = padded_samples(ids.numpy(), counts.numpy(), unique.numpy(), n)
    assert torch.equal(got_ids[0, :5], torch.from_numpy(want_ids[:5]))
    assert torch.equal(got_ids[1, :3], torch.from_numpy(want_ids[5:]))
    assert torch.equal(got_counts[0, :5], torch.from_numpy(want_counts[:5]))
    assert (got_counts[0, :5].sum(-1) == n).all() and (got_counts[0, 5:] == 0).all() and (got_ids[1, 3:] == 0).all()
    assert torch.equal(got_entropy[1, :3], entropy[5:].float()) and (got_entropy[1, 3:] == 0).all()


def test_sampled_rows_do_not_depend_on_batches_or_resumption(setting, sampled, monkeypatch, tmp_path):
    """Another batch size (so other batches, as other ranks or parts would have) stores the same rows;
    a run stopped by SIGTERM resumes to the rows of the uninterrupted one; resuming with another N is
    refused."""
    other = tmp_path / "other"
    assert invoke_sampled(setting, other, "--batch-size", "3").exit_code == 0
    assert_same_rows(sampled, other)
    out = tmp_path / "cache"
    _stop_at(monkeypatch, 2)
    stopped = invoke_sampled(setting, out, "--save-seconds", "1000")
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.stderr
    monkeypatch.undo()
    assert_refused(invoke_sampled(setting, out, "--resume", "--sample", "9"), "--resume", "--sample (16 there, 9 here)")
    resumed = invoke_sampled(setting, out, "--resume", "--save-seconds", "0")
    assert resumed.exit_code == 0, resumed.stderr
    assert read_manifest(out)["timing"]["tokens"] == 5 * SEQ  # batches 2, 3 and 4 only
    assert_same_rows(sampled, out)


def test_distill_from_a_sampled_cache(setting, sampled, student, tmp_path):
    """distill reads the sampled cache end to end; at its first step (the same student) the cross-entropy
    equals the live teacher's run's; another temperature is refused. (The estimator itself: test_losses.)"""
    import numpy as np

    base = ["distill", "--student", str(student), "--data", str(setting["data"]), "--method", "kd-lora",
            "--tokens", str(4 * SEQ), "--batch-size", "2", "--rank", "4", "--lora-alpha", "8", "--lora-dropout", "0",
            "--save-every", "0", "--device", "cpu"]
    cached = CliRunner().invoke(app, [*base, "--teacher-logits", str(sampled), "--out", str(tmp_path / "cached")])
    assert cached.exit_code == 0, cached.stderr
    live = CliRunner().invoke(app, [*base, "--teacher", str(setting["teacher"]), "--out", str(tmp_path / "live")])
    assert live.exit_code == 0, live.stderr
    logs = [pa.ipc.open_stream(pa.memory_map(str(tmp_path / run / "log.arrow"))).read_all().to_pylist()
            for run in ("cached", "live")]
    assert len(logs[0]) == len(logs[1]) == 2 and all(np.isfinite(r["loss"]) for r in logs[0])
    assert logs[0][0]["ce"] == pytest.approx(logs[1][0]["ce"], rel=1e-5)  # the same student reads the same tokens
    assert all(np.isfinite(r["kl"]) for r in logs[0])  # an estimate: it may be below 0 at a near-uniform teacher
    assert read_manifest(tmp_path / "cached")["inputs"][0]["path"] == str(sampled.absolute())
    refused = CliRunner().invoke(app, [*base, "--teacher-logits", str(sampled), "--temperature", "2", "--out",
                                       str(tmp_path / "refused")])
    assert_refused(refused, "--teacher-logits", "--temperature")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("extra", "needles"), [
    (["--sample", "0"], ["--sample", "got 0"]),
    (["--sample", "256"], ["--sample", "255"]),
    (["--sample", "8", "--top-k", "5"], ["--top-k", "--sample", "one of them"]),
])
def test_bad_sampled_input(setting, tmp_path, extra, needles):
    base = ["teacher-logits", "--teacher", str(setting["teacher"]), "--data", str(setting["data"]), "--out",
            str(tmp_path / "x"), "--tokens", TOKENS, "--device", "cpu"]
    assert_refused(CliRunner().invoke(app, [*base, *extra]), *needles)
    assert not (tmp_path / "x").exists() and not stage.partial_path(tmp_path / "x").exists()
