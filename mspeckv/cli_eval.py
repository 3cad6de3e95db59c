"""``mspeckv eval ...`` and ``mspeckv data ...``: the front-end of ``evals.runner`` (its flags are
:class:`~mspeckv.evals.runner.EvalConfig`'s fields), with the checks that need no model (the output folder) done
before ``run_eval`` loads anything."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from . import cli_checks as checks
from .evals.runner import METRICS, EvalConfig, run_eval
from .runs.template import add_flags, from_args


def cmd_eval(a) -> int:
    from .evals import report

    if a.include and a.metric != "report":
        raise ValueError("--include is for 'eval report' only (it reads other folders' cells into one overview)")
    if a.metric == "report":
        d = Path(a.output_dir or "")
        if not a.output_dir or not ((d / "cells").is_dir() or a.include):
            raise ValueError("eval report needs --output-dir DIR of an evaluation (with DIR/cells), or --include "
                             "folders to read into DIR")
        bad = [x for x in a.include if not (Path(x) / "cells").is_dir()]
        if bad:
            raise ValueError(f"--include {bad[0]}: not an evaluation folder (no cells/ in it)")
        summary = report.render(d, plots=not a.no_plots, include=a.include)
        print(report.overview_markdown(summary))
        print(json.dumps(report.summary_line(summary)))
        return 0
    names = [m.strip() for m in a.metric.split(",") if m.strip()]
    metrics = METRICS if names == ["all"] else tuple(dict.fromkeys(names))
    cfg = from_args(EvalConfig, a, metrics=metrics)
    checks.out_dir("--output-dir", cfg.out_dir())  # a file there, or an unwritable place: refused before the model
    command = "mspeckv " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    summary = run_eval(cfg, command)
    if summary.get("dry_run"):
        for t in summary["todo"]:
            print(f"{t['family']:7s} context {t['context']:6d}: {', '.join(t['variants'])}")
        print(json.dumps(summary))
        return 0
    print(report.overview_markdown(summary))
    line = report.summary_line(summary)
    line["failed"] = summary["failed"]
    print(json.dumps(line))
    return 1 if summary["failed"] else 0


def add_eval_parser(sub) -> None:
    """``mspeckv eval`` (flags generated from :class:`EvalConfig`) and ``mspeckv data``."""
    from .data.datasets import add_data_parser

    p = sub.add_parser("eval", help="quality evaluation against the full cache (ppl, kl, needle, gsm8k, ...)",
                       description="Quality of placements and presses against the full cache, in the same "
                                   "invocation; protocols in the docstrings of mspeckv/evals/*.py. Variants: every "
                                   "press (none and each --press) crossed with every --kv-quant format, minus the "
                                   "baseline. So --press X --kv-quant Y is not two variants but X over Y-quantized "
                                   "KV, beside Y alone; add --kv-quant none,Y to evaluate X alone too.")
    p.add_argument("metric", metavar="METRIC[,METRIC...]",
                   help=f"one or more of {','.join(METRICS)} (comma-separated), all, or report (re-render "
                        f"--output-dir)")
    add_flags(p, EvalConfig)
    p.add_argument("--include", action="append", default=[], metavar="DIR",
                   help="report only (repeatable): also read DIR's cells into the overview; the output folder's own "
                        "cells, then earlier --include folders, win for the same metric/variant/context, and every "
                        "delta is against the variant's own folder's baseline")
    p.set_defaults(fn=cmd_eval)
    add_data_parser(sub)
