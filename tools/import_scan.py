"""Whole-package import scan: the layers of ``mspeckv`` as rules a script checks.

    python tools/import_scan.py            # prints four lists; exit status 1 if any is non-empty
    python tools/import_scan.py --graph    # also prints every edge (importer -> imported)

Every ``import``/``from ... import`` of the package is read with ``ast`` (relative imports resolved, imports inside
functions and ``if`` blocks included: a deferred import is still a dependency). ``from pkg import name`` counts as
an import of the submodule ``pkg.name`` when that module exists, else of ``pkg``. Importing ``a.b.c`` does not count
as importing ``a`` or ``a.b`` (the package ``__init__`` runs, but holds no dependency of the importer).

Layers, lowest first (a module may import its own layer and any below it):

    0  ground floor   validate.py, config.py, data/, runs/ (the run layer: config -> flags, resumable cells,
                      atomic writes, provenance, plot helpers), the package ``__init__``
    1  storage        kv/
    2  policy         presses/
    3  model          model/
    4  decoding       decoding/, cache.py (the cache factory: it needs both kv/ and presses/)
    5  measurement    evals/, bench/ (siblings: they share the run layer and never import each other), demo.py
    6  integrations   hf/, parallel/, serve/
    7  front-ends     the CLI modules: __main__.py, cli.py, cli_*.py, any ``cli.py`` or ``cli_*.py`` of a
                      sub-package (hf/cli.py, parallel/cli.py, presses/cli.py), and the modules listed in
                      CLI_EXTRA, which hold a command's parser though not named so (none now)

A top-level module not named above is an error of the scan itself (it must be given a layer here, on purpose).

The four lists:
  (a) circles: strongly connected groups of modules (each printed with the edges that close it);
  (b) upward imports: an importer whose layer is lower than the imported module's, and imports between the two
      siblings evals/ and bench/;
  (c) CLI imports: a non-CLI module importing a CLI module (the library never imports a front-end);
  (d) private names across modules: ``from m import _x``, ``import m._x``, or ``m._x`` read through a module
      bound by an import (dunder names such as ``__version__`` are public).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mspeckv"

LAYERS = {
    "validate": 0, "config": 0, "data": 0, "runs": 0, "__init__": 0,
    "kv": 1,
    "presses": 2,
    "model": 3,
    "decoding": 4, "cache": 4,
    "evals": 5, "bench": 5, "demo": 5,
    "hf": 6, "parallel": 6, "serve": 6,
    "cli": 7, "__main__": 7,
}  # fmt: skip
SIBLINGS = [{"evals", "bench"}]
CLI_EXTRA: set[str] = set()  # modules that hold a command's parser but are not named cli*.py (none now)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def is_cli(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return name in CLI_EXTRA or leaf == "__main__" or leaf == "cli" or leaf.startswith("cli_")


def layer(name: str) -> int:
    if is_cli(name):
        return LAYERS["cli"]
    parts = name.split(".")
    key = "__init__" if len(parts) == 1 else parts[1]
    if key not in LAYERS:
        raise SystemExit(f"import_scan: {name} has no layer; give '{key}' one in LAYERS (tools/import_scan.py)")
    return LAYERS[key]


def group(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve(importer: str, node: ast.ImportFrom, mods: dict[str, Path]) -> str | None:
    if not node.level:
        return node.module
    base = importer.split(".")
    if not is_package(importer, mods):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(mods: dict[str, Path]) -> tuple[dict[str, dict[str, int]], list[tuple[str, int, str]]]:
    """Edges importer -> {imported: first line}, and private-name uses (importer, line, what)."""
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    private: list[tuple[str, int, str]] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] != PACKAGE:
                        continue
                    target = a.name if a.name in mods else None
                    if target:
                        edges[name].setdefault(target, node.lineno)
                        if a.asname:
                            bound[a.asname] = target
                    if any(p.startswith("_") and not p.startswith("__") for p in a.name.split(".")):
                        private.append((name, node.lineno, a.name))
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(name, node, mods)
                if not src or src.split(".")[0] != PACKAGE:
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        edges[name].setdefault(sub, node.lineno)
                        bound[a.asname or a.name] = sub
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private.append((name, node.lineno, sub))
                    else:
                        if src in mods:
                            edges[name].setdefault(src, node.lineno)
                        if a.name.startswith("_") and not a.name.startswith("__") and src != name:
                            private.append((name, node.lineno, f"{src}.{a.name}"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != name):  # fmt: skip
                private.append((name, node.lineno, f"{bound[node.value.id]}.{node.attr}"))
        edges[name].pop(name, None)
    return edges, sorted(set(private))


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def report(root: Path = ROOT) -> tuple[dict[str, list[str]], dict[str, dict[str, int]], dict[str, str]]:
    """The four lists, the edges, and each module's path relative to ``root``."""
    mods = modules(root)
    edges, private = scan(mods)
    rel = {m: str(p.relative_to(root)) for m, p in mods.items()}
    lists: dict[str, list[str]] = {"circles": [], "upward": [], "cli": [], "private": []}
    for comp in circles(edges):
        inner = [f"{rel[a]}:{edges[a][b]} -> {rel[b]}" for a in comp for b in sorted(edges[a]) if b in comp]
        lists["circles"].append(" <-> ".join(rel[m] for m in comp) + "\n      " + "\n      ".join(inner))
    for a in sorted(edges):
        for b, line in sorted(edges[a].items()):
            la, lb = layer(a), layer(b)
            where = f"{rel[a]}:{line} -> {rel[b]}"
            if la < lb:
                lists["upward"].append(f"{where}  (layer {la} imports layer {lb})")
            elif group(a) != group(b) and any({group(a), group(b)} == s for s in SIBLINGS):
                lists["upward"].append(f"{where}  (siblings {group(a)}/ and {group(b)}/ never import each other)")
            if is_cli(b) and not is_cli(a):
                lists["cli"].append(f"{where}  (a library module imports a CLI module)")
    lists["private"] = [f"{rel[a]}:{line} uses {what}" for a, line, what in private]
    return lists, edges, rel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graph", action="store_true", help="also print every import edge")
    args = ap.parse_args(argv)
    lists, edges, rel = report()
    if args.graph:
        for a in sorted(edges):
            for b, line in sorted(edges[a].items()):
                print(f"edge {rel[a]}:{line} -> {rel[b]}")
    titles = {
        "circles": "(a) import circles",
        "upward": "(b) imports from a lower layer to a higher one",
        "cli": "(c) CLI modules imported by non-CLI modules",
        "private": "(d) private names imported across modules",
    }
    for key, title in titles.items():
        print(f"{title}: {len(lists[key])}")
        for item in lists[key]:
            print(f"  {item}")
    return 1 if any(lists.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
