"""What one evaluated configuration is (a press and/or a KV placement), and every call the evals make into the
press/cache API: this is the only module of ``mspeckv.evals`` that touches presses. Caches that report no
``kv_bytes`` (DenseKV, StaticKV, PlacedKV) have their held rows counted here (:func:`kv_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the cache modules load lazily: `mspeckv --help` and `mspeckv data` stay fast
    from torch import Tensor

    from ..kv.placement import Placement

BASELINE = "full"


def parse_press(spec: str):
    """The Press object for a spec string, preset name or YAML file (one clear ValueError when it is bad)."""
    from ..presses import parse_press as parse

    try:
        return parse(spec)
    except (KeyError, TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("--press") else f"--press {spec!r}: {msg}") from e


@dataclass(frozen=True)
class Variant:
    """One row of every table: ``press`` (a spec string or None) on top of ``placement`` (None: all on the GPU)."""

    press: str | None = None
    placement: Placement | None = None

    @property
    def is_baseline(self) -> bool:
        return self.press is None and _default(self.placement)

    @property
    def name(self) -> str:
        if self.is_baseline:
            return BASELINE
        parts = [] if self.press is None else [self.press]
        p = self.placement
        if not _default(p):
            q = f"kv={p.kv_quant}/g{p.kv_group_size}/res{p.rollback_slack}"
            if p.on_chip is not None:
                q += f"/onchip{p.on_chip}"
            if p.resident_layers:
                q += f"/resident{p.resident_layers}"
            parts.append(q)
        return "+".join(parts)

    def describe(self) -> dict:
        from ..kv.placement import Placement

        p = self.placement or Placement()
        return {"name": self.name, "press": self.press, "kv_quant": p.kv_quant, "on_chip": p.on_chip,
                "kv_group_size": p.kv_group_size, "kv_residual": p.rollback_slack,
                "resident_layers": p.resident_layers}

    def validate(self, n_layers: int, head_dim: int) -> None:
        """Checks that need only the model's config (no weights): the placement, and that the press parses."""
        if self.placement is not None:
            self.placement.validate(n_layers, head_dim)
        if self.press is not None:
            press = parse_press(self.press)
            calib = getattr(press, "calib", None)  # low-rank: its projections are read at the first compress
            if calib:
                from pathlib import Path

                if not Path(calib).exists():
                    raise ValueError(f"--press {self.press}: calibration {calib} does not exist; make it with "
                                     f"`mspeckv presses calibrate --model MODEL --out {calib}`")


FLOOR_SINKS = 4  # StreamingLLMPress's default sinks


def floor_spec(keep: int) -> str:
    """The context floor's press: StreamingLLM keeping the last ``keep`` prefix tokens plus its sinks."""
    return f"streaming:budget={keep + FLOOR_SINKS},sinks={FLOOR_SINKS}"


def _default(p) -> bool:
    """No placement, or one that keeps every layer's KV dense on the device."""
    if p is None:
        return True
    from ..kv.placement import Placement

    return p == Placement()


# -------------------------------------------------------------------------------------------------- cache plumbing
def build_cache(model, variant: Variant, batch: int, max_len: int, tail: int | None = None, graphs: bool = False):
    """The cache a variant implies (the full-cache baseline: a DenseKV). ``tail``: the most rows appended after
    ``compress()`` (a pressed cache preallocates that many; default ``max_len``). ``graphs``: the static layout
    where one exists (full: StaticKV; placements: static PlacedKV; presses that keep dense rows: static PressedKV;
    codes and latents stay eager)."""
    from ..cache import make_cache

    press = None if variant.press is None else parse_press(variant.press)
    return make_cache(model, variant.placement, batch, max_len, press=press, tail=tail, graphs=graphs)


def held(cache, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """(k, v, positions) of the rows a cache holds for one layer: (B, H, n, D) x2 and (B, H, n) absolute positions."""
    k, v = cache.read(layer)
    return k, v, cache.positions(layer)


def kv_bytes(cache) -> int:
    """Bytes of the KV tensors the cache actually holds now (all layers; preallocated but unused room excluded).

    A pressed cache (``memory_report()['compressed']``): its stores + shared tensors + the tail rows appended since
    the compress (its report's ``kv_bytes`` also counts the whole preallocated tail and a decode scratch buffer,
    which are working memory, not held KV). A press before its compress: its inner cache."""
    from ..kv.pressed import PressedKV

    r = cache.memory_report()
    if isinstance(cache, PressedKV):
        if r.get("compressed") and "store_bytes" in r:
            row = 2 * cache.n_layers * cache.B * cache.H * cache.D * cache.dtype.itemsize
            return int(r["store_bytes"]) + int(r.get("shared_bytes", 0)) + cache.n_tail * row
        if r.get("compressed") is False and cache.inner is not None:
            return kv_bytes(cache.inner)
    if "kv_bytes" in r:
        return int(r["kv_bytes"])
    import torch

    from ..kv.dense import DenseKV
    from ..kv.offload import PlacedKV
    from ..kv.static import StaticKV

    n = cache.length()
    if isinstance(cache, DenseKV | StaticKV):  # the rows held (a static buffer's capacity is not counted)
        return sum(t[:, :, :n].numel() * t.element_size() for t in cache.k + cache.v)
    if isinstance(cache, PlacedKV):
        total = kv_bytes(cache.dense) if cache.dense is not None else 0
        row = cache.B * cache.H * cache.D * torch.empty((), dtype=cache.dtype).element_size()
        for layer in cache.off:
            ks, vs = cache.store[layer]
            total += ks.nbytes(cache.flushed) + vs.nbytes(cache.flushed) + 2 * (n - cache.flushed) * row
        return total
    raise TypeError(f"cannot count the KV bytes of a {type(cache).__name__}: it has no memory_report()['kv_bytes']")


def spec_config(variant: Variant, **kw):
    """The SpecConfig for the ``accept`` metric: the variant's press becomes the MSpecKV middle level (``l1_press``);
    without a press the middle level is today's retrieval cache."""
    from ..decoding.speculative import SpecConfig

    return SpecConfig(mode="mspeckv", l1_press=variant.press, **kw)
