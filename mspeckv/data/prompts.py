"""Prompt files for batched generation: JSON Lines, one object per line, ``{"prompt": "...", "max_new_tokens": N}``
(``max_new_tokens`` optional; ``id`` optional, echoed back). Read and checked whole before any model loads, so a bad
line is one error that names it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

KEYS = {"prompt", "max_new_tokens", "id"}


@dataclass(frozen=True)
class PromptLine:
    prompt: str
    max_new_tokens: int | None = None
    id: str | int | None = None


def read_prompts(path: str | Path, flag: str = "--prompts") -> list[PromptLine]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {p} is not a file; give a JSON Lines file, one {{\"prompt\": ...}} per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {p} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{flag} {p} line {n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg}); write one object per line") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where} is a {type(obj).__name__}; write an object like {{\"prompt\": \"...\"}}")
        if unknown := sorted(set(obj) - KEYS):
            raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(KEYS))}")
        text = obj.get("prompt")
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
        m = obj.get("max_new_tokens")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"{where}: \"max_new_tokens\" must be an integer >= 1, got {m!r}")
        pid = obj.get("id")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, str | int)):
            raise ValueError(f"{where}: \"id\" must be a string or an integer, got {pid!r}")
        out.append(PromptLine(text, m, pid))
    if not out:
        raise ValueError(f"{flag} {p} holds no prompt; write one {{\"prompt\": ...}} object per line")
    return out
