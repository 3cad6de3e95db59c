"""Help and the listings start without torch or transformers (each in a fresh interpreter), and ``presses list``
shows what the press classes hold: whole descriptions, every preset's full spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys
from mspeckv.cli import main
try:
    rc = main({argv!r})
except SystemExit as e:
    rc = e.code
sys.stdout.flush()
print(json.dumps({{"rc": rc, "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}}))
"""


def _probe(argv: list[str]) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    *text, last = out.stdout.strip().splitlines()
    return json.loads(last), "\n".join(text)


@pytest.mark.parametrize("argv", [["--help"], ["models", "list"], ["presses", "list"], ["data", "list"],
                                  ["bench", "--help"], ["eval", "--help"], ["presses", "--help"]])
def test_help_and_listings_import_no_torch(argv):
    res, text = _probe(argv)
    assert res["rc"] == 0 and text
    assert res["heavy"] == [], f"mspeckv {' '.join(argv)} imported {res['heavy']}"


def test_a_bench_help_still_lists_its_own_flags():
    """A bench's flags are generated only for the bench named, and still all of them."""
    from mspeckv.bench.registry import BENCH
    from mspeckv.runs.template import flags_of

    res, text = _probe(["bench", "decode", "--help"])
    assert res["rc"] == 0
    assert all(f in text for f in flags_of(BENCH["decode"].load("config")).values())
    assert "--formats" not in text  # another bench's flag


def test_press_catalog_matches_the_press_classes():
    from mspeckv.cli_presses import CATALOG, catalog

    assert json.loads(CATALOG.read_text(encoding="utf-8")) == json.loads(json.dumps(catalog())), \
        "a press changed: rewrite the catalog with `python -m mspeckv.cli_presses`"


def test_presses_list_shows_whole_descriptions_and_full_presets(capsys):
    import dataclasses

    import yaml

    from mspeckv.cli import main
    from mspeckv.presses import PRESSES, parse_press, presets

    assert main(["presses", "list"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for name, cls in PRESSES.items():
        doc = sys.modules[cls.__module__].__doc__.strip().split("\n\n")[0]
        assert " ".join(doc.split()) in flat, name  # the whole first paragraph, never cut mid-sentence
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("preset ")}
    assert set(lines) == set(presets())
    for name, path in presets().items():
        p = parse_press(name)
        spec = lines[name].split()[2]
        assert parse_press(spec) == p  # the printed spec is the preset, field for field
        assert spec.count("=") == len(dataclasses.fields(p))  # every field shown, defaults included
        assert yaml.safe_load(path.read_text())["press"] == spec.split(":")[0]
    assert "hybrid:retain=0.32," in lines["conservative"]
