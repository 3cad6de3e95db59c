"""Checks that run before any work, shared by the CLI and every bench and eval: output locations, flags that would be
ignored, and what a model's config (not its weights) allows. Each problem raises one ValueError that names the flag
and what to change."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def changed(a, *dests: str) -> list[str]:
    """The flags among ``dests`` whose value differs from the command's default."""
    d = getattr(a, "_defaults", {})
    return [flag(k) for k in dests if k in d and getattr(a, k, None) != d[k]]


def refuse(flags: list[str], why: str) -> None:
    if flags:
        raise ValueError(f"{', '.join(flags)} would be ignored: {why}; drop {'it' if len(flags) == 1 else 'them'}")


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


PLACEMENT_OFFLOAD = ("kv_quant", "kv_group_size", "resident_layers", "resident_format", "resident_policy")

def placement_flags(a, n_layers: int | None = None, changed_flags=changed) -> None:
    """Offload flags do nothing when every layer stays on the GPU; resident flags nothing without resident layers.
    ``a``: a namespace, or a config with the same names and ``changed_flags=runs.template.changed``."""
    if a.on_chip is None or (n_layers is not None and a.on_chip >= n_layers):
        where = "without --on-chip" if a.on_chip is None else f"with --on-chip {a.on_chip} of {n_layers} layers"
        refuse(changed_flags(a, *PLACEMENT_OFFLOAD), f"offload settings act on offloaded layers only, and {where} "
               f"every layer's KV stays on the GPU; pass --on-chip N (fewer than the model's layers) to offload")
    elif a.resident_layers == 0:
        refuse(changed_flags(a, "resident_format", "resident_policy"), "resident settings act on resident layers "
               "only, and --resident-layers is 0")


def generation_fits(cfg, new_tokens: int, prompt_tokens: int = 1, new_flag: str = "--max-new-tokens",
                    prompt_flag: str | None = None) -> None:
    """prompt + generated tokens within the model's maximum context (a 1-token prompt when it is not known yet)."""
    if prompt_tokens + new_tokens > cfg.max_position:
        prompt = f"{prompt_flag} {prompt_tokens}" if prompt_flag else f"a prompt of {prompt_tokens} token(s)"
        raise ValueError(f"{new_flag} {new_tokens} plus {prompt} exceeds the model's maximum context of "
                         f"{cfg.max_position}; lower {new_flag}{' or ' + prompt_flag if prompt_flag else ''}")
