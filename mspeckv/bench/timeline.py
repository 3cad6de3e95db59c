"""Overlap of compute and copies in a profiled GPU run, from a torch.profiler (Kineto) Chrome trace.

A step's kernel time and copy time, summed, do not say how much of them ran at once. Here the trace's GPU events are
merged into busy intervals per stream kind (kernels of every stream = compute, host-to-device memcpys = copies), and
the run's span splits into: both busy (overlapped), only compute, only copies (compute waiting on a copy), neither
(idle: launch gaps, syncs). ``summarize(events, steps)`` divides by the number of profiled steps.
"""

from __future__ import annotations

import json
from pathlib import Path


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged [start, end) intervals."""
    out: list[list[float]] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(iv: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in iv)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        tot += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


def gpu_events(trace: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Chrome trace dict -> (kernel intervals, H2D copy intervals), in microseconds."""
    kern, copy = [], []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        cat, name = ev.get("cat", ""), ev.get("name", "")
        iv = (float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]))
        if cat == "kernel":
            kern.append(iv)
        elif cat == "gpu_memcpy" and "HtoD" in name:
            copy.append(iv)
    return kern, copy


def summarize(kernels: list[tuple[float, float]], copies: list[tuple[float, float]], steps: int) -> dict:
    """-> ms per step: span, compute busy, copies busy, overlapped, compute only, copies only, idle."""
    k, c = _union(kernels), _union(copies)
    if not k and not c:
        raise ValueError("the trace holds no GPU kernels or host-to-device copies")
    start = min(x[0] for x in (k[:1] + c[:1]))
    end = max(x[1] for x in (k[-1:] + c[-1:]))
    span, kb, cb = end - start, _length(k), _length(c)
    both = _intersect(k, c)
    per = 1e3 * steps  # us -> ms, per step
    return {"span_ms": span / per, "compute_busy_ms": kb / per, "copy_busy_ms": cb / per, "overlap_ms": both / per,
            "compute_only_ms": (kb - both) / per, "copy_only_ms": (cb - both) / per,
            "idle_ms": (span - (kb + cb - both)) / per}


def from_file(path: str | Path, steps: int) -> dict:
    return summarize(*gpu_events(json.loads(Path(path).read_text())), steps)
