"""The package's layers hold: no import circle, nothing imports upward, the library never imports a CLI module, and
no private name crosses a module boundary (tools/import_scan.py prints the lists; each must be empty)."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scan():
    spec = importlib.util.spec_from_file_location("import_scan", ROOT / "tools" / "import_scan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_package_layers_hold():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "import_scan.py")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _tree(tmp_path, files):
    for name, text in files.items():
        p = tmp_path / "mspeckv" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp_path


def test_scan_finds_each_kind_of_violation(tmp_path):
    """Planted violations: a circle (through a deferred relative import), an upward import, a library module
    importing a CLI module, and a private name read across modules (imported and read as an attribute)."""
    scan = _scan()
    root = _tree(tmp_path, {
        "__init__.py": "",
        "cli.py": "from .kv import dense\n",
        "kv/__init__.py": "",
        "kv/dense.py": "def f():\n    from . import offload\n",
        "kv/offload.py": "from .dense import f\nfrom ..presses.base import Press\n",
        "presses/__init__.py": "",
        "presses/base.py": "from ..kv.dense import _helper\nPress = 1\n",
        "bench/__init__.py": "",
        "bench/run.py": "from .. import cli\nfrom ..evals import lm\n",
        "evals/__init__.py": "",
        "evals/lm.py": "from ..kv import dense\nx = dense._private\n",
    })  # fmt: skip
    lists, _, _ = scan.report(root)
    assert len(lists["circles"]) == 1
    assert "kv/dense.py" in lists["circles"][0] and "kv/offload.py" in lists["circles"][0]
    assert any("kv/offload.py:2 -> mspeckv/presses/base.py" in u for u in lists["upward"])
    assert any("bench/run.py:1 -> mspeckv/cli.py" in u for u in lists["upward"])
    assert any("bench/run.py:2 -> mspeckv/evals/lm.py" in u and "siblings" in u for u in lists["upward"])
    assert lists["cli"] == ["mspeckv/bench/run.py:1 -> mspeckv/cli.py  (a library module imports a CLI module)"]
    assert sorted(lists["private"]) == ["mspeckv/evals/lm.py:2 uses mspeckv.kv.dense._private",
                                        "mspeckv/presses/base.py:1 uses mspeckv.kv.dense._helper"]  # fmt: skip


def test_scan_passes_a_clean_tree(tmp_path):
    scan = _scan()
    root = _tree(tmp_path, {
        "__init__.py": "",
        "cli.py": "from .presses.base import Press\nimport mspeckv.kv.dense as d\n",
        "kv/__init__.py": "",
        "kv/dense.py": "def _own():\n    pass\nx = _own\n",
        "presses/__init__.py": "",
        "presses/base.py": "from ..kv.dense import x\nPress = 1\n",
    })  # fmt: skip
    lists, edges, _ = scan.report(root)
    assert not any(lists.values()), lists
    assert set(edges["mspeckv.cli"]) == {"mspeckv.presses.base", "mspeckv.kv.dense"}
