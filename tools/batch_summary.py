"""Summarize ``mspeckv bench batch`` run records from one or more folders together (e.g. the hierarchy's cells run
later into the goal folder, whose ``batch.json`` then covers only the last invocation's plan):
``python tools/batch_summary.py FOLDER... [--out FILE.md]``. The rows are ``bench.batch.summarize`` over every
record found (medians over seeds, ratios against AR at the same cell, agreement with AR per sequence); nothing is
re-run and no run metadata is added: each record keeps its own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mspeckv.bench.batch import render, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--rewrite", action="store_true", help="one folder: replace its batch.json rows by these (the "
                    "file keeps its device metadata and command, and says that its rows were summarized again)")
    a = ap.parse_args()
    recs = [json.loads(f.read_text()) for d in a.folders for f in sorted(Path(d, "runs").glob("*.json"))]
    if not recs:
        raise SystemExit(f"no run records under {', '.join(a.folders)}/runs")
    devices = {r["metrics"].get("device_name") for r in recs if r["status"] == "ok"}
    res = {"config": {"model": recs[0]["config"].get("model")}, "device_name": ", ".join(sorted(map(str, devices))),
           "copy_GBps": None, "rows": summarize(recs)}
    text = render(res) + f"\n{len(recs)} run records from {', '.join(a.folders)}\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    if a.rewrite:
        if len(a.folders) != 1:
            raise SystemExit("--rewrite takes one folder")
        from mspeckv.runs.store import atomic_write_json

        f = Path(a.folders[0], "batch.json")
        old = json.loads(f.read_text())
        old.update(rows=res["rows"], rows_summarized_again="every record under runs/, by tools/batch_summary.py "
                   "--rewrite: the folder's later invocations wrote this file for their own cells only")
        atomic_write_json(f, old)


if __name__ == "__main__":
    main()
