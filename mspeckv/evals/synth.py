"""Offline, seeded retrieval prompts: needle-in-a-haystack and two RULER-style tasks (multi-key needle, variable
tracking). The haystack is real text (``data.corpora.long_prompt``); everything else comes from ``random.Random``
seeded by a string, so the same (task, context, depth, seed) always gives the same token ids.

A needle sentence is ``One of the special magic numbers for {key} is: {value}.`` (RULER's needle format) with a
7-digit value. Pieces are inserted at token offsets of the haystack (``round(depth * len(haystack))``), each on its
own line; a prompt is ``header + haystack-with-pieces + question`` and has exactly ``context`` tokens.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..data.corpora import encode, long_prompt

KEYS = ("amber", "basil", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
        "lagoon", "marble", "nutmeg", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
        "walnut", "yarrow", "zephyr", "anchor", "bramble", "cedar", "delta", "falcon", "glacier", "hazel")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
HEADER = ("Below is a long text. Some special magic numbers are hidden in it; remember them, a question about one "
          "of them follows.\n\n")
NEEDLE_QUESTION = ("\n\nQuestion: What is the special magic number for {key} mentioned in the text above?\n"
                   "Answer: The special magic number for {key} mentioned in the text above is")
VT_HEADER = ("Below is a long text. Variable assignments are hidden in it; remember them, a question about them "
             "follows.\n\n")
VT_QUESTION = ("\n\nQuestion: Which variables are assigned the value {value}, directly or through other variables, "
               "in the text above? List every one of them.\nAnswer: The variables assigned the value {value} are:")


GEN_MAX = 48  # most tokens the retrieval evals generate after a prompt (vartrack)


@dataclass
class Prompt:
    ids: list[int]
    answers: list[str]  # what must appear in the output (all of them)
    task: str
    context: int
    depth: float | None = None
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # token [start, end) of each inserted piece
    info: dict[str, Any] = field(default_factory=dict)


def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(map(str, parts)))


def _seven_digits(rng: random.Random, n: int) -> list[str]:
    vals: list[str] = []
    while len(vals) < n:
        v = str(rng.randrange(1_000_000, 10_000_000))
        if v not in vals:
            vals.append(v)
    return vals


def _assemble(tok, context: int, header: str, question: str, pieces: list[tuple[float, str]], seed: int,
              dataset, split: str = "all") -> tuple[list[int], list[tuple[int, int]]]:
    """header + haystack (with each piece inserted at its depth) + question, exactly ``context`` tokens."""
    head, tail = encode(tok, header), encode(tok, question)
    enc = [encode(tok, "\n" + text + "\n") for _, text in pieces]
    n_hay = context - len(head) - len(tail) - sum(map(len, enc))
    if n_hay < 1:
        raise ValueError(f"a {context}-token prompt is too short for the task's header, question and needles "
                         f"({context - n_hay + 1} tokens needed)")
    hay = long_prompt(tok, n_hay, seed=seed, dataset=dataset, split=split)
    at = [round(d * n_hay) for d, _ in pieces]
    order = sorted(range(len(pieces)), key=lambda i: (at[i], i))
    out, spans, prev = list(head), [None] * len(pieces), 0
    for i in order:
        out.extend(hay[prev:at[i]])
        prev = at[i]
        spans[i] = (len(out), len(out) + len(enc[i]))
        out.extend(enc[i])
    out.extend(hay[prev:])
    out.extend(tail)
    return out, spans


def needle_prompt(tok, context: int, depth: float, seed: int = 0, n_needles: int = 4, dataset=None,
                  split: str = "all") -> Prompt:
    """A haystack of ``context`` tokens with ``n_needles`` distinct needles; the asked one sits at ``depth`` (0 =
    start of the haystack, 1 = end), the others at seeded random depths."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    if not 1 <= n_needles <= len(KEYS):
        raise ValueError(f"--needle-count must be in 1..{len(KEYS)}, got {n_needles}")
    rng = _rng("needle", seed, context, depth)
    keys = rng.sample(KEYS, n_needles)
    values = _seven_digits(rng, n_needles)
    depths = [depth] + [rng.random() for _ in range(n_needles - 1)]
    pieces = [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values, strict=True)]
    ids, spans = _assemble(tok, context, HEADER, NEEDLE_QUESTION.format(key=keys[0]), pieces,
                           _rng("hay", seed, context, depth).randrange(2**31), dataset, split)
    return Prompt(ids, [values[0]], "needle", context, depth, spans, {"key": keys[0], "keys": keys})


def multikey_prompt(tok, context: int, seed: int = 0, n_keys: int = 8, dataset=None, split: str = "all") -> Prompt:
    """RULER-style multi-key needle: ``n_keys`` needles at random depths, one of them asked for."""
    rng = _rng("mk", seed, context)
    depth = rng.random()
    p = needle_prompt(tok, context, round(depth, 6), seed=rng.randrange(2**31), n_needles=n_keys, dataset=dataset,
                      split=split)
    p.task = "multikey"
    return p


def _var_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def vartrack_prompt(tok, context: int, seed: int = 0, hops: int = 4, dataset=None, split: str = "all") -> Prompt:
    """RULER-style variable tracking: ``VAR A = 12345``, then ``VAR B = VAR A``, ... (``hops`` assignments after the
    first) at increasing random depths; the answer is every variable in the chain."""
    if hops < 1:
        raise ValueError(f"--vt-hops must be >= 1, got {hops}")
    rng = _rng("vt", seed, context)
    taken: set[str] = set()
    names = [_var_name(rng, taken) for _ in range(hops + 1)]
    value = str(rng.randrange(10_000, 100_000))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in lines)
    ids, spans = _assemble(tok, context, VT_HEADER, VT_QUESTION.format(value=value), list(zip(depths, lines,
                                                                                              strict=True)),
                           rng.randrange(2**31), dataset, split)
    return Prompt(ids, names, "vartrack", context, None, spans, {"value": value, "depths": depths})


# --------------------------------------------------------------------------------------------------------- scoring
_SEVEN = re.compile(r"(?<!\d)\d{7}(?!\d)")


def score_needle(output: str, value: str) -> bool:
    """Exact retrieval: the first 7-digit number in the model's output is the needle's value."""
    m = _SEVEN.search(output)
    return m is not None and m.group(0) == value


def score_all(output: str, answers: list[str]) -> float:
    """Fraction of the expected strings that appear in the output (RULER-style string match over all answers)."""
    return sum(a in output for a in answers) / len(answers)
