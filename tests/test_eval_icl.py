"""eval-icl (docs/method.md §6): exact prompt bytes, demonstration sampling, scoring, an oracle model that must
score 100 % and constant models that must score exactly chance (both run through the real generation
code), batched left-padded generation against one-at-a-time and a cache-free reference on a tiny random
Llama, the files written, custom probes, and refused inputs."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from helpers import rule_answer
from typer.testing import CliRunner

from bltool.artifacts import read_manifest
from bltool.cli import app
from bltool.errors import UsageError
from bltool.eval.icl import (
    NewlineStop,
    answer_text,
    build_queries,
    chance,
    copy_chance,
    format_prompt,
    greedy_answers,
    is_correct,
    newline_token_ids,
    query_indices,
    standard_error,
)
from bltool.eval.probes import TASK_NAMES, Task, builtin_task, load_tasks
from bltool.stages.eval_icl import EvalIclConfig, composite_se, evaluate, plan


def parse_prompt(prompt: str) -> tuple[list[tuple[str, str]], str]:
    """(demonstrations, query input) read back from a prompt, checking its layout on the way."""
    *blocks, last = prompt.split("\n\n")
    demos = []
    for block in blocks:
        q, a = block.split("\n")
        assert q.startswith("Q:") and a.startswith("A:"), block
        demos.append((q[2:], a[2:]))
    assert last.startswith("Q:") and last.endswith("\nA:") and last.count("\n") == 1, last
    return demos, last[2:-3]


# ---------------------------------------------------------------------------------------------------
# Prompts and sampling


def test_prompt_bytes_are_exact():
    prompt = format_prompt([("dog", "Dog"), ("house", "House")], "river")
    assert prompt.encode("utf-8") == b"Q:dog\nA:Dog\n\nQ:house\nA:House\n\nQ:river\nA:"
    assert format_prompt([], "river").encode("utf-8") == b"Q:river\nA:"
    accented = format_prompt([("caf\u00e9", "Caf\u00e9")], "x").encode("utf-8")
    assert accented == b"Q:caf\xc3\xa9\nA:Caf\xc3\xa9\n\nQ:x\nA:"


def test_build_queries_prompt_is_demonstrations_then_query():
    task = Task("t", tuple((f"in{i}", f"out{i}") for i in range(30)), "test")
    (q,) = build_queries(task, 1, 3, seed=0)
    demos, query = parse_prompt(q.prompt)
    assert query == q.input and dict(task.pairs)[q.input] == q.target and len(demos) == 3
    assert q.prompt == "\n\n".join([*(f"Q:{x}\nA:{y}" for x, y in demos), f"Q:{q.input}\nA:"])
    assert all(d in task.pairs for d in demos) and len(set(demos)) == 3


@pytest.mark.parametrize("name", ["capitalize", "next_item", "choose_middle_of_5"])
def test_a_query_never_appears_among_its_demonstrations(name):
    task = builtin_task(name)
    for seed in range(3):
        for q in build_queries(task, 40, 10, seed):
            demos, query = parse_prompt(q.prompt)
            assert query == q.input and len(demos) == 10 and len(set(demos)) == 10
            assert q.input not in [x for x, _ in demos]


def test_duplicate_inputs_are_excluded_from_their_own_demonstrations():
    pairs = (("a", "1"), ("a", "2"), ("b", "3"), ("c", "4"), ("d", "5"))
    task = Task("dups", pairs, "test")
    for seed in range(20):
        for q in build_queries(task, 5, 3, seed):
            demos, _ = parse_prompt(q.prompt)
            assert q.input not in [x for x, _ in demos]
    with pytest.raises(UsageError, match=r"task 'dups' .* too few distinct inputs for 4 demonstrations"):
        plan([task], EvalIclConfig(model="m", shots=4, n=5))


def test_seeds_vary_demonstrations_not_queries():
    task = builtin_task("capitalize_first_letter")
    by_seed = [build_queries(task, 25, 10, s) for s in range(3)]
    assert [q.input for q in by_seed[0]] == [q.input for q in by_seed[1]] == [q.input for q in by_seed[2]]
    assert all(len({qs[j].prompt for qs in by_seed}) == 3 for j in range(25))
    assert build_queries(task, 25, 10, 1) == by_seed[1]  # deterministic
    assert query_indices(task, 10) == query_indices(task, 25)[:10]  # more queries extend the list
    assert len(build_queries(builtin_task("next_item"), 10_000, 2, 0)) == len(builtin_task("next_item").pairs)


def test_exact_match_is_case_sensitive_and_strips_whitespace():
    assert is_correct(" River ", "River") and is_correct("W", " W")
    assert not is_correct("river", "River") and not is_correct("RIVER", "River") and not is_correct("w", "W")
    assert not is_correct("River.", "River")


def test_chance_is_the_best_constant_answer():
    task = Task("t", (("a", "x"), ("b", "x"), ("c", "y"), ("d", "z")), "test")
    assert chance(task) == 0.5


def test_chance_is_over_the_whole_pool_not_the_queries_asked():
    """With 200 distinct targets the best constant answer is right 1 time in 200, however few queries are
    asked (the most common of 10 queried targets would say 1/10)."""
    task = Task("t", tuple((f"in{i}", f"out{i}") for i in range(199)) + (("in199", "out0"),), "test")
    assert chance(task) == 2 / 200
    assert chance(builtin_task("capitalize")) == 1 / len(builtin_task("capitalize").pairs) < 0.002
    pool = builtin_task("word_length").pairs
    assert chance(builtin_task("word_length")) == max(Counter(y for _, y in pool).values()) / len(pool)


@pytest.mark.parametrize(("name", "expected"), [
    ("choose_first_of_3", 1 / 3), ("choose_middle_of_5", 1 / 5), ("alphabetically_last_3", 1 / 3),
    ("alphabetically_first_5", 1 / 5), ("capitalize", None), ("next_item", None), ("word_length", None),
])
def test_copy_chance_of_list_tasks(name, expected):
    assert copy_chance(builtin_task(name)) == (pytest.approx(expected) if expected else None)


def test_copy_chance_of_a_user_list_task_with_mixed_lengths():
    task = Task("mine", (("a, b", "b"), ("c, d, e, f", "c")), "test")
    assert copy_chance(task) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert copy_chance(Task("not", (("a, b", "b"), ("c, d", "x")), "test")) is None  # one answer not in its list


def test_standard_error_counts_query_sampling():
    """A model right on the same half of the queries under every seed: no spread over seeds, but the
    score's standard error over queries is that of a 50 % proportion over n queries."""
    grid = [[True, False] * 5] * 3  # [seed][query]
    means = [1.0, 0.0] * 5
    assert standard_error(grid) == pytest.approx(statistics.stdev(means) / 10 ** 0.5)
    assert standard_error([[True, True, False, False], [True, False, False, False]]) == pytest.approx(
        statistics.stdev([1.0, 0.5, 0.0, 0.0]) / 2)
    assert standard_error([[True], [False]]) is None
    assert composite_se([0.3, 0.4]) == pytest.approx(0.25) and composite_se([0.1, None]) is None


def test_answer_text_and_newline_stop(tokenizer):
    newline = newline_token_ids(tokenizer)
    assert tokenizer("\n")["input_ids"][0] in newline
    assert all("\n" in tokenizer.decode([i]) for i in newline)
    ids = tokenizer(" River\nQ:junk")["input_ids"]
    assert answer_text(tokenizer, ids) == "River"
    stop = NewlineStop(newline)
    rows = torch.tensor([[5, newline[0]], [5, 6]])
    assert stop(rows, None).tolist() == [True, False]


# ---------------------------------------------------------------------------------------------------
# Scripted models that run through greedy_answers / evaluate


class ScriptedLM(torch.nn.Module):
    """A generate-able model whose answer to a prompt is a Python function of the prompt's text.

    It reads each row back from the left-padded batch exactly as transformers' generate receives it,
    emits the answer, a newline and some junk, truncated to `max_new_tokens`, and pads finished rows.
    """

    def __init__(self, tokenizer, respond):
        super().__init__()
        self.tokenizer, self.respond = tokenizer, respond
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, stopping_criteria):
        assert not do_sample and input_ids.shape == attention_mask.shape
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            width = int(mask.sum())
            assert mask[-width:].all() and not mask[:-width].any(), "left padding"
            prompt = self.tokenizer.decode(ids[-width:].tolist())
            answer = self.respond(prompt)
            rows.append(self.tokenizer(answer + "\nQ:junk\n")["input_ids"][:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def oracle(prompt: str) -> str:
    """Answers by finding the task whose independent rule fits every demonstration, then applying it."""
    demos, query = parse_prompt(prompt)
    fits = [name for name in TASK_NAMES if all(rule_answer(name, x) == y for x, y in demos)]
    answers = {rule_answer(name, query) for name in fits} - {None}
    assert len(answers) == 1, (fits, answers)
    return answers.pop()


def test_oracle_scores_100_percent_on_every_probe(tokenizer):
    config = EvalIclConfig(model="oracle", n=6, shots=6, seeds=2, batch_size=4)
    planned = plan(load_tasks(("builtin",)), config)
    result, predictions = evaluate(ScriptedLM(tokenizer, oracle), tokenizer, planned, config)
    assert set(result["tasks"]) == set(TASK_NAMES)
    for name, t in result["tasks"].items():
        assert t["accuracy"] == [1.0, 1.0] and t["correct"] == [6, 6] and t["seed_std"] == 0.0, name
        assert t["se"] == 0.0, name
    assert result["composite"]["mean"] == 1.0 and result["composite"]["per_seed"] == [1.0, 1.0]
    assert len(predictions) == 19 * 2 * 6 and all(p["correct"] for p in predictions)
    assert all(p["answer"] == p["target"] for p in predictions)  # the junk after the newline was cut


def test_constant_models_score_chance(tokenizer):
    """The pool's most common answer, given every time, scores the share of the queries with that target;
    `chance` is the same share over the whole pool."""
    config = EvalIclConfig(model="constant", n=30, shots=3, seeds=3, batch_size=8)
    for task, queries in plan(load_tasks(("builtin",)), config):
        seed0 = queries[: len(queries) // 3]
        majority, count = Counter(y for _, y in task.pairs).most_common(1)[0]
        result, _ = evaluate(ScriptedLM(tokenizer, lambda _, a=majority: a), tokenizer, [(task, queries)], config)
        t = result["tasks"][task.name]
        assert t["chance"] == count / len(task.pairs)
        hits = sum(q.target == majority for q in seed0)
        assert t["accuracy"] == [hits / len(seed0)] * 3, task.name
        assert t["baseline"] == max(t["chance"], t["copy_chance"] or 0.0)
        wrong, _ = evaluate(ScriptedLM(tokenizer, lambda _: "not an answer"), tokenizer, [(task, queries)], config)
        assert wrong["tasks"][task.name]["accuracy"] == [0.0, 0.0, 0.0]


def test_se_counts_queries_that_every_seed_gets_wrong(tokenizer):
    """A model right on a fixed subset of the queries whatever the demonstrations: the seed spread is 0,
    the standard error is not; both, and the composite's, as documented."""
    config = EvalIclConfig(model="half", n=8, shots=3, seeds=3, batch_size=8)
    planned = plan(load_tasks(("builtin",), ("capitalize", "next_item")), config)
    right = {q.input for _, qs in planned for q in qs[:8] if q.index % 3 != 0}  # queries 1, 2, 4, 5, 7 of 8
    respond = lambda p: oracle(p) if parse_prompt(p)[1] in right else "wrong"  # noqa: E731
    result, predictions = evaluate(ScriptedLM(tokenizer, respond), tokenizer, planned, config)
    for name, t in result["tasks"].items():
        assert t["accuracy"] == [5 / 8] * 3 and t["seed_std"] == 0.0, name
        per_query = [statistics.fmean(p["correct"] for p in predictions if p["task"] == name and p["query"] == j)
                     for j in range(8)]
        assert t["se"] == pytest.approx(statistics.stdev(per_query) / 8 ** 0.5) and t["se"] > 0.15, name
    assert result["composite"]["seed_std"] == 0.0
    assert result["composite"]["se"] == pytest.approx((2 * t["se"] ** 2) ** 0.5 / 2)


def test_lowercased_answers_fail_the_capitalisation_probes(tokenizer):
    config = EvalIclConfig(model="lower", n=10, shots=4, seeds=1)
    planned = plan(load_tasks(("builtin",), ("capitalize", "capitalize_first_letter")), config)
    result, _ = evaluate(ScriptedLM(tokenizer, lambda p: oracle(p).lower()), tokenizer, planned, config)
    assert all(t["accuracy"] == [0.0] for t in result["tasks"].values())


# ---------------------------------------------------------------------------------------------------
# Batched generation on a tiny random Llama


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int, newline: set[int]) -> str:
    """Greedy decoding written out: one prompt, no padding, no KV cache, full forward per token."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1]  # (V,)
            token = int(logits.argmax())
            new.append(token)
            if token in newline or token == tokenizer.eos_token_id:
                break
    return answer_text(tokenizer, new)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [q.prompt for name in ("capitalize", "choose_middle_of_5", "next_item")
               for q in build_queries(builtin_task(name), 4, 3, seed=0)]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert max(lengths) > 2 * min(lengths)  # real padding in every mixed batch
    newline = newline_token_ids(tokenizer)
    stop = NewlineStop(newline)
    pad = tokenizer.pad_token_id
    batched = greedy_answers(model, tokenizer, prompts, 8, batch_size=5, pad_id=pad, stop=stop)
    single = [greedy_answers(model, tokenizer, [p], 8, batch_size=1, pad_id=pad, stop=stop)[0] for p in prompts]
    reference = [reference_greedy(model, tokenizer, p, 8, set(newline)) for p in prompts]
    assert batched == single == reference
    assert sum(bool(a) for a in reference) >= len(prompts) // 2  # the comparison is not between empty strings


# ---------------------------------------------------------------------------------------------------
# The stage through the CLI


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def test_cli_writes_result_tables_and_manifest(tiny_llama, tmp_path):
    out = tmp_path / "icl"
    result = CliRunner().invoke(app, ["eval-icl", str(tiny_llama), "--n", "3", "--seeds", "2", "--shots", "2",
                                      "--batch-size", "7", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert "composite" in result.stderr and "capitalize_first_letter" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "predictions.arrow", "result.arrow",
                                                     "result.json"]
    manifest = read_manifest(out, ("eval-icl",))
    assert manifest["config"]["shots"] == 2 and manifest["inputs"][0]["role"] == "model"
    assert manifest["inputs"][1]["builtin"] == list(TASK_NAMES)
    data = json.loads((out / "result.json").read_text())
    assert list(data["tasks"]) == list(TASK_NAMES) and data["protocol"]["seeds"] == [0, 1]
    for name, t in data["tasks"].items():
        assert t["n"] == 3 and len(t["accuracy"]) == 2 and t["mean"] == statistics.fmean(t["accuracy"])
        assert t["seed_std"] == pytest.approx(statistics.stdev(t["accuracy"]))
        assert [c / 3 for c in t["correct"]] == t["accuracy"]
        assert t["chance"] == chance(builtin_task(name)) and t["copy_chance"] == copy_chance(builtin_task(name))
    per_seed = [statistics.fmean(t["accuracy"][s] for t in data["tasks"].values()) for s in (0, 1)]
    assert data["composite"]["per_seed"] == pytest.approx(per_seed)
    assert data["composite"]["mean"] == pytest.approx(statistics.fmean(t["mean"] for t in data["tasks"].values()))
    assert manifest["result"]["composite"] == data["composite"]["mean"]
    assert manifest["result"]["composite_se"] == data["composite"]["se"]
    assert manifest["result"]["tasks"]["choose_first_of_3"] == {
        "chance": chance(builtin_task("choose_first_of_3")), "copy_chance": 1 / 3}
    assert manifest["result"]["tasks"]["choose_first_of_3"]["chance"] < 0.01
    rows = _read_arrow(out / "result.arrow").to_pylist()
    assert len(rows) == 19 * 2 and {r["seed"] for r in rows} == {0, 1}
    assert {(r["task"], r["seed"]): r["accuracy"] for r in rows} == {
        (name, s): t["accuracy"][s] for name, t in data["tasks"].items() for s in (0, 1)}
    predictions = _read_arrow(out / "predictions.arrow").to_pylist()
    assert len(predictions) == 19 * 2 * 3
    assert sum(p["correct"] for p in predictions) == sum(sum(t["correct"]) for t in data["tasks"].values())
    # the standard errors, recomputed from the predictions: per query, the mean over seeds; SE over queries
    for name, t in data["tasks"].items():
        means = [statistics.fmean(p["correct"] for p in predictions if p["task"] == name and p["query"] == j)
                 for j in range(3)]
        assert t["se"] == pytest.approx(statistics.stdev(means) / 3 ** 0.5), name
    ses = [t["se"] for t in data["tasks"].values()]
    assert data["composite"]["se"] == pytest.approx(sum(x * x for x in ses) ** 0.5 / len(ses))
    assert all(p["correct"] == is_correct(p["answer"], p["target"]) for p in predictions)

    again = CliRunner().invoke(app, ["eval-icl", str(tiny_llama), "--n", "3", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_cli_custom_probes_round_trip_and_default_out(tiny_llama, tmp_path, monkeypatch):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    original = builtin_task("capitalize")
    (folder / "capitalize.json").write_text(json.dumps([{"input": x, "output": y} for x, y in original.pairs]))
    (folder / "pins.jsonl").write_text("".join(json.dumps({"input": f"k{i}", "output": f"v{i}"}) + "\n"
                                               for i in range(8)))
    monkeypatch.chdir(tmp_path)
    args = ["eval-icl", str(tiny_llama), "--n", "4", "--seeds", "1", "--shots", "5"]
    custom = CliRunner().invoke(app, [*args, "--probes", str(folder)])
    assert custom.exit_code == 0, custom.stderr
    out = Path(custom.stdout.strip())
    assert out == Path("icl") / tiny_llama.name
    builtin = CliRunner().invoke(app, [*args, "--tasks", "capitalize", "--out", "builtin-run"])
    assert builtin.exit_code == 0, builtin.stderr
    mine = _read_arrow(out / "predictions.arrow").to_pylist()
    theirs = _read_arrow(Path("builtin-run") / "predictions.arrow").to_pylist()
    assert [p for p in mine if p["task"] == "capitalize"] == theirs  # same pairs → same prompts and answers
    data = json.loads((out / "result.json").read_text())
    assert list(data["tasks"]) == ["capitalize", "pins"] and data["tasks"]["pins"]["pool"] == 8
    assert data["tasks"]["pins"]["source"] == str(folder / "pins.jsonl")
    sources = {i.get("path") for i in read_manifest(out)["inputs"]}
    assert str((folder / "pins.jsonl").absolute()) in sources


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "0"], "--n must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--shots", "-1"], "--shots must be at least 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--tasks", "capitalize,nope"], "--tasks: unknown task 'nope'"),
    (["--probes", "BAD"], "not valid JSON"),
    (["--probes", "SMALL"], "too few distinct inputs for 10 demonstrations"),
])
def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tiny_llama, tmp_path, args, message):
    bad, small = tmp_path / "bad.json", tmp_path / "small.json"
    bad.write_text("[{", encoding="utf-8")
    small.write_text(json.dumps([{"input": str(i), "output": str(i)} for i in range(5)]), encoding="utf-8")
    args = [{"BAD": str(bad), "SMALL": str(small)}.get(a, a) for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval-icl", str(tiny_llama), "--out", str(out), *args])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and result.stdout == ""
    assert not out.exists()
