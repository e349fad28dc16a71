"""The ICL probe protocol (docs/method.md §6): prompts (`format_prompt`), the queries and demonstrations of a
task (`build_queries`), batched greedy answers up to the first newline (`greedy_answers`) and exact-match
scoring (`is_correct`). Queries and demonstrations are pure functions of the task's pairs, so a task
written to a file and read back is asked the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from bltool.eval.probes import Task, chance, copy_chance, standard_error  # noqa: F401 (the protocol's statistics)

ANSWER_MARGIN = 4  # new tokens allowed beyond the task's longest target (a leading space, another split)


@dataclass(frozen=True)
class Query:
    task: str
    seed: int  # demonstration seed
    index: int  # position among the task's queries (the same question for every seed)
    input: str
    target: str
    prompt: str


def format_prompt(demonstrations, query_input: str) -> str:
    """`Q:{input}\\nA:{output}` per demonstration, joined by blank lines, then `Q:{query}\\nA:`."""
    blocks = [f"Q:{x}\nA:{y}" for x, y in demonstrations]
    return "\n\n".join([*blocks, f"Q:{query_input}\nA:"])


def query_indices(task: Task, n: int) -> list[int]:
    """The pool indices asked as queries: min(n, pool) of them, the same for every seed."""
    rng = random.Random(f"bltool-icl|queries|{task.name}")
    return rng.sample(range(len(task.pairs)), min(n, len(task.pairs)))


def min_eligible(task: Task) -> int:
    """The fewest demonstration candidates any query has: pool size minus its most repeated input."""
    counts: dict[str, int] = {}
    for x, _ in task.pairs:
        counts[x] = counts.get(x, 0) + 1
    return len(task.pairs) - max(counts.values())


def build_queries(task: Task, n: int, shots: int, seed: int) -> list[Query]:
    """The task's queries for one demonstration seed, each with its prompt."""
    queries = []
    for j, q in enumerate(query_indices(task, n)):
        x, y = task.pairs[q]
        eligible = [k for k, (other, _) in enumerate(task.pairs) if other != x]
        rng = random.Random(f"bltool-icl|demos|{task.name}|{seed}|{j}")
        demos = [task.pairs[k] for k in rng.sample(eligible, shots)]
        queries.append(Query(task.name, seed, j, x, y, format_prompt(demos, x)))
    return queries


def is_correct(answer: str, target: str) -> bool:
    """Case-sensitive exact match after stripping surrounding whitespace (no lower-casing: the
    capitalisation probes would be trivial under a case-folding match)."""
    return answer.strip() == target.strip()


# ---------------------------------------------------------------------------------------------------
# Generation


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text contains a newline (byte-level BPE spells it "Ċ", SentencePiece <0x0A>)."""
    ids = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
    return [i for i, text in zip(ids, texts) if "\n" in text]


class NewlineStop(StoppingCriteria):
    """Marks a row done once it emits a newline token; generate stops when every row is done."""

    def __init__(self, newline_ids: list[int]):
        self.newline_ids = torch.tensor(newline_ids, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1]  # (B,) the token just generated
        return torch.isin(last, self.newline_ids.to(last.device))


def cap_new_tokens(tokenizer, targets) -> int:
    """New-token cap for a task: its longest target in tokens plus a margin; a longer answer cannot
    match, so generating further would only cost time."""
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    return longest + ANSWER_MARGIN


def answer_text(tokenizer, new_ids) -> str:
    """The answer in generated ids: the text up to its first newline, surrounding whitespace stripped."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


def greedy_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    stop: NewlineStop,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding and the KV cache.

    Prompts are sorted by token length (longest first, so memory peaks at once) to keep padding small;
    left padding puts every prompt's last token in the last column, so the new tokens of all rows start
    at the same position; the attention mask hides the padding (transformers derives position ids from
    it), so a row's answer does not depend on the batch it is in.
    """
    device = model.device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([stop]),
            )  # (B, T + new)
        for r, i in enumerate(rows):
            answers[i] = answer_text(tokenizer, out[r, width:].tolist())
        if on_batch is not None:
            on_batch(len(rows))
    return answers
