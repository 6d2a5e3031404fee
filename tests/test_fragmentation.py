"""A fragmentation OOM on the simulated device, its advice measured by replay, and the advice applied.

Ten [7][6][7] MiB triples fill ten 20 MiB segments of a 200 MiB card; with
the 7s freed, 60 MiB is allocated and 140 MiB reserved but unallocated, so a
10 MiB tensor fails (no free block is 10 MiB long).  Replayed with
``expandable_segments:True`` (the layout's history: triples made, 7s freed)
the freed 7s join into 14 MiB ranges and the 10 MiB tensor takes one: 200 MiB
reserved, which fits.  Sizes are as in ``tests/test_allocator.py``, worked
out from the rules.
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
        # As is: 200 MiB reserved and a 10 MiB segment more.  Replayed from the layout (the
        # triples made, the 7s freed) the segment maps 200 MiB and its freed 7s join into
        # 14 MiB ranges: the 10 MiB tensor takes one, and nothing more is reserved.
        assert fix["saves_bytes"] == 210 * MiB - 200 * MiB
        assert "reserve 200.00 MiB at the peak instead of 210.00 MiB" in fix["detail"]
        assert 'os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"' in fix["code"]
        # Nothing the user had was lost, and the kernel goes on.
        assert len(shell.ns["kept"]) == 10 and "big" not in shell.ns
    finally:
        shell.run("%gpumem alloc-conf default")
        shell.run("%gpumem allocator caching")
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
        shell.run("%gpumem allocator caching")
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
        shell.run("%gpumem allocator caching")
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
        shell.run("%gpumem allocator caching")
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


REUSED = """
MiB = 2**20
t = torch.empty(100 * MiB, dtype=torch.uint8)
del t
s = torch.empty(30 * MiB, dtype=torch.uint8)
"""
BIG = "%%gpumem\nx = torch.empty(150 * MiB, dtype=torch.uint8)\n"


def test_a_request_larger_than_any_free_block_is_fragmentation_too(shell: Any) -> None:
    """A 100 MiB segment, freed, then split by 30 MiB: its 70 MiB rest cannot go back; 150 MiB then fails
    on 200 MiB though 30 + 150 fit.  With expandable segments (history replayed from the layout) the
    150 MiB tensor maps the pages after the 30 MiB one: 180 MiB reserved."""
    try:
        assert shell.run("%gpumem limit 200MiB --context 0").success
        assert shell.run(REUSED).success
        report = _report(shell.run(BIG))
        oom = report["oom"]
        assert (oom["allocated_bytes"], oom["reserved_unallocated_bytes"]) == (30 * MiB, 70 * MiB)
        assert "without it the 150.00 MiB request would fit beside the 30.00 MiB allocated" in oom["diagnosis"]
        (fix,) = [s for s in report["suggestions"] if s["kind"] == "expandable_segments"]
        assert fix["source"] == "dry-run" and fix["fits"] is True, fix
        assert "reserve 180.00 MiB at the peak instead of 250.00 MiB" in fix["detail"]
        # Applied literally: the setting (a restart), then the same cells.
        shell.run("del s")
        assert shell.run("%gpumem alloc-conf expandable_segments:True").success
        assert shell.run(REUSED).success
        assert _report(shell.run(BIG))["oom"] is None
        # Already on: an OOM there is not told to turn it on.
        report = _report(shell.run("%%gpumem\ny = torch.empty(40 * MiB, dtype=torch.uint8)\n"))
        assert report["oom"] is not None
        assert all(s["kind"] != "expandable_segments" for s in report["suggestions"])
    finally:
        shell.run("%gpumem alloc-conf default")
        shell.run("%gpumem limit off")


def test_switching_models_allocates_the_live_tensors_again(shell: Any) -> None:
    from oomnb.backends.simulated import device

    try:
        assert shell.run("MiB = 2**20\na = torch.empty(3 * MiB // 4)\nc = torch.empty(5 * MiB // 4)\ndel a").success
        assert (device.allocated, device.reserved) == (5 * MiB, 20 * MiB)
        assert shell.run("%gpumem allocator exact").success
        assert (device.allocated, device.reserved) == (5 * MiB, 5 * MiB)
        assert shell.run("%gpumem allocator caching").success
        assert (device.allocated, device.reserved) == (5 * MiB, 20 * MiB)
        assert shell.ns["c"].numel() == 5 * MiB // 4
    finally:
        device.caching = True


def test_bad_settings_are_one_line_and_change_nothing(shell: Any) -> None:
    from oomnb.backends.simulated import device

    try:
        bad = shell.run("%gpumem alloc-conf foo:1")
        assert not bad.success and "unknown option 'foo'" in str(bad.error_in_exec)
        spaced = shell.run("%gpumem alloc-conf max_split_size_mb:100, expandable_segments:True")
        assert spaced.success
        assert device.alloc.conf.to_text() == "expandable_segments:True,max_split_size_mb:100"
        assert shell.run("%gpumem limit T4").success
        too_much = shell.run("%gpumem limit 1GiB --context 2GiB")
        assert not too_much.success and "is not less than the card's 1.00 GiB" in str(too_much.error_in_exec)
        assert device.card is not None and device.card.name == "T4"  # the old limit stands
        cell = shell.run("%%gpumem --limit T4 --context 20GiB\nx = 1")
        assert not cell.success and "nothing would be left for PyTorch" in str(cell.error_in_exec)
    finally:
        shell.run("%gpumem alloc-conf default")
        shell.run("%gpumem limit off")


def test_empty_cache_gives_back_whole_free_segments_only(shell: Any) -> None:
    from oomnb.backends.simulated import device

    try:
        _fragment(shell, "default")
        # Every segment holds a kept 6 MiB tensor: nothing is wholly free.
        out = shell.run("%gpumem empty-cache").captured.stdout
        assert "gave back 0 B; reserved now 200.00 MiB" in out
        shell.run("del kept[:4]")
        out = shell.run("%gpumem empty-cache").captured.stdout
        assert "gave back 80.00 MiB; reserved now 120.00 MiB" in out
        assert (device.allocated, device.reserved) == (36 * MiB, 120 * MiB)
    finally:
        shell.run("%gpumem limit off")
