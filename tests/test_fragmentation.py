"""A fragmentation OOM on the simulated device, its advice measured by replay, and the advice applied.

Ten [7][6][7] MiB triples fill ten 20 MiB segments of a 200 MiB card; with
the 7s freed, 60 MiB is allocated and 140 MiB reserved but unallocated, so a
10 MiB tensor fails (no free block is 10 MiB long).  Replayed with
``expandable_segments:True`` the ten 6 MiB tensors take three 20 MiB pages
and the 10 MiB tensor a fourth: 80 MiB reserved.  Sizes are as in
``tests/test_allocator.py``, worked out from the rules.
"""

from __future__ import annotations

import json
from typing import Any

from oomnb.model.units import MiB

REPORT = "application/vnd.oomnb.report+json"

SETUP = """
MiB = 2**20
triples = [(torch.empty(7 * MiB // 4), torch.empty(6 * MiB // 4), torch.empty(7 * MiB // 4)) for _ in range(10)]
kept = [middle for _first, middle, _last in triples]
del triples
"""

CELL = "%%gpumem\nbig = torch.empty(10 * MiB // 4)\n"


def _report(result: Any) -> dict[str, Any]:
    bundles = [o.data for o in result.captured.outputs if REPORT in o.data]
    assert bundles, result.captured.stdout
    return json.loads(json.dumps(bundles[-1][REPORT]))


def _fragment(shell: Any, conf: str) -> None:
    import gc

    from oomnb.backends.simulated import device

    gc.collect()
    assert device.allocated == 0, "tensors of an earlier test are still alive"
    assert shell.run("%gpumem allocator caching").success
    assert shell.run(f"%gpumem alloc-conf {conf}").success
    assert shell.run("%gpumem limit 200MiB --context 0").success
    assert shell.run(SETUP).success


def test_fragmentation_oom_is_explained_and_expandable_segments_measured(shell: Any) -> None:
    try:
        _fragment(shell, "default")
        from oomnb.backends.simulated import device

        assert (device.allocated, device.reserved) == (60 * MiB, 200 * MiB)
        report = _report(shell.run(CELL))
        oom = report["oom"]
        assert oom["requested_bytes"] == 10 * MiB
        assert oom["allocated_bytes"] == 60 * MiB
        assert oom["reserved_unallocated_bytes"] == 140 * MiB
        assert "the cache is fragmented" in oom["diagnosis"]
        found = [s for s in report["suggestions"] if s["kind"] == "expandable_segments"]
        assert len(found) == 1
        fix = found[0]
        assert fix["source"] == "dry-run" and fix["fits"] is True and fix["apply"] == "setup"
        # As is: 200 MiB reserved and a 10 MiB segment more; replayed: four 20 MiB pages.
        assert fix["saves_bytes"] == 210 * MiB - 80 * MiB
        assert "reserve 80.00 MiB at the peak instead of 210.00 MiB" in fix["detail"]
        assert 'os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"' in fix["code"]
        # Nothing the user had was lost, and the kernel goes on.
        assert len(shell.ns["kept"]) == 10 and "big" not in shell.ns
    finally:
        shell.run("%gpumem alloc-conf default")
        shell.run("%gpumem allocator exact")
        shell.run("%gpumem limit off")


def test_the_suggestion_applied_literally_makes_the_cell_fit(shell: Any) -> None:
    """What the suggestion says: restart with the setting, run the notebook again."""
    try:
        _fragment(shell, "expandable_segments:True")
        result = shell.run(CELL)
        report = _report(result)
        assert report["oom"] is None
        assert shell.ns["big"].numel() == 10 * MiB // 4
        from oomnb.backends.simulated import device

        # The freed 7 MiB ranges stay mapped (pages are unmapped only under
        # pressure) and joined, so the 10 MiB tensor takes one of them.
        assert (device.allocated, device.reserved) == (70 * MiB, 200 * MiB)
        # One expandable segment: its free ranges are not fragmentation.
        text = shell.run("%gpumem segments").captured.outputs[-1].data["text/plain"]
        assert text.startswith("simulated GPU: 1 segment, 200.00 MiB reserved: 70.00 MiB allocated, 130.00 MiB")
        assert text.endswith("(in expandable segments, whose free pages are mapped again where a request needs them).")
    finally:
        shell.run("%gpumem alloc-conf default")
        shell.run("%gpumem allocator exact")
        shell.run("%gpumem limit off")


def test_no_allocator_advice_where_fragmentation_did_not_cause_the_oom(shell: Any) -> None:
    """A cell that needs more than the card: reserved-but-unallocated is not the cause."""
    try:
        assert shell.run("%gpumem allocator caching").success
        assert shell.run("%gpumem limit 200MiB --context 0").success
        report = _report(shell.run("%%gpumem\nx = torch.empty(300 * 2**20 // 4)\n"))
        assert report["oom"] is not None
        assert all(s["kind"] != "expandable_segments" for s in report["suggestions"])
    finally:
        shell.run("%gpumem allocator exact")
        shell.run("%gpumem limit off")


def test_segments_show_the_fragmentation(shell: Any) -> None:
    """``%gpumem segments``: ten 20 MiB segments, each a 6 MiB tensor between two free 7 MiB blocks."""
    from oomnb.backends.simulated import device
    from oomnb.render.segments import from_snapshot, segments_figure

    try:
        _fragment(shell, "default")
        seg = from_snapshot(device.memory_snapshot(), "simulated")
        assert seg.segments == (("large", ((7 * MiB, False), (6 * MiB, True), (7 * MiB, False))),) * 10
        result = shell.run("%gpumem segments")
        assert result.success
        bundle = result.captured.outputs[-1].data
        assert bundle["text/plain"] == (
            "simulated GPU: 10 segments, 200.00 MiB reserved: 60.00 MiB allocated, 140.00 MiB cached in 20 free "
            "blocks; the largest free block is 7.00 MiB (5% of the cached memory: fragmented)."
        )
        assert bundle["image/png"]  # drawn
        assert len(segments_figure(seg).axes[0].patches) == 30
    finally:
        shell.run("%gpumem alloc-conf default")
        shell.run("%gpumem allocator exact")
        shell.run("%gpumem limit off")


def test_segments_without_the_cache_and_from_a_cuda_snapshot(shell: Any) -> None:
    from oomnb.backends.simulated import device
    from oomnb.render.segments import from_snapshot, segments_text

    assert shell.run("%gpumem allocator exact").success
    shell.run("MiB = 2**20\na = torch.empty(1000)\nb = torch.empty(3 * MiB // 4)")
    # Without the cache each storage is its own segment, rounded to 512 bytes.
    seg = from_snapshot(device.memory_snapshot(), "simulated")
    assert sorted(seg.segments) == [("large", ((3 * MiB, True),)), ("small", ((4096, True),))]
    assert segments_text(seg) == (
        "simulated: 2 segments, 3.00 MiB reserved: 3.00 MiB allocated, 0 B cached in 0 free blocks."
    )
    # torch.cuda.memory_snapshot()'s shape: unmapped pages are not reserved memory.
    cuda = [
        {
            "address": 1 << 20,
            "total_size": 4 * MiB,
            "segment_type": "large",
            "blocks": [
                {"size": 2 * MiB, "state": "active_allocated"},
                {"size": 2 * MiB, "state": "inactive"},
                {"size": 8 * MiB, "state": "unmapped"},
            ],
        }
    ]
    seg = from_snapshot(cuda, "cuda:0")
    assert (seg.reserved, seg.allocated, seg.free_blocks) == (4 * MiB, 2 * MiB, [2 * MiB])
