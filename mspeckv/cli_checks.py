"""The CLI's checks that run before any work: prompt, output locations, flags that would be ignored, and what the
model's config (not its weights) allows. Each problem raises one ValueError that names the flag and what to change.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


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


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def changed(a, *dests: str) -> list[str]:
    """The flags among ``dests`` whose value differs from the command's default."""
    d = getattr(a, "_defaults", {})
    return [flag(k) for k in dests if k in d and getattr(a, k, None) != d[k]]


def refuse(flags: list[str], why: str) -> None:
    if flags:
        raise ValueError(f"{', '.join(flags)} would be ignored: {why}; drop {'it' if len(flags) == 1 else 'them'}")


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


# ------------------------------------------------------------------------------------------------------ outputs
def _writable(flag_name: str, given, d: Path) -> None:
    """``d`` (a folder that may not exist yet) can be created and written to."""
    p = d.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{flag_name} {given}: {p} is a file, so no folder can be made there; pick another path")
    try:  # also catches read-only file systems, and works for root (which os.access lets through)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ValueError(f"{flag_name} {given}: cannot write in {p} ({e.strerror}); pick another path") from None


def out_file(flag_name: str, path) -> None:
    """An output file path: not a folder, in a place that can be written."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir() or str(path).endswith(os.sep):
        raise ValueError(f"{flag_name} {path} is a folder; give a file path, e.g. {p / 'result.json'}")
    _writable(flag_name, path, p.parent)


def out_dir(flag_name: str, path) -> None:
    """An output folder: not a file, in a place that can be written (it is created when missing)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag_name} {path} is a file; give a folder")
    _writable(flag_name, path, p)


# -------------------------------------------------------------------------------------------- flag combinations
PLACEMENT_OFFLOAD = ("kv_quant", "kv_group_size", "resident_layers", "resident_format", "resident_policy")
SPEC_FLAGS = ("draft", "drafter", "gamma", "draft_gamma", "budget", "chunk", "draft_sinks", "draft_window",
              "refresh_every")
MSPECKV_ONLY = ("draft_gamma", "budget", "chunk", "draft_sinks", "draft_window", "refresh_every")


def sampling_flags(a) -> None:
    """Sampling flags do nothing under greedy decoding."""
    if getattr(a, "greedy", False):
        refuse(changed(a, "temperature"), "--greedy sets the temperature to 0")
    if getattr(a, "greedy", False) or a.temperature == 0:
        refuse(changed(a, "top_k", "top_p", "seed"), "decoding is greedy (temperature 0), so sampling settings do "
               "nothing; pass --temperature > 0 to sample")


def placement_flags(a, n_layers: int | None = None, changed_flags=changed) -> None:
    """Offload flags do nothing when every layer stays on the GPU; resident flags nothing without resident layers.
    ``a``: a namespace, or a config with the same names and ``changed_flags=evals.template.changed``."""
    if a.on_chip is None or (n_layers is not None and a.on_chip >= n_layers):
        where = "without --on-chip" if a.on_chip is None else f"with --on-chip {a.on_chip} of {n_layers} layers"
        refuse(changed_flags(a, *PLACEMENT_OFFLOAD), f"offload settings act on offloaded layers only, and {where} "
               f"every layer's KV stays on the GPU; pass --on-chip N (fewer than the model's layers) to offload")
    elif a.resident_layers == 0:
        refuse(changed_flags(a, "resident_format", "resident_policy"), "resident settings act on resident layers "
               "only, and --resident-layers is 0")


def spec_flags(a) -> None:
    """Speculation flags do nothing in AR mode; retrieval and streaming-draft flags nothing outside mspeckv."""
    if a.mode == "ar":
        refuse(changed(a, *SPEC_FLAGS), "--mode ar does not speculate; pass --mode vanilla or mspeckv")
        return
    if a.mode == "vanilla":
        refuse(changed(a, *MSPECKV_ONLY), "these set the MSpecKV hierarchy's retrieval level and streaming draft "
               "cache, which --mode vanilla does not have")
    if a.drafter == "ngram":
        refuse(changed(a, "draft", "draft_sinks", "draft_window"), "--drafter ngram proposes by prompt lookup, "
               "without a draft model")


# ------------------------------------------------------------------------------------------- model-config checks
def model_config(ref: str):
    from .bench.sweeps import model_config as config

    return config(ref)


def generation_fits(cfg, new_tokens: int, prompt_tokens: int = 1, new_flag: str = "--max-new-tokens",
                    prompt_flag: str | None = None) -> None:
    """prompt + generated tokens within the model's maximum context (a 1-token prompt when it is not known yet)."""
    if prompt_tokens + new_tokens > cfg.max_position:
        prompt = f"{prompt_flag} {prompt_tokens}" if prompt_flag else f"a prompt of {prompt_tokens} token(s)"
        raise ValueError(f"{new_flag} {new_tokens} plus {prompt} exceeds the model's maximum context of "
                         f"{cfg.max_position}; lower {new_flag}{' or ' + prompt_flag if prompt_flag else ''}")
