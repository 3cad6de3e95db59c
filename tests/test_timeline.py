"""The compute/copy overlap of a profiled run, on hand-made traces with known answers."""

import pytest

from mspeckv.bench.timeline import gpu_events, summarize


def ev(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_overlap_split_of_a_known_trace():
    # kernels 0-100 and 150-250 (one overlapping pair merged: 200-250 inside 150-250); copy 50-200; span 0-300
    trace = {"traceEvents": [ev("kernel", "a", 0, 100), ev("kernel", "b", 150, 100), ev("kernel", "c", 200, 50),
                             ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 50, 150),
                             ev("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 0, 300),  # not a transfer: ignored
                             ev("kernel", "d", 290, 10), {"ph": "i", "cat": "kernel", "ts": 5}]}
    k, c = gpu_events(trace)
    assert len(k) == 4 and c == [(50.0, 200.0)]
    s = summarize(k, c, steps=2)  # per step: halve, and us -> ms
    assert s["span_ms"] == pytest.approx(0.150)
    assert s["compute_busy_ms"] == pytest.approx(0.105)  # 100 + 100 + 10 us
    assert s["copy_busy_ms"] == pytest.approx(0.075)
    assert s["overlap_ms"] == pytest.approx(0.050)  # 50-100 and 150-200
    assert s["copy_only_ms"] == pytest.approx(0.025)  # 100-150: compute waited on the copy
    assert s["idle_ms"] == pytest.approx(0.020)  # 250-290
    assert s["compute_only_ms"] + s["copy_only_ms"] + s["overlap_ms"] + s["idle_ms"] == pytest.approx(s["span_ms"])


def test_empty_trace_is_an_error():
    with pytest.raises(ValueError, match="no GPU kernels"):
        summarize([], [], 1)
