"""bench placement: host-memory refusal, failed cells, the floors (CPU smoke; the numbers are not results)."""

from mspeckv.bench.placement import (
    PlacementBenchConfig,
    mem_available,
    pinned_store_bytes,
    render_placement,
    run_placement_bench,
)
from mspeckv.kv.placement import Placement
from mspeckv.model.api import random_model


def test_pinned_store_bytes():
    c = random_model("tiny", "cpu").cfg  # 4 layers, 4 KV heads, head dim 64
    assert pinned_store_bytes(c, Placement(on_chip=1), 1000) == 3 * 2 * 4 * 1000 * 64 * 2
    int8 = Placement(on_chip=2, kv_quant="int8")  # 1 + 4/64 bytes per element, keys rounded up to whole groups
    assert pinned_store_bytes(c, int8, 1000) == 2 * 2 * 4 * 1024 * 64 * (1 + 4 / 64)
    assert pinned_store_bytes(c, Placement(), 1000) == 0  # nothing offloaded
    avail = mem_available()
    assert avail is None or avail > 0


def test_refused_cells_are_recorded_and_the_run_goes_on():
    cfg = PlacementBenchConfig(shape="tiny", contexts=(256,), on_chip=2, formats=("none", "int8"), residents=(0,),
                               steps=2, repeats=2, hf_reference=False, host_memory_bytes=1_000_000,
                               host_reserve_bytes=0)
    res = run_placement_bench(cfg, device="cpu")
    cells = {c["fmt"]: c for c in res["cells"]}
    assert cells["none"]["error"].startswith("refused:") and cells["none"]["ms_per_token"] is None  # 1.3 MB (fp32)
    assert cells["int8"]["error"] is None and cells["int8"]["ms_per_token"] > 0  # 0.4 MB: fits
    assert res["failed_cells"] == 1 and res["complete"]
    c = cells["int8"]
    assert c["floor_ms"] == max(c["transfer_floor_ms"], c["gpu_floor_ms"])
    assert abs(c["ratio_sum"] - c["ms_per_token"] / (c["transfer_floor_ms"] + c["gpu_floor_ms"])) < 1e-9
    assert c["gpu_floor_ms"] == res["all_on_gpu_graphed_ms"][256]  # the graphed step (eager on the CPU) is the floor
    # the static-layout timing of the same cell: bucketed copies (the whole 256-token store here: one bucket of
    # 1024 rounded down to the store) are at least the eager step's bytes, and its ratio uses its own floor
    assert c["graphed_error"] is None and c["graphed_ms"] > 0
    assert c["graphed_h2d_bytes_per_step"] >= c["h2d_bytes_per_step"] > 0
    assert c["graphed_ratio"] == c["graphed_ms"] / c["graphed_floor_ms"]
    assert cells["none"]["graphed_ms"] is None  # a refused cell is not timed graphed either
    md = render_placement(res)
    assert "FAILED" in md and "refused" in md and "MBU" in md
