"""Write ``results/tests/mutation/survivors.md``: every surviving mutant of the last mutation runs with a one-line
reason. Reasons come from the rules below (patterns read off the mutants, each checked by hand on the listed
diffs) or from ``REASONS`` (single mutants, read one by one); anything else is listed as an open gap.

Categories:
  equivalent      the program behaves identically (e.g. ``dim=+1`` on a 2-D tensor, a default equal to the value)
  cpu-equivalent  differs only on CUDA (``device=None`` allocates on the CPU, where every CPU test already is)
  message         only the text of an error/warning changes (the exception type still fires)
  gap             a behaviour change no fast CPU test catches (left open; listed for follow-up)

Score lines: killed / (killed + survived) as mutmut counts it, and the same over non-equivalent mutants
(equivalent and cpu-equivalent survivors removed from the denominator).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "results" / "tests" / "mutation"

RULES: list[tuple[str, str, str]] = [  # (regex on the '+' line, category, reason)
    (r"device=None|device=device\)|, \)\.|\.to\(None\)|_inv_freq\(seq_len, None\)|, None\)$|device\)$",
     "cpu-equivalent", "device argument dropped: tensors land on the CPU, where every CPU test already runs"),
    (r"dtype=None|dtype=dtype, \)|\(dim // 2, device=device\)|arange\(0, dim, 2, device=device\)",
     "equivalent", "dtype argument dropped where the default (fp32 / int64) is the same"),
    (r"raise \w+\(None\)|XX.*XX\"\)|\(f?\"[A-Z0-9 ,.:;()_+'{}\[\]=<>!-]+\"\)|warnings\.warn\(.*stacklevel",
     "message", "error/warning text or stacklevel only; the exception type still fires"),
    (r"float\(\"-INF\"\)", "equivalent", "float('-INF') == float('-inf')"),
]

# Individual mutants, read one by one. Key: the mutant name without the module prefix.
E, G = "equivalent", "gap"
REASONS: dict[str, tuple[str, str]] = {
    # sampling.py / accept.py
    "x_logits_to_probs__mutmut_22": (E, "top_k == V keeps every token either way"),
    "x_logits_to_probs__mutmut_31": (E, "topk's default dim is the last one"),
    "x_logits_to_probs__mutmut_52": (E, "sort's default dim is the last one"),
    "x_sample__mutmut_4": (E, "exponential_'s default rate is 1.0"),
    "x_sample__mutmut_7": (E, "argmax(p / E) is unchanged when every E is scaled by the same 1/rate"),
    "x_next_token__mutmut_2": (E, "next_token takes (B, V) logits: dim +1 is the last dim"),
    "x_speculative_accept__mutmut_57": (E, "(B, gamma) tensor: dim +1 is the last dim"),
    "x_speculative_accept__mutmut_59": (E, "(B, gamma) tensor: dim +1 is the last dim"),
    "x_speculative_accept__mutmut_93": (E, "the padding row past gamma is never gathered (n <= gamma)"),
    "x_speculative_accept__mutmut_112": (E, "(B, V) tensor: dim +1 is the last dim"),
    "x_speculative_accept__mutmut_113": ("gap", "closed after the run: test_accept::test_residual_fallback_is_per_row "
                                         "now puts both rows' mass on one token (re-run: killed)"),
    "x_speculative_accept__mutmut_115": (E, "differs only when the residual mass is exactly 1e-6"),
    "x_greedy_accept__mutmut_16": (E, "(B, gamma) tensor: dim +1 is the last dim"),
    "x_greedy_accept__mutmut_18": (E, "(B, gamma) tensor: dim +1 is the last dim"),
    # bench/stats.py
    "x__seed_key__mutmut_5": (E, "the third key field only breaks ties between equal numeric seeds (one dict key)"),
    "x__seed_key__mutmut_6": (E, "named seeds still sort after numeric ones (2 > 0 as 1 > 0)"),
    "x__seed_key__mutmut_7": (E, "the second field is constant among named seeds either way"),
}


def _plus_line(diff: str) -> str:
    lines = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " ".join(lines)


def _minus_line(diff: str) -> str:
    lines = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    return " ".join(lines)


def classify(name: str, diff: str) -> tuple[str, str]:
    short = name.split(".")[-1]
    if short in REASONS:
        return REASONS[short]
    plus = _plus_line(diff)
    for pat, cat, why in RULES:
        if re.search(pat, plus):
            return cat, why
    return "gap", "no fast CPU test catches it (open)"


def main() -> int:
    rows, summary = [], []
    for f in sorted(OUT.glob("*.json")):
        r = json.loads(f.read_text())
        cats: dict[str, int] = {}
        body = []
        for name, s in r["survivors"].items():
            if s["status"] != "survived":
                continue
            cat, why = classify(name, s["diff"])
            cats[cat] = cats.get(cat, 0) + 1
            minus, plus = _minus_line(s["diff"])[:110], _plus_line(s["diff"])[:110]
            body.append(f"| `{name.split('.')[-1]}` | {cat} | {why} | `{minus}` -> `{plus}` |")
        killed, survived = r["killed"], r["survived"]
        equiv = cats.get("equivalent", 0) + cats.get("cpu-equivalent", 0)
        non_eq = killed + survived - equiv
        msg = cats.get("message", 0)
        score = f"{100 * killed / (killed + survived):.1f}%" if killed + survived else "-"
        score_ne = f"{100 * killed / non_eq:.1f}%" if non_eq else "-"
        score_nm = f"{100 * killed / (non_eq - msg):.1f}%" if non_eq - msg else "-"
        summary.append(f"| {r['group']} | {killed} | {survived} | {equiv} | {msg} | {cats.get('gap', 0)} | "
                       f"{r.get('no_tests', 0)} | {r.get('not_checked', 0)} | {score} | {score_ne} | {score_nm} |")
        rows.append(f"\n## {r['group']} ({', '.join(r['files'])})\n\nCommand: `{r['command']}` in a scratch copy, "
                    f"tests: {', '.join(r['tests'])}\n")
        rows.append("| mutant | category | reason | change |\n|---|---|---|---|")
        rows.extend(body)
    md = ["# Surviving mutants", "", __doc__.split("Categories:")[1].split("Score lines")[0].strip("\n"), "",
          "| group | killed | survived | equivalent (incl. cpu) | message-only | gaps | no tests | not run | "
          "score | non-equivalent score | non-equivalent, messages excluded |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *summary, *rows, ""]
    (OUT / "survivors.md").write_text("\n".join(md))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
