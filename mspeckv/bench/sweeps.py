"""``mspeckv sweep {context,resident,onchip,genlen}`` and ``mspeckv report DIR``: the four end-to-end sweeps.

Each sweep (``sweep_settings.SWEEPS``: its experiment, swept knob, x values and fixed lengths) runs every method
(``registry.REGISTRY``; ar_gpu and hf_ar only when ``--methods`` names them) per x and seed. The resident value
(flag or swept x) applies to mspeckv_kv_quant only; every other method keeps resident 0.

``--quick`` is a cheap sanity preset (``sweep_settings.sweep_config``), ``--clamp-resident`` included, so it runs on
the 28-layer default target where 16 on-chip layers leave only 12 to offload; flags given explicitly win over it.
``--clamp-resident`` caps the resident layers at the offloaded ones for each x (the count used is each run's
``resident_layers``); without it a resident count above the offloaded layers is an error that names the x values.

The flags are ``SweepSettings``' fields (``runs.template``); ``--greedy``, ``--no-progress``, ``--device``
(resolved) and the default ``--output-dir`` are applied by ``settings_from_args``. Every flag is validated (models'
configs included) before anything is loaded or written, each problem one ValueError naming the flag (and the x
values, for per-x problems). Runs go through ``runs.store.run_sweep`` (one atomic JSON per run under ``DIR/runs``,
resumable, failures recorded), the summary through ``report.render``. ``DIR/sweep.json`` pins the settings that
shape results (a resume with others is refused); ``DIR/command.txt`` collects the command lines. The exit status is
0 once the summary is written, failed runs included (``n_failed`` in the JSON line says how many).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from .. import validate as v
from ..runs.checks import out_dir, refuse
from ..runs.store import RunSpec, RunStore, atomic_write_json, atomic_write_text, read_json_object, run_sweep
from ..runs.template import add_flags, changed, flag_name, from_args
from .registry import BY_NAME, HF_METHODS, REFERENCE_METHODS, RETRIEVAL_METHODS, SPEC_METHODS
from .sweep_settings import CONFIGS, SWEEPS, SweepSettings, placement_for


def settings_from_args(a) -> SweepSettings:
    """argparse namespace -> SweepSettings: the template's ``from_args`` (flags parsed and checked, ``--quick``
    applied), then what it cannot express: ``--device`` resolved, ``--greedy`` (temperature 0) and the default
    ``--output-dir``. No model needed."""
    from ..model.api import parse_device

    s = from_args(CONFIGS[a.sweep], a, device=parse_device(a.device).type, output_dir=a.output_dir or "")
    if a.greedy:
        refuse(changed(s, "temperature", "top_p", given=a),
               "--greedy decodes greedily, so sampling settings do nothing")
        s = dataclasses.replace(s, temperature=0.0)
    return s if s.output_dir else dataclasses.replace(s, output_dir=str(Path("results") / s.sweep / default_name(s)))


def default_name(s: SweepSettings) -> str:
    """``<target>_b<budget>_oc<on_chip>_r<resident>_g<gamma>`` (the swept knob left out) [+ _quick] [+ _greedy]."""
    tag = re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(s.target.replace(":", "-")).name).strip("-.") or "model"
    parts = [tag, f"b{s.budget}"]
    parts += [f"oc{s.on_chip}"] if s.x_name != "on_chip" else []
    parts += [f"r{s.resident_layers}"] if s.x_name != "resident_layers" else []
    parts += [f"g{s.gamma}"] + (["quick"] if s.quick else []) + (["greedy"] if s.temperature == 0 else [])
    for flag, spec in (("press", s.press), ("l1", s.l1_press)):
        if spec:
            parts.append(f"{flag}-" + re.sub(r"[^A-Za-z0-9.+=-]+", "-", Path(spec).stem).strip("-."))
    return "_".join(parts)


# --------------------------------------------------------------------------------------------------- validation
def _per_x(s: SweepSettings, n_layers: int, checks) -> None:
    """Run every ``check(point)`` for every x's point; identical messages are merged and name every x they hold
    for."""
    errs: dict[str, list[int]] = {}
    for x in s.xs:
        for check in checks:
            try:
                check(s.point(x, n_layers))
            except ValueError as e:
                errs.setdefault(str(e), []).append(x)
    if errs:
        raise ValueError("; ".join(f"{m} (at {s.x_name}={','.join(map(str, xs))})" for m, xs in errs.items()))


def validate(s: SweepSettings):
    """Every check that can fail before a model is loaded. Returns (target ModelConfig, draft ModelConfig or None)."""
    from ..config import GenerationConfig, SamplingConfig
    from ..decoding.speculative import SpecConfig
    from ..model.api import model_config

    SamplingConfig(temperature=s.temperature, top_p=s.top_p)  # the fields' own types and ranges: __post_init__
    if any(m in RETRIEVAL_METHODS for m in s.methods):
        SpecConfig(mode="mspeckv", gamma=s.gamma, draft_gamma=s.draft_gamma, budget=s.budget, chunk=s.chunk)
    elif "vanilla_specdec" in s.methods:
        SpecConfig(mode="vanilla", gamma=s.gamma, draft_gamma=s.draft_gamma)
    tcfg = model_config(s.target)
    dcfg = model_config(s.draft) if any(m in SPEC_METHODS for m in s.methods) else None
    if dcfg is not None and dcfg.vocab_size != tcfg.vocab_size:
        raise ValueError(f"--draft {s.draft} has a vocabulary of {dcfg.vocab_size}, the target {s.target} one of "
                         f"{tcfg.vocab_size}; pick a draft with the target's tokenizer (random targets: the same "
                         f"random:<shape>, which gets its own weights)")
    if not s.target.startswith("random:"):
        from ..data.corpora import load_documents

        load_documents(s.dataset)  # missing corpus / bad path: its own clear error

    def lengths(p) -> None:
        if p.prefill < 1:
            raise ValueError("the prefill length must be >= 1")
        if p.gen_len < 2:
            raise ValueError("the generation length must be >= 2 (latency is timed over the tokens after the first)")
        GenerationConfig(max_new_tokens=p.gen_len, prefill_chunk=s.prefill_chunk)
        for name, cfg in (("target", tcfg), ("draft", dcfg)):
            if cfg is not None and p.prefill + p.gen_len > cfg.max_position:
                raise ValueError(f"prefill {p.prefill} + gen {p.gen_len} = {p.prefill + p.gen_len} tokens exceed the "
                                 f"{name}'s maximum context of {cfg.max_position}; use prefill <= "
                                 f"{cfg.max_position - p.gen_len}")

    def budget(p) -> None:
        if any(m in RETRIEVAL_METHODS for m in s.methods) and s.budget >= p.prefill:
            raise ValueError(f"--budget {s.budget} is not smaller than prefill {p.prefill}: the retrieval level would "
                             f"hold the whole prompt; lower --budget")

    def placements(p) -> None:
        for m in s.methods:
            pl = placement_for(s, m, p)
            if pl is not None:
                try:
                    pl.validate(tcfg.n_layers, tcfg.head_dim)
                except ValueError as e:
                    resident = v.name("resident_layers") in str(e)
                    hint = " for mspeckv_kv_quant (or pass --clamp-resident)" if resident else ""
                    raise ValueError(f"{e}{hint}") from None

    _per_x(s, tcfg.n_layers, (lengths, budget, placements))
    return tcfg, dcfg


def check_output_dir(s: SweepSettings) -> None:
    """Refuse to resume a directory whose runs were made with different settings."""
    if not (rec := read_json_object(Path(s.output_dir) / "sweep.json")):
        return
    old, new = rec.get("fixed", {}), json.loads(json.dumps(s.fixed()))
    if diff := sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)):
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"{s.output_dir} holds a sweep made with other settings ({shown}); pass another "
                         f"--output-dir or remove the directory")


def plan(s: SweepSettings, weights: str) -> list[RunSpec]:
    """x outer, then seed, then method (methods interleaved per seed, so drift hits them alike)."""
    config = {"experiment": s.experiment, "x_name": s.x_name, "weights": weights, **s.flags()}
    return [RunSpec(s.sweep, m, s.x_name, x, seed, config) for x in s.xs for seed in s.seeds for m in s.methods]


# ------------------------------------------------------------------------------------------------------ commands
def _command_lines(a, s: SweepSettings) -> str:
    """The command as typed, and the same with every setting explicit (one flag per field of the sweep's config,
    ``--quick`` left out as its values are spelled out)."""
    typed = "mspeckv " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["sweep"] else None
    args = ["mspeckv", "sweep", s.sweep]
    for f in dataclasses.fields(CONFIGS[s.sweep]):
        x = getattr(s, f.name)
        if not f.metadata.get("cli", True) or f.name == "quick" or x is None or x is False:
            continue
        args += [flag_name(f)] if x is True else [flag_name(f), ",".join(map(str, x)) if isinstance(x, tuple)
                                                   else str(x)]
    lines = ([typed] if typed else []) + ["# the same with every setting explicit:", shlex.join(args)]
    return "\n".join(lines) + "\n"


def _print_summary(summary: dict[str, Any]) -> None:
    from .report import console_table, summary_line

    print(console_table(summary))
    print(summary_line(summary))


def refuse_ignored(a, s: SweepSettings) -> None:
    """Flags that no chosen method reads are errors (they would be recorded in every run's config, yet change
    nothing)."""
    given = lambda *names: changed(s, *names, given=a)  # noqa: E731
    if s.target.startswith("random:"):
        refuse(given("dataset"), f"--target {s.target} has random weights, so its prompts are random token ids")
    if not any(BY_NAME[m].quant for m in s.methods):
        refuse(given("kv_quant", "resident_layers", "resident_format", "resident_policy", "clamp_resident"),
               "only the mspeckv_kv_quant method reads them, and --methods leaves it out")
    if not any(m in RETRIEVAL_METHODS for m in s.methods):
        refuse(given("budget", "chunk", "draft_gamma", "l1_press"), "only the mspeckv methods read them, and "
               "--methods leaves them out")
    if not any(m in SPEC_METHODS for m in s.methods):
        refuse(given("draft", "gamma"), "only the speculative methods read them, and --methods leaves them out")
    if all(m in HF_METHODS for m in s.methods):
        refuse(given("press"), f"{','.join(HF_METHODS)} run transformers' own cache, which takes no press")
    if s.press is not None and (ref := [m for m in s.methods if m in REFERENCE_METHODS]):
        refuse(given("press"), f"{','.join(ref)} are press-free references (every layer's full KV on the GPU); "
               f"run them in a sweep without --press")


def cmd_sweep(a) -> int:
    s = settings_from_args(a)
    refuse_ignored(a, s)
    validate(s)
    out_dir("--output-dir", s.output_dir)
    check_output_dir(s)
    out = Path(s.output_dir)
    store = RunStore(out)
    specs = plan(s, s.weights)
    todo = [sp for sp in specs if not store.done(sp)]
    planned = [[sp.method, sp.x, sp.seed] for sp in specs]  # report counts these (and earlier invocations')
    planned += [k for k in read_json_object(out / "sweep.json").get("planned") or [] if k not in planned]
    fixed = {"sweep": s.sweep, "experiment": s.experiment, "weights": s.weights, "fixed": s.fixed(),
             "planned": planned}
    if todo:
        from . import methods

        ctx = methods.load_context(s)

        def fn(spec: RunSpec) -> dict[str, Any]:
            with warnings.catch_warnings():
                if s.weights == "random":  # random draft = target shape by construction: not a mistake here
                    warnings.filterwarnings("ignore", message=r"the draft .* is not smaller")
                return methods.METHOD_FNS[spec.method](ctx, spec.x, spec.seed)

        atomic_write_json(out / "sweep.json", fixed)
        old = (out / "command.txt").read_text(encoding="utf-8") if (out / "command.txt").is_file() else ""
        atomic_write_text(out / "command.txt", old + _command_lines(a, s))
        run_sweep(store, specs, fn, progress=not a.no_progress)
    from .report import render

    _print_summary(render(out))
    return 0


def cmd_report(a) -> int:
    from .report import render

    if not Path(a.dir).is_dir():
        raise ValueError(f"{a.dir} is not a folder, so there is no run directory to report (give the --output-dir "
                         f"of a sweep)")
    out_dir("DIR", a.dir)  # the summary files are written there
    _print_summary(render(a.dir))
    return 0


def add_sweep_commands(sub) -> None:
    """Register ``sweep <name>`` and ``report DIR`` on the CLI's subparsers object."""
    p = sub.add_parser("sweep", help="end-to-end sweeps over methods and seeds (results/<sweep>/...)")
    ss = p.add_subparsers(dest="sweep", required=True)
    for d in SWEEPS.values():
        q = ss.add_parser(d.name, help=f"{d.experiment}: sweep {d.x_name}")
        add_flags(q, CONFIGS[d.name])  # the config's fields; the two flags below are not settings of the runs
        q.add_argument("--greedy", action="store_true", help="temperature 0")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("report", help="re-render a sweep directory's summary from its raw run JSONs")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_report)
