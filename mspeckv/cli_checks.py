"""The CLI's own checks that run before any work: the parsers and the prompt (output locations and the checks the
library shares live in ``runs/checks.py``; flags that would be ignored in a mode are refused by ``validate.ignored``
from each flag's declaration).
Each problem raises one ValueError that names the flag and what to change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .runs.checks import (  # noqa: F401 (the checks the library shares, kept under one name for the CLI)
    changed,
    flag,
    generation_fits,
    out_dir,
    refuse,
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class LeafParser(Parser):
    """A subcommand's parser that refuses flags it does not know itself, so the error names the subcommand and its
    ``--help`` (argparse would leave them to the top-level parser, whose help does not list them)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns, extra


def record_defaults(parser: argparse.ArgumentParser) -> None:
    """Store each (sub)command's flag defaults in its namespace (``_defaults``), so checks can tell a flag the user
    changed from one left alone."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.set_defaults(_defaults={a.dest: a.default for a in parser._actions
                                       if a.option_strings and a.default is not argparse.SUPPRESS})
    for s in subs:
        for p in s.choices.values():
            record_defaults(p)


# ------------------------------------------------------------------------------------------------------- inputs
def prompt_text(a) -> str:
    """--prompt or the text of --prompt-file: non-empty, and a readable UTF-8 file."""
    if a.prompt_file is None:
        if not a.prompt:
            raise ValueError("--prompt is empty; give some text (or --prompt-file FILE)")
        return a.prompt
    p = Path(a.prompt_file)
    if not p.exists():
        raise ValueError(f"--prompt-file {p} does not exist")
    if not p.is_file():
        raise ValueError(f"--prompt-file {p} is not a file (a folder?); give a text file")
    data = p.read_bytes()
    if not data:
        raise ValueError(f"--prompt-file {p} is empty; give a file with the prompt text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {p} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, "
                         f"e.g. iconv -t UTF-8") from None


def model_config(ref: str):
    """A model's config alone (``model.api.model_config``, imported when called: the CLI starts without torch)."""
    from .model.api import model_config as config

    return config(ref)
