"""ICL probe tasks (docs/method.md §6): the shipped word lists, every built-in generator's pairs checked by an
independent rule, determinism, and the user's task files (round trips and refused files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import NEXT, PREV, RULES, VOCAB, rule_answer

from bltool.errors import UsageError
from bltool.eval.probes import (
    TASK_NAMES,
    WORD_LISTS,
    Task,
    builtin_task,
    load_task_file,
    load_tasks,
    vocabulary,
    word_list,
)

SPEC_NAMES = {  # docs/method.md §6, spelled out
    *(f"choose_{w}_of_{k}" for w in ("first", "middle", "last") for k in (3, 5)),
    *(f"alphabetically_{w}_{k}" for w in ("first", "last") for k in (3, 5)),
    "capitalize", "capitalize_first_letter", "capitalize_last_letter", "next_capital_letter",
    "lowercase_first_letter", "lowercase_last_letter", "next_item", "prev_item", "word_length",
}

# ---------------------------------------------------------------------------------------------------


def test_the_19_task_names():
    assert len(TASK_NAMES) == 19 and set(TASK_NAMES) == SPEC_NAMES == set(RULES)


def test_word_lists_are_curated_common_words():
    seen: dict[str, str] = {}
    for name in WORD_LISTS:
        words = word_list(name)
        assert len(words) >= 120, name
        assert list(words) == sorted(words), f"{name}.txt is kept sorted"
        for word in words:
            assert word.isascii() and word.isalpha() and word.islower() and len(word) >= 2, word
            assert word not in seen, f"{word!r} is in both {seen.get(word)} and {name}"
            seen[word] = name
    assert len(vocabulary()) == len(seen) >= 700
    assert {"dog", "house", "river", "skunk", "hammock", "witty", "pillow", "emu"} <= set(vocabulary())


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_pair_satisfies_the_independent_rule(name):
    task = builtin_task(name)
    assert task.name == name and task.source == "builtin"
    inputs = [x for x, _ in task.pairs]
    assert len(set(inputs)) == len(inputs), "inputs are distinct within a task"
    for x, y in task.pairs:
        assert rule_answer(name, x) == y, (name, x, y)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_pools_are_deterministic_and_seeded(name):
    assert builtin_task(name) == builtin_task(name)
    other = builtin_task(name, seed=1)
    assert other.pairs != builtin_task(name).pairs
    if name.startswith(("choose", "alphabetically")):
        assert len(other.pairs) == len(builtin_task(name).pairs) == 1000
    else:  # the same pool in another order
        assert sorted(other.pairs) == sorted(builtin_task(name).pairs)


def test_word_tasks_cover_the_vocabulary():
    for name in ("capitalize", "word_length", "next_capital_letter"):
        assert sorted(x for x, _ in builtin_task(name).pairs) == sorted(VOCAB)
    assert sorted(x.lower() for x, _ in builtin_task("lowercase_last_letter").pairs) == sorted(VOCAB)


def test_method_examples():
    examples = {"capitalize": ("emu", "Emu"), "capitalize_first_letter": ("whose", "W"),
                "capitalize_last_letter": ("skunk", "K"), "next_capital_letter": ("hammock", "I"),
                "lowercase_first_letter": ("WITTY", "w"), "lowercase_last_letter": ("PILLOW", "w"),
                "word_length": ("along", "5")}
    for name, (x, y) in examples.items():
        assert rule_answer(name, x) == y
        if x.lower() in VOCAB:
            assert dict(builtin_task(name).pairs)[x] == y
    assert dict(builtin_task("next_capital_letter").pairs)["zebra"] == "A"  # z wraps to A


def test_sequences_wrap_only_for_days_and_months_and_drop_ambiguous_inputs():
    nxt, prev = dict(builtin_task("next_item").pairs), dict(builtin_task("prev_item").pairs)
    assert nxt["Sunday"] == "Monday" and nxt["december"] == "january" and nxt["nineteen"] == "twenty"
    assert prev["monday"] == "sunday" and prev["January"] == "December" and prev["XIX"] == "XVIII"
    assert nxt["yy"] == "zz" and nxt["28"] == "29" and prev["b"] == "a" and prev["ix"] == "viii"
    for end in ("twenty", "29", "z", "ZZ"):
        assert end not in nxt
    for start in ("zero", "0", "a", "AA"):
        assert start not in prev
    # letters that are also roman numerals, where the two sequences disagree, are left out
    for ambiguous in ("i", "v", "x", "ii"):
        assert ambiguous not in nxt and ambiguous.upper() not in nxt
    for ambiguous in ("v", "x", "ii", "xx"):
        assert ambiguous not in prev and ambiguous.upper() not in prev
    assert nxt["xx"] == "yy" and prev["i"] == "h"  # roman xx has no successor, roman i no predecessor
    # every unambiguous successor is in the pool
    assert len(nxt) == sum(len(v) == 1 for v in NEXT.values())
    assert len(prev) == sum(len(v) == 1 for v in PREV.values())


# ---------------------------------------------------------------------------------------------------
# User task files


def _write(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def test_json_and_jsonl_files_round_trip(tmp_path):
    original = builtin_task("capitalize")
    items = [{"input": x, "output": y} for x, y in original.pairs]
    from_json = load_task_file(_write(tmp_path / "capitalize.json", items))
    assert from_json == Task("capitalize", original.pairs, str(tmp_path / "capitalize.json"))
    lines = "\n".join(json.dumps(item) for item in items) + "\n\n"  # a trailing blank line is fine
    (tmp_path / "caps.jsonl").write_text(lines, encoding="utf-8")
    assert load_task_file(tmp_path / "caps.jsonl").pairs == original.pairs


def test_unicode_and_extra_keys_are_kept(tmp_path):
    path = _write(tmp_path / "accents.json", [{"input": "café", "output": "Café", "note": "ignored"},
                                              {"input": "東京", "output": " Tokyo "}])
    assert load_task_file(path).pairs == (("café", "Café"), ("東京", " Tokyo "))


def test_directories_builtin_and_task_selection(tmp_path):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    _write(folder / "b_task.json", [{"input": "x", "output": "y"}])
    (folder / "a_task.jsonl").write_text('{"input": "p", "output": "q"}\n', encoding="utf-8")
    (folder / "README.md").write_text("not a task", encoding="utf-8")
    assert [t.name for t in load_tasks((str(folder),))] == ["a_task", "b_task"]
    both = load_tasks(("builtin", str(folder)))
    assert [t.name for t in both] == [*TASK_NAMES, "a_task", "b_task"]
    picked = load_tasks(("builtin", str(folder)), names=("b_task", "word_length"))
    assert [t.name for t in picked] == ["b_task", "word_length"] and picked[1] == builtin_task("word_length")
    with pytest.raises(UsageError, match=r"--tasks: unknown task 'nope'; available: .*a_task"):
        load_tasks((str(folder),), names=("nope",))


BAD_FILES = [
    ("dict.json", '{"input": "a", "output": "b"}', r"must hold a JSON list .* got a dict"),
    ("strings.json", '["a", "b"]', r"item 1 is a str, expected an object"),
    ("nokey.json", '[{"input": "a", "output": "b"}, {"input": "c"}]', r'item 2 has no "output" key'),
    ("noinput.jsonl", '{"output": "b"}\n', r'item 1 has no "input" key'),
    ("number.json", '[{"input": "a", "output": 3}]', r'"output" must be a string, got int'),
    ("newline.json", '[{"input": "a", "output": "b\\nc"}]', r'"output" contains a newline'),
    ("blank.json", '[{"input": "a", "output": "  "}]', r'"output" is empty'),
    ("empty.json", "[]", r"holds no examples"),
    ("empty.jsonl", "\n\n", r"holds no examples"),
    ("broken.json", '[{"input": "a",', r"is not valid JSON"),
    ("broken.jsonl", '{"input": "a", "output": "b"}\n{oops}\n', r"line 2 is not valid JSON"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_task_files_are_refused_with_the_file_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message) as err:
        load_task_file(path)
    assert str(err.value).startswith(f"--probes: {path}") and "\n" not in str(err.value)


def test_not_utf8_missing_and_duplicate_names(tmp_path):
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"input": "café", "output": "Café"}]'.encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin.json is not UTF-8 text \(byte \d+\)"):
        load_task_file(latin)
    with pytest.raises(UsageError, match=r"--probes: .*nowhere.json does not exist"):
        load_tasks((str(tmp_path / "nowhere.json"),))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"has no .json or .jsonl task files"):
        load_tasks((str(empty),))
    _write(tmp_path / "capitalize.json", [{"input": "a", "output": "A"}])
    with pytest.raises(UsageError, match=r"task 'capitalize' .* is defined twice"):
        load_tasks(("builtin", str(tmp_path / "capitalize.json")))
