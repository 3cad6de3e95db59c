"""``mspeckv sweep {context,resident,onchip,genlen}`` and ``mspeckv report DIR``: the four end-to-end sweeps.

=========  ==================  ==========================  ==========================================
sweep      experiment          x (``x_name``)              defaults
=========  ==================  ==========================  ==========================================
context    A1 context length   prefill                     8192,16384,24576,32768; gen 256
resident   A2 resident layers  resident_layers             0,8,16; prefill 16384, gen 256
onchip     B1 on-chip layers   on_chip                     4,8,12,16,18; prefill 16384, gen 256
genlen     B2 generation len   gen_len                     256,512,768,1024,1536,2048; prefill 8192
=========  ==================  ==========================  ==========================================

Methods (``mspeckv.bench.methods``): baseline (AR), vanilla_specdec, mspeckv (hierarchy, bf16 KV), mspeckv_kv_quant
(hierarchy, int8 offloaded KV + resident layers), hf_assisted (transformers assisted generation), and two references
run only when asked for: ar_gpu (AR with every layer on the GPU, CUDA-graphed) and hf_ar (transformers' plain AR with
DynamicCache on the GPU); neither reads the sweep's placement or press. The resident value
(flag or swept x) applies to mspeckv_kv_quant only; every other method keeps resident 0.

``--quick`` is a cheap sanity preset: budget 1024, prefill 2048 (context sweep: 2048,4096), gen 128 (genlen sweep:
64,128), and ``--clamp-resident`` (so it runs on the 28-layer default target, where 16 on-chip layers leave only 12
to offload). Flags given explicitly win over the preset. ``--clamp-resident`` caps the resident layers at the number
of offloaded layers for each x (the count used is in each run's metrics, ``resident_layers``); without it a resident
count above the offloaded layers is an error that names the x values.

The flags are generated from ``SweepSettings``' fields (``evals.template``, as for ``mspeckv eval`` and ``mspeckv
bench``): one subclass per sweep (``CONFIGS``) gives its x flag, defaults and ``--quick`` preset; ``--greedy``,
``--no-progress``, ``--device`` (resolved) and the default ``--output-dir`` are applied by ``settings_from_args``.
Every flag is validated (models' configs included, weights not loaded) before anything is loaded or written; each
problem raises one ValueError that names the flag and, for per-x problems, the x values. Runs go through
``results.run_sweep`` (one atomic JSON per run under ``DIR/runs``, resumable, failures recorded) and the summary through
``report.render``. ``DIR/sweep.json`` pins the settings that shape results (a resume with different ones is refused);
``DIR/command.txt`` collects the command lines. The exit status is 0 once the summary is written, failed runs
included (``n_failed`` in the JSON line says how many).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import validate as v
from ..evals.template import add_flags, flag_name, from_args, opt
from .registry import BY_NAME, DEFAULT_METHODS, HF_METHODS, METHODS, REFERENCE_METHODS, RETRIEVAL_METHODS, SPEC_METHODS
from .results import RunSpec, RunStore, atomic_write_json, atomic_write_text, run_sweep

DEFAULT_SEEDS = (1, 2, 3)
QUICK_BUDGET, QUICK_PREFILL, QUICK_GEN = 1024, 2048, 128


@dataclass(frozen=True)
class SweepDef:
    name: str
    experiment: str
    x_name: str
    x_flag: str
    xs: tuple[int, ...]
    quick_xs: tuple[int, ...]
    prefill: int | None = None  # fixed prefill (None: prefill is the x)
    gen_len: int | None = 256  # fixed generation length (None: gen_len is the x)


SWEEPS = {
    d.name: d
    for d in (
        SweepDef("context", "A1", "prefill", "--prefill-lengths", (8192, 16384, 24576, 32768), (2048, 4096)),
        SweepDef("resident", "A2", "resident_layers", "--resident-layers-values", (0, 8, 16), (0, 8, 16), 16384),
        SweepDef("onchip", "B1", "on_chip", "--on-chip-layers", (4, 8, 12, 16, 18), (4, 8, 12, 16, 18), 16384),
        SweepDef("genlen", "B2", "gen_len", "--gen-lens", (256, 512, 768, 1024, 1536, 2048), (64, 128), 8192, None),
    )
}


@dataclass(frozen=True)
class Point:
    """What one x value means for a run."""

    prefill: int
    gen_len: int
    on_chip: int
    resident: int  # used by mspeckv_kv_quant only


@dataclass(frozen=True)
class SweepSettings:
    """One sweep's settings; its ``opt`` fields are the flags of ``mspeckv sweep <name>`` (``evals.template``). Each
    sweep has its own subclass (:data:`CONFIGS`, made by :func:`sweep_config`) with its x flag, its defaults and
    its ``--quick`` preset; the swept knob's own field is None there and not a flag. The field names are the keys
    of the ``config`` recorded in every run (a resume compares them), so they stay as they are."""

    sweep: str = opt("", "the sweep", cli=False)
    experiment: str = opt("", "the experiment (A1, A2, B1, B2)", cli=False)
    x_name: str = opt("", "the swept knob", cli=False)
    xs: tuple[int, ...] = opt((), "x values", cli=False)
    target: str = opt("qwen2.5-coder-1.5b", "model reference or random:<shape>")
    draft: str = opt("qwen2.5-coder-0.5b", "model reference or random:<shape> (seed 1)")
    dataset: str | None = opt(None, "none: packaged BBC News; or a .txt/.jsonl/directory path")
    seeds: tuple[int, ...] = opt(DEFAULT_SEEDS, "prompt + sampling seeds")
    methods: tuple[str, ...] = opt(DEFAULT_METHODS, f"subset of {','.join(METHODS)}", choices=METHODS)
    temperature: float = opt(0.6, "sampling temperature")
    top_p: float = opt(0.9, "nucleus sampling threshold")
    budget: int = opt(4096, f"retrieval budget (--quick: {QUICK_BUDGET})")
    chunk: int = opt(8, "retrieval chunk size")
    gamma: int = opt(8, "proposals per full-KV verification")
    draft_gamma: int = opt(4, "proposals per retrieval verification")
    on_chip: int | None = opt(16, "layers whose KV stays on the GPU")  # None when it is the swept x
    resident_layers: int | None = opt(16, "mspeckv_kv_quant only")  # None when it is the swept x
    kv_quant: str = opt("int8", "mspeckv_kv_quant format: int8 | int4 | int2", choices=("int8", "int4", "int2"))
    kv_group_size: int = opt(64, "quantization group size")
    resident_format: str = opt("dequant", "resident copies: dequant | quant", choices=("dequant", "quant"))
    resident_policy: str = opt("lru", "which offloaded layers stay resident: lru | static", choices=("lru", "static"))
    clamp_resident: bool = opt(False, "cap resident layers at the offloaded count per x instead of refusing")
    prefill: int | None = opt(None, "prompt tokens")  # None when it is the swept x
    gen_len: int | None = opt(None, "generated tokens")  # None when it is the swept x
    prefill_chunk: int = opt(1024, "prefill chunk (tokens)")
    device: str | None = opt(None, "cpu | cuda (none: cuda if available)")  # resolved by settings_from_args
    quick: bool = opt(False, f"sanity preset: budget {QUICK_BUDGET}, prefill {QUICK_PREFILL} (context: 2048,4096), "
                      f"gen {QUICK_GEN} (genlen: 64,128), --clamp-resident")
    output_dir: str | None = opt(None, "none: results/<sweep>/<config-derived name>/")  # set by settings_from_args
    # the target's KV press (every method of ours; lossy, measured in results/quality)
    press: str | None = opt(None, "press the target's KV after prefill in every method of ours (lossy; "
                            "name:k=v,... | preset | FILE.yaml)")
    # the mspeckv methods' middle-level press (lossless); None: retrieval
    l1_press: str | None = opt(None, "the mspeckv methods' middle-level press (none: retrieval)")

    def __post_init__(self):
        v.choice("sweep", self.sweep, tuple(SWEEPS))
        try:
            v.integers("xs", self.xs, lo=0)
        except v.ConfigError:
            raise v.ConfigError(f"{SWEEPS[self.sweep].x_flag if v.in_cli() else 'xs'} must be non-empty, distinct "
                                f"integers >= 0, got {self.xs!r}") from None
        v.text("target", self.target)
        v.text("draft", self.draft)
        v.text("dataset", self.dataset, optional=True)
        v.integers("seeds", self.seeds, lo=0)
        v.choices("methods", self.methods, METHODS)
        for k in ("budget", "chunk", "gamma", "draft_gamma", "kv_group_size", "prefill_chunk"):
            v.integer(k, getattr(self, k), lo=1)
        for k, lo in (("on_chip", 0), ("resident_layers", 0), ("prefill", 1), ("gen_len", 1)):
            v.integer(k, getattr(self, k), lo=lo, optional=k == self.x_name)  # the swept knob's own value is None
        v.choice("kv_quant", self.kv_quant, ("int8", "int4", "int2"))
        v.choice("resident_format", self.resident_format, ("dequant", "quant"))
        v.choice("resident_policy", self.resident_policy, ("lru", "static"))
        v.boolean("clamp_resident", self.clamp_resident)
        v.boolean("quick", self.quick)
        v.choice("device", self.device, ("cpu", "cuda"))
        if not isinstance(self.output_dir, str):
            raise v.ConfigError(f"{v.name('output_dir')} must be a path, got {self.output_dir!r}")
        from ..presses import parse_press

        for k in ("press", "l1_press"):  # a bad spec fails before any model loads
            v.text(k, getattr(self, k), optional=True)
            parse_press(getattr(self, k))

    def point(self, x: int, n_layers: int | None = None) -> Point:
        p = Point(self.prefill if self.x_name != "prefill" else x, self.gen_len if self.x_name != "gen_len" else x,
                  self.on_chip if self.x_name != "on_chip" else x,
                  self.resident_layers if self.x_name != "resident_layers" else x)
        if self.clamp_resident and n_layers is not None:
            p = dataclasses.replace(p, resident=min(p.resident, max(0, n_layers - p.on_chip)))
        return p

    @property
    def weights(self) -> str:
        return "random" if self.target.startswith("random:") or self.draft.startswith("random:") else "real"

    def flags(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def fixed(self) -> dict[str, Any]:
        """The settings that shape every run's numbers (a resume must not change them)."""
        return {k: v for k, v in self.flags().items() if k not in ("xs", "seeds", "methods", "output_dir", "quick")}


# ------------------------------------------------------------------------------------------------------ parsing
def sweep_config(d: SweepDef) -> type[SweepSettings]:
    """``SweepSettings`` for one sweep: its identity, its x values under its own flag (``d.x_flag``), its fixed
    prefill and generation length, the swept knob's field None and not a flag, and its ``--quick`` preset."""
    swept = {"prefill": d.prefill, "gen_len": d.gen_len, "on_chip": None if d.x_name == "on_chip" else 16,
             "resident_layers": None if d.x_name == "resident_layers" else 16}
    base = {f.name: f for f in dataclasses.fields(SweepSettings)}
    knob = lambda name, default: opt(default, base[name].metadata["help"], cli=default is not None)
    quick = {"budget": QUICK_BUDGET, "xs": d.quick_xs, "clamp_resident": True}
    quick |= {"prefill": QUICK_PREFILL} if d.prefill is not None else {}
    quick |= {"gen_len": QUICK_GEN} if d.gen_len is not None else {}
    fields = [("sweep", str, opt(d.name, "the sweep", cli=False)),
              ("experiment", str, opt(d.experiment, "the experiment", cli=False)),
              ("x_name", str, opt(d.x_name, "the swept knob", cli=False)),
              ("xs", tuple[int, ...], opt(d.xs, f"x values ({d.x_name})", flag=d.x_flag)),
              *((k, int | None, knob(k, x)) for k, x in swept.items()),
              ("quick", bool, opt(False, base["quick"].metadata["help"], preset=quick))]
    cls = dataclasses.make_dataclass(f"{d.name.capitalize()}SweepSettings", fields, bases=(SweepSettings,),
                                     frozen=True)
    cls.__module__ = __name__
    return cls


CONFIGS: dict[str, type[SweepSettings]] = {name: sweep_config(d) for name, d in SWEEPS.items()}


def _changed(a, s: SweepSettings, *names: str) -> list[str]:
    """The flags among ``names`` given with a value other than the sweep's default (a value that only ``--quick``
    set counts as not given)."""
    fields = {f.name: f for f in dataclasses.fields(s)}
    return [flag_name(fields[n]) for n in names if getattr(a, n, None) is not None and
            getattr(s, n) != fields[n].default]


def settings_from_args(a) -> SweepSettings:
    """argparse namespace -> SweepSettings: the template's ``from_args`` (flags parsed and checked, ``--quick``
    applied), then what it cannot express: ``--device`` resolved, ``--greedy`` (temperature 0) and the default
    ``--output-dir``. No model needed."""
    from ..cli_checks import refuse
    from ..model.api import parse_device

    s = from_args(CONFIGS[a.sweep], a, device=parse_device(a.device).type, output_dir=a.output_dir or "")
    if a.greedy:
        refuse(_changed(a, s, "temperature", "top_p"), "--greedy decodes greedily, so sampling settings do nothing")
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
def model_config(ref: str):
    """A model's ``ModelConfig`` from its config alone (random shape or resolved directory; weights not loaded)."""
    from transformers import AutoConfig

    from ..model.api import RANDOM_SHAPES
    from ..model.llama import ModelConfig

    if ref.startswith("random:"):
        shape = ref.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"unknown random shape '{shape}' in {ref}; choose one of {sorted(RANDOM_SHAPES)}")
        kw = dict(RANDOM_SHAPES[shape])
        return ModelConfig.from_hf(AutoConfig.for_model(kw.pop("model_type"), **kw))
    from ..model.loading import hf_config

    return ModelConfig.from_hf(hf_config(ref))  # from the GGUF header when not prepared: nothing is converted


def placement_for(s: SweepSettings, method: str, p: Point):
    """The target's KV placement for a method at one point (hf_assisted: None, it uses transformers' cache)."""
    from ..kv.placement import Placement

    if not BY_NAME[method].placement:
        return None
    quant = BY_NAME[method].quant
    return Placement(on_chip=p.on_chip, kv_quant=s.kv_quant if quant else "none", kv_group_size=s.kv_group_size,
                     resident_layers=p.resident if quant else 0, resident_format=s.resident_format,
                     resident_policy=s.resident_policy)


def _per_x(s: SweepSettings, checks) -> None:
    """Run every ``check(x)`` for every x; identical messages are merged and name every x they hold for."""
    errs: dict[str, list[int]] = {}
    for x in s.xs:
        for check in checks:
            try:
                check(x)
            except ValueError as e:
                errs.setdefault(str(e), []).append(x)
    if errs:
        raise ValueError("; ".join(f"{m} (at {s.x_name}={','.join(map(str, xs))})" for m, xs in errs.items()))


def validate(s: SweepSettings):
    """Every check that can fail before a model is loaded. Returns (target ModelConfig, draft ModelConfig or None)."""
    from ..config import GenerationConfig, SamplingConfig
    from ..decoding.speculative import SpecConfig

    SamplingConfig(temperature=s.temperature, top_p=s.top_p)
    if s.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be >= 1, got {s.prefill_chunk}")
    if any(m in RETRIEVAL_METHODS for m in s.methods):
        SpecConfig(mode="mspeckv", gamma=s.gamma, draft_gamma=s.draft_gamma, budget=s.budget, chunk=s.chunk)
    elif "vanilla_specdec" in s.methods:
        SpecConfig(mode="vanilla", gamma=s.gamma, draft_gamma=s.draft_gamma)
    if s.kv_quant not in ("int8", "int4", "int2"):
        raise ValueError(f"--kv-quant must be int8, int4 or int2 (the mspeckv_kv_quant format), got '{s.kv_quant}'")
    tcfg = model_config(s.target)
    dcfg = model_config(s.draft) if any(m in SPEC_METHODS for m in s.methods) else None
    if dcfg is not None and dcfg.vocab_size != tcfg.vocab_size:
        raise ValueError(f"--draft {s.draft} has a vocabulary of {dcfg.vocab_size}, the target {s.target} one of "
                         f"{tcfg.vocab_size}; pick a draft with the target's tokenizer (random targets: the same "
                         f"random:<shape>, which gets its own weights)")
    if not s.target.startswith("random:"):
        from ..data.corpora import load_documents

        load_documents(s.dataset)  # missing corpus / bad path: its own clear error

    def lengths(x: int) -> None:
        p = s.point(x, tcfg.n_layers)
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

    def budget(x: int) -> None:
        p = s.point(x, tcfg.n_layers)
        if any(m in RETRIEVAL_METHODS for m in s.methods) and s.budget >= p.prefill:
            raise ValueError(f"--budget {s.budget} is not smaller than prefill {p.prefill}: the retrieval level would "
                             f"hold the whole prompt; lower --budget")

    def placements(x: int) -> None:
        p = s.point(x, tcfg.n_layers)
        for m in s.methods:
            pl = placement_for(s, m, p)
            if pl is not None:
                try:
                    pl.validate(tcfg.n_layers, tcfg.head_dim)
                except ValueError as e:
                    resident = v.name("resident_layers") in str(e)
                    hint = " for mspeckv_kv_quant (or pass --clamp-resident)" if resident else ""
                    raise ValueError(f"{e}{hint}") from None

    _per_x(s, (lengths, budget, placements))
    return tcfg, dcfg


def check_output_dir(s: SweepSettings) -> None:
    """Refuse to resume a directory whose runs were made with different settings."""
    f = Path(s.output_dir) / "sweep.json"
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text(encoding="utf-8")).get("fixed", {})
    except (OSError, ValueError, AttributeError):
        return
    new = json.loads(json.dumps(s.fixed()))
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
    typed = "mspeckv " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["sweep"] else None
    flags = {"--target": s.target, "--draft": s.draft, "--dataset": s.dataset, "--seeds": ",".join(map(str, s.seeds)),
             "--methods": ",".join(s.methods), "--temperature": s.temperature, "--top-p": s.top_p,
             "--budget": s.budget, "--chunk": s.chunk, "--gamma": s.gamma, "--draft-gamma": s.draft_gamma,
             "--kv-quant": s.kv_quant, "--kv-group-size": s.kv_group_size, "--resident-format": s.resident_format,
             "--resident-policy": s.resident_policy, "--prefill-chunk": s.prefill_chunk, "--device": s.device,
             "--output-dir": s.output_dir, SWEEPS[s.sweep].x_flag: ",".join(map(str, s.xs))}
    if s.x_name != "on_chip":
        flags["--on-chip"] = s.on_chip
    if s.x_name != "resident_layers":
        flags["--resident-layers"] = s.resident_layers
    if s.prefill is not None:
        flags["--prefill"] = s.prefill
    if s.gen_len is not None:
        flags["--gen-len"] = s.gen_len
    args = ["mspeckv", "sweep", s.sweep] + [t for k, v in flags.items() if v is not None for t in (k, str(v))]
    args += ["--clamp-resident"] if s.clamp_resident else []
    lines = ([typed] if typed else []) + ["# the same with every setting explicit:", shlex.join(args)]
    return "\n".join(lines) + "\n"


def _print_summary(summary: dict[str, Any]) -> None:
    from .report import console_table, summary_line

    print(console_table(summary))
    print(summary_line(summary))


def refuse_ignored(a, s: SweepSettings) -> None:
    """Flags that no chosen method reads are errors (they would be recorded in every run's config, yet change
    nothing)."""
    from ..cli_checks import refuse

    changed = lambda *names: _changed(a, s, *names)
    if not any(BY_NAME[m].quant for m in s.methods):
        refuse(changed("kv_quant", "resident_layers", "resident_format", "resident_policy", "clamp_resident"),
               "only the mspeckv_kv_quant method reads them, and --methods leaves it out")
    if not any(m in RETRIEVAL_METHODS for m in s.methods):
        refuse(changed("budget", "chunk", "draft_gamma", "l1_press"), "only the mspeckv methods read them, and "
               "--methods leaves them out")
    if not any(m in SPEC_METHODS for m in s.methods):
        refuse(changed("draft", "gamma"), "only the speculative methods read them, and --methods leaves them out")
    if all(m in HF_METHODS for m in s.methods):
        refuse(changed("press"), f"{','.join(HF_METHODS)} run transformers' own cache, which takes no press")
    if s.press is not None and (ref := [m for m in s.methods if m in REFERENCE_METHODS]):
        refuse(changed("press"), f"{','.join(ref)} are press-free references (every layer's full KV on the GPU); "
               f"run them in a sweep without --press")


def cmd_sweep(a) -> int:
    from ..cli_checks import out_dir

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
    try:
        old_planned = json.loads((out / "sweep.json").read_text(encoding="utf-8")).get("planned") or []
    except (OSError, ValueError, AttributeError):
        old_planned = []
    planned += [k for k in old_planned if k not in planned]
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
    from ..cli_checks import out_dir
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
