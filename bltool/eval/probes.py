"""ICL probe tasks: the 19 function-style probes of docs/method.md §6, and the user's own task files.

A task is a named pool of `(input, output)` pairs. The built-in pools are generated deterministically
from word lists shipped in `bltool/probes_data/` (common English nouns, verbs, adjectives, animals and
everyday objects, lower case), so the same bltool version always evaluates the same probes. User tasks
come from files in the Function Vectors format (a JSON list of `{"input", "output"}` objects) or JSON
Lines with one such object per line; a file's task is named after the file's stem.

How queries and demonstrations are drawn from a pool is the protocol's business (`bltool.eval.icl`); the
baselines a score is read against (`chance`, `copy_chance`) and its standard error are here, free of torch,
so `bltool report` can use them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from bltool.errors import UsageError

WORD_LISTS = ("nouns", "verbs", "adjectives", "animals", "objects")
BUILTIN = "builtin"  # the --probes value that stands for the 19 built-in tasks
LIST_POOL = 1000  # inputs generated for each choose_* / alphabetically_* task


@dataclass(frozen=True)
class Task:
    name: str
    pairs: tuple[tuple[str, str], ...]  # (input, output)
    source: str  # "builtin" or the file it was read from


# ---------------------------------------------------------------------------------------------------
# Word lists


@cache
def word_list(name: str) -> tuple[str, ...]:
    """One shipped word list: lower-case ASCII words, one per line, `#` lines are comments."""
    text = resources.files("bltool").joinpath("probes_data", f"{name}.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@cache
def vocabulary() -> tuple[str, ...]:
    """Every shipped word once, sorted: the words the built-in probes draw from."""
    return tuple(sorted({word for name in WORD_LISTS for word in word_list(name)}))


# ---------------------------------------------------------------------------------------------------
# Built-in generators. Each returns the task's whole pool, shuffled by `rng`; inputs are distinct.


def _next_letter(letter: str) -> str:
    """The next letter of the alphabet, upper-cased; z wraps to A."""
    return chr((ord(letter.lower()) - ord("a") + 1) % 26 + ord("a")).upper()


_WORD_RULES = {  # single-word tasks: word → (input, output)
    "capitalize": lambda w: (w, w[0].upper() + w[1:]),
    "capitalize_first_letter": lambda w: (w, w[0].upper()),
    "capitalize_last_letter": lambda w: (w, w[-1].upper()),
    "next_capital_letter": lambda w: (w, _next_letter(w[0])),
    "lowercase_first_letter": lambda w: (w.upper(), w[0]),
    "lowercase_last_letter": lambda w: (w.upper(), w[-1]),
    "word_length": lambda w: (w, str(len(w))),
}

_LIST_RULES = {  # list tasks: (list length k, pick the answer from the k words)
    **{f"choose_{where}_of_{k}": (k, pick) for k in (3, 5) for where, pick in (
        ("first", lambda ws: ws[0]), ("middle", lambda ws: ws[len(ws) // 2]), ("last", lambda ws: ws[-1]))},
    **{f"alphabetically_{which}_{k}": (k, pick) for k in (3, 5) for which, pick in (("first", min), ("last", max))},
}


def _roman(number: int) -> str:
    parts = ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))
    out = ""
    for value, symbol in parts:
        while number >= value:
            out, number = out + symbol, number - value
    return out


def sequences() -> list[tuple[list[str], bool]]:
    """The known sequences of next_item / prev_item, each with whether it wraps around."""
    numbers = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
               "sixteen seventeen eighteen nineteen twenty").split()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    days = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
    months = ("January February March April May June July August September October November "
              "December").split()
    out = [(numbers, False), ([str(i) for i in range(30)], False)]
    for series in (letters, [c * 2 for c in letters], [_roman(i).lower() for i in range(1, 21)]):
        out += [(series, False), ([s.upper() for s in series], False)]
    for series in (days, months):
        out += [([s.lower() for s in series], True), (series, True)]
    return out


def _step_pairs(step: int) -> list[tuple[str, str]]:
    """(item, item `step` places on) for every sequence. Inputs that two sequences continue differently
    (the letters that are also roman numerals: i, v, x, ii, xx in either case) are left out, so every
    query has exactly one right answer."""
    answers: dict[str, set[str]] = {}
    order: list[str] = []
    for series, wraps in sequences():
        n = len(series)
        for i, item in enumerate(series):
            j = i + step
            if not wraps and not 0 <= j < n:
                continue
            if item not in answers:
                answers[item] = set()
                order.append(item)
            answers[item].add(series[j % n])
    return [(item, answers[item].pop()) for item in order if len(answers[item]) == 1]


def _generate(name: str, rng: random.Random) -> list[tuple[str, str]]:
    if name in _WORD_RULES:
        words = list(vocabulary())
        rng.shuffle(words)
        return [_WORD_RULES[name](w) for w in words]
    if name in _LIST_RULES:
        k, pick = _LIST_RULES[name]
        words, pairs, seen = vocabulary(), [], set()
        while len(pairs) < LIST_POOL:
            chosen = rng.sample(words, k)  # k distinct words in random order
            text = ", ".join(chosen)
            if text not in seen:
                seen.add(text)
                pairs.append((text, pick(chosen)))
        return pairs
    pairs = _step_pairs(+1 if name == "next_item" else -1)
    rng.shuffle(pairs)
    return pairs


TASK_NAMES = (  # docs/method.md §6, in the paper's order of families
    "alphabetically_first_3", "alphabetically_first_5", "alphabetically_last_3", "alphabetically_last_5",
    "choose_first_of_3", "choose_first_of_5", "choose_last_of_3", "choose_last_of_5",
    "choose_middle_of_3", "choose_middle_of_5",
    "capitalize", "capitalize_first_letter", "capitalize_last_letter", "next_capital_letter",
    "lowercase_first_letter", "lowercase_last_letter",
    "next_item", "prev_item",
    "word_length",
)


def builtin_task(name: str, seed: int = 0) -> Task:
    """A built-in task's pool; a pure function of (name, seed, the shipped word lists)."""
    if name not in TASK_NAMES:
        raise UsageError(f"unknown built-in probe {name!r}; known: {', '.join(TASK_NAMES)}")
    rng = random.Random(f"bltool-probes|{name}|{seed}")
    return Task(name, tuple(_generate(name, rng)), BUILTIN)


# ---------------------------------------------------------------------------------------------------
# User task files


def _parse_items(path: Path, text: str, flag: str) -> list:
    if path.suffix.lower() == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"{flag}: {path} line {number} is not valid JSON ({err.msg})") from None
        return items
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{flag}: {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(items, list):
        raise UsageError(
            f'{flag}: {path} must hold a JSON list of {{"input", "output"}} objects, got a {type(items).__name__}'
        )
    return items


def load_task_file(path: Path, flag: str = "--probes") -> Task:
    """One task from a .json (list of objects) or .jsonl (one object per line) file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag}: {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UsageError(f"{flag}: cannot read {path} ({err.strerror})") from None
    items = _parse_items(path, text, flag)
    if not items:
        raise UsageError(f"{flag}: {path} holds no examples")
    pairs = []
    for number, item in enumerate(items, 1):
        where = f"{flag}: {path} item {number}"
        if not isinstance(item, dict):
            raise UsageError(f'{where} is a {type(item).__name__}, expected an object with "input" and "output"')
        for key in ("input", "output"):
            if key not in item:
                raise UsageError(f'{where} has no "{key}" key')
            if not isinstance(item[key], str):
                raise UsageError(f'{where}: "{key}" must be a string, got {type(item[key]).__name__}')
            if "\n" in item[key]:
                raise UsageError(f'{where}: "{key}" contains a newline (answers end at the first newline)')
        if not item["output"].strip():
            raise UsageError(f'{where}: "output" is empty')
        pairs.append((item["input"], item["output"]))
    return Task(path.stem, tuple(pairs), str(path))


def _files_in(directory: Path, flag: str) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
    if not files:
        raise UsageError(f"{flag}: {directory} has no .json or .jsonl task files")
    return files


def load_tasks(specs: tuple[str, ...], names: tuple[str, ...] | None = None, flag: str = "--probes") -> list[Task]:
    """Tasks from `--probes` values (`builtin`, a task file, or a directory of them), optionally cut
    to `names` (`--tasks`), in the order given."""
    files, use_builtin = [], False
    for spec in specs:
        if spec == BUILTIN:
            use_builtin = True
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files += _files_in(path, flag)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{flag}: {spec} does not exist (give a .json/.jsonl file, a directory, or 'builtin')")
    available: dict[str, Task | None] = {name: None for name in TASK_NAMES} if use_builtin else {}
    for file in files:
        task = load_task_file(file, flag)
        if task.name in available:
            raise UsageError(f"{flag}: task {task.name!r} ({file}) is defined twice; rename one file")
        available[task.name] = task
    if names is not None:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise UsageError(f"--tasks: unknown task {unknown[0]!r}; available: {', '.join(available)}")
        chosen = list(dict.fromkeys(names))
    else:
        chosen = list(available)
    return [available[name] or builtin_task(name) for name in chosen]


# ---------------------------------------------------------------------------------------------------
# Baselines and standard errors


def chance(task: Task) -> float:
    """The best constant answer's accuracy over the task's whole pool: the share of its pairs whose
    target is the most common one. A model that ignores its input cannot beat it in expectation, so it is
    the floor a probe's accuracy is read against. (Over the pool, not over the n queries asked: the most
    common of 10 queried targets is at least 1/10 even when every target in the pool differs.)"""
    counts: dict[str, int] = {}
    for _, y in task.pairs:
        counts[y.strip()] = counts.get(y.strip(), 0) + 1
    return max(counts.values()) / len(task.pairs) if task.pairs else 0.0


LIST_SEPARATOR = ", "


def copy_chance(task: Task) -> float | None:
    """For a list task, one whose every answer is an item of its input's list (`a, b, c`: the choose_* and
    alphabetically_* probes): the expected accuracy of copying a uniformly random item of the prompt's
    list, the mean over the pool of 1/k for k items. None for other tasks."""
    if not task.pairs:
        return None
    lengths: dict[int, int] = {}  # list length k → pairs with k items
    for x, y in task.pairs:
        items = [item.strip() for item in x.split(LIST_SEPARATOR)]
        if len(items) < 2 or y.strip() not in items:
            return None
        lengths[len(items)] = lengths.get(len(items), 0) + 1
    return sum(count / k for k, count in lengths.items()) / len(task.pairs)


def standard_error(correct: list[list[bool]]) -> float | None:
    """Standard error of a task's accuracy, `correct[seed][query]`, counting query sampling as well as
    demonstration sampling: each query's correctness is averaged over the seeds, and the SE is the sample
    standard deviation (ddof = 1) of those n per-query means over √n. Every (query, seed) draws its own
    demonstrations, so the per-query means are independent draws; the spread over seeds alone misses the
    (larger) uncertainty of which n queries were asked. None with a single query."""
    seeds, n = len(correct), len(correct[0]) if correct else 0
    if n < 2:
        return None
    means = [sum(float(correct[s][j]) for s in range(seeds)) / seeds for j in range(n)]
    mean = sum(means) / n
    variance = sum((m - mean) ** 2 for m in means) / (n - 1)
    return (variance / n) ** 0.5


def composite_se(ses: list[float | None]) -> float | None:
    """The macro composite's standard error from its tasks' (independent samples): √(Σ se²) / tasks."""
    if not ses or any(se is None for se in ses):
        return None
    return sum(se**2 for se in ses) ** 0.5 / len(ses)
