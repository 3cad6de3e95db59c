"""What a sweep is: its definition (``SweepDef``, ``SWEEPS``), its settings (``SweepSettings`` and one subclass per
sweep, ``CONFIGS``), what one x value means for a run (``Point``) and the target's placement per method. Read by the
sweep command (``sweeps``) and the methods that run one point (``methods``), so neither imports the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import validate as v
from ..runs.template import check_fields, opt
from .registry import BY_NAME, DEFAULT_METHODS, METHODS

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


SWEEPS = {d.name: d for d in (
    SweepDef("context", "A1", "prefill", "--prefill-lengths", (8192, 16384, 24576, 32768), (2048, 4096)),
    SweepDef("resident", "A2", "resident_layers", "--resident-layers-values", (0, 8, 16), (0, 8, 16), 16384),
    SweepDef("onchip", "B1", "on_chip", "--on-chip-layers", (4, 8, 12, 16, 18), (4, 8, 12, 16, 18), 16384),
    SweepDef("genlen", "B2", "gen_len", "--gen-lens", (256, 512, 768, 1024, 1536, 2048), (64, 128), 8192, None),
)}


@dataclass(frozen=True)
class Point:
    """What one x value means for a run."""

    prefill: int
    gen_len: int
    on_chip: int
    resident: int  # used by mspeckv_kv_quant only


@dataclass(frozen=True)
class SweepSettings:
    """One sweep's settings; its ``opt`` fields are the flags of ``mspeckv sweep <name>`` (``runs.template``). Each
    sweep has its own subclass (:data:`CONFIGS`, made by :func:`sweep_config`) with its x flag, its defaults and
    its ``--quick`` preset; the swept knob's own field is None there and not a flag. The field names are the keys
    of the ``config`` recorded in every run (a resume compares them), so they stay as they are."""

    sweep: str = opt("", "the sweep", cli=False, choices=tuple(SWEEPS))
    experiment: str = opt("", "the experiment (A1, A2, B1, B2)", cli=False, check=False)
    x_name: str = opt("", "the swept knob", cli=False, check=False)
    xs: tuple[int, ...] = opt((), "x values", cli=False, check=False)
    target: str = opt("qwen2.5-coder-1.5b", "model reference or random:<shape>")
    draft: str = opt("qwen2.5-coder-0.5b", "model reference or random:<shape> (seed 1)")
    dataset: str | None = opt(None, "none: packaged BBC News; or a .txt/.jsonl/directory path")
    seeds: tuple[int, ...] = opt(DEFAULT_SEEDS, "prompt + sampling seeds", lo=0)
    methods: tuple[str, ...] = opt(DEFAULT_METHODS, f"subset of {','.join(METHODS)}", choices=METHODS)
    temperature: float = opt(0.6, "sampling temperature")
    top_p: float = opt(0.9, "nucleus sampling threshold")
    budget: int = opt(4096, f"retrieval budget (--quick: {QUICK_BUDGET})", lo=1)
    chunk: int = opt(8, "retrieval chunk size", lo=1)
    gamma: int = opt(8, "proposals per full-KV verification", lo=1)
    draft_gamma: int = opt(4, "proposals per retrieval verification", lo=1)
    # the swept knob's own value is None (these four are checked in ``__post_init__``)
    on_chip: int | None = opt(16, "layers whose KV stays on the GPU", check=False)
    resident_layers: int | None = opt(16, "mspeckv_kv_quant only", check=False)
    kv_quant: str = opt("int8", "mspeckv_kv_quant format: int8 | int4 | int2", choices=("int8", "int4", "int2"))
    kv_group_size: int = opt(64, "quantization group size", lo=1)
    resident_format: str = opt("dequant", "resident copies: dequant | quant", choices=("dequant", "quant"))
    resident_policy: str = opt("lru", "which offloaded layers stay resident: lru | static", choices=("lru", "static"))
    clamp_resident: bool = opt(False, "cap resident layers at the offloaded count per x instead of refusing")
    prefill: int | None = opt(None, "prompt tokens", check=False)
    gen_len: int | None = opt(None, "generated tokens", check=False)
    prefill_chunk: int = opt(1024, "prefill chunk (tokens)", lo=1)
    # resolved by settings_from_args
    device: str | None = opt(None, "cpu | cuda (none: cuda if available)", check=False)
    quick: bool = opt(False, f"sanity preset: budget {QUICK_BUDGET}, prefill {QUICK_PREFILL} (context: 2048,4096), "
                      f"gen {QUICK_GEN} (genlen: 64,128), --clamp-resident")
    # set by settings_from_args
    output_dir: str | None = opt(None, "none: results/<sweep>/<config-derived name>/", check=False)
    # the target's KV press (every method of ours; lossy, measured in results/quality)
    press: str | None = opt(None, "press the target's KV after prefill in every method of ours (lossy; "
                            "name:k=v,... | preset | FILE.yaml)")
    # the mspeckv methods' middle-level press (lossless); None: retrieval
    l1_press: str | None = opt(None, "the mspeckv methods' middle-level press (none: retrieval)")

    def __post_init__(self):
        check_fields(self)
        try:
            v.integers("xs", self.xs, lo=0)
        except v.ConfigError:
            raise v.ConfigError(f"{SWEEPS[self.sweep].x_flag if v.in_cli() else 'xs'} must be non-empty, distinct "
                                f"integers >= 0, got {self.xs!r}") from None
        for k, lo in (("on_chip", 0), ("resident_layers", 0), ("prefill", 1), ("gen_len", 1)):
            v.integer(k, getattr(self, k), lo=lo, optional=k == self.x_name)  # the swept knob's own value is None
        v.choice("device", self.device, ("cpu", "cuda"))
        if not isinstance(self.output_dir, str):
            raise v.ConfigError(f"{v.name('output_dir')} must be a path, got {self.output_dir!r}")
        from ..presses import parse_press

        for k in ("press", "l1_press"):  # a bad spec fails before any model loads
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


def sweep_config(d: SweepDef) -> type[SweepSettings]:
    """``SweepSettings`` for one sweep: its identity, its x values under its own flag (``d.x_flag``), its fixed
    prefill and generation length, the swept knob's field None and not a flag, and its ``--quick`` preset."""
    swept = {"prefill": d.prefill, "gen_len": d.gen_len, "on_chip": None if d.x_name == "on_chip" else 16,
             "resident_layers": None if d.x_name == "resident_layers" else 16}
    base = {f.name: f for f in dataclasses.fields(SweepSettings)}
    knob = lambda name, default: opt(default, base[name].metadata["help"], cli=default is not None, check=False)
    quick = {"budget": QUICK_BUDGET, "xs": d.quick_xs, "clamp_resident": True}
    quick |= {"prefill": QUICK_PREFILL} if d.prefill is not None else {}
    quick |= {"gen_len": QUICK_GEN} if d.gen_len is not None else {}
    fields = [("sweep", str, opt(d.name, "the sweep", cli=False)),
              ("experiment", str, opt(d.experiment, "the experiment", cli=False)),
              ("x_name", str, opt(d.x_name, "the swept knob", cli=False)),
              ("xs", tuple[int, ...], opt(d.xs, f"x values ({d.x_name})", flag=d.x_flag, check=False)),
              *((k, int | None, knob(k, x)) for k, x in swept.items()),
              ("quick", bool, opt(False, base["quick"].metadata["help"], preset=quick))]
    cls = dataclasses.make_dataclass(f"{d.name.capitalize()}SweepSettings", fields, bases=(SweepSettings,),
                                     frozen=True)
    cls.__module__ = __name__
    return cls


CONFIGS: dict[str, type[SweepSettings]] = {name: sweep_config(d) for name, d in SWEEPS.items()}



def placement_for(s: SweepSettings, method: str, p: Point):
    """The target's KV placement for a method at one point (hf_assisted: None, it uses transformers' cache)."""
    from ..kv.placement import Placement

    if not BY_NAME[method].placement:
        return None
    quant = BY_NAME[method].quant
    return Placement(on_chip=p.on_chip, kv_quant=s.kv_quant if quant else "none", kv_group_size=s.kv_group_size,
                     resident_layers=p.resident if quant else 0, resident_format=s.resident_format,
                     resident_policy=s.resident_policy)
