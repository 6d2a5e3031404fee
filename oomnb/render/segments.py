"""The allocator's segments, drawn: what fragmentation looks like.

``%gpumem segments`` shows every segment the caching allocator has reserved,
each a bar cut into its blocks: allocated (dark), cached but free (light) and,
in an expandable segment, pages given back (not drawn).  The figures come from
``torch.cuda.memory_snapshot()`` on CUDA and from the allocator model on the
simulated device, in the same shape, so one picture serves both.

The line under it says what decides a fragmentation OOM: the largest free
block, against the memory that is reserved but unallocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..model.units import format_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SegmentMap", "segment_map", "segments_figure", "segments_text"]

#: Segments drawn at most (the biggest); the text still counts all of them.
MAX_DRAWN = 48


@dataclass(frozen=True)
class SegmentMap:
    """Segments as ``torch.cuda.memory_snapshot()`` lists them, reduced to what is drawn.

    ``segments`` holds, per segment, its pool ("small" or "large") and its
    blocks in address order as (size, allocated).
    """

    segments: tuple[tuple[str, tuple[tuple[int, bool], ...]], ...]
    device: str
    #: Per segment, whether it is expandable (its free pages can be unmapped
    #: and mapped again elsewhere, so free blocks in it are not fragmentation).
    expandable: tuple[bool, ...] = ()

    @property
    def reserved(self) -> int:
        return sum(size for _pool, blocks in self.segments for size, _ in blocks)

    @property
    def allocated(self) -> int:
        return sum(size for _pool, blocks in self.segments for size, used in blocks if used)

    @property
    def free_blocks(self) -> list[int]:
        return [size for _pool, blocks in self.segments for size, used in blocks if not used]


def from_snapshot(snapshot: list[dict[str, Any]], device: str) -> SegmentMap:
    """A map from ``torch.cuda.memory_snapshot()``'s list (other devices' segments are the caller's to drop)."""
    segments = []
    expandable = []
    for segment in sorted(snapshot, key=lambda s: int(s.get("address", 0))):
        blocks = tuple(
            (int(block["size"]), block.get("state") == "active_allocated")
            for block in segment.get("blocks", ())
            if block.get("state") in ("active_allocated", "active_pending_free", "inactive")
        )
        if blocks:
            segments.append((str(segment.get("segment_type", "large")), blocks))
            expandable.append(bool(segment.get("is_expandable", False)))
    return SegmentMap(tuple(segments), device, tuple(expandable))


def segment_map(backend: Any) -> SegmentMap:
    """The segments of ``backend`` now (the simulated device or a CUDA device)."""
    if backend.kind == "cuda":
        import torch

        snapshot = [s for s in torch.cuda.memory_snapshot() if s.get("device", backend.index) == backend.index]
        return from_snapshot(snapshot, backend.name)
    from ..backends.simulated import device

    return from_snapshot(device.memory_snapshot(), backend.name)


def segments_text(seg: SegmentMap) -> str:
    """One line: segments, reserved, allocated, cached, and the largest free block."""
    count = len(seg.segments)
    if not count:
        return f"{seg.device}: no segments reserved."
    free = seg.free_blocks
    cached = seg.reserved - seg.allocated
    largest = max(free, default=0)
    blocks = "1 free block" if len(free) == 1 else f"{len(free)} free blocks"
    line = (
        f"{seg.device}: {count} segment{'s' if count != 1 else ''}, {format_bytes(seg.reserved)} reserved: "
        f"{format_bytes(seg.allocated)} allocated, {format_bytes(cached)} cached in {blocks}"
    )
    if free:
        line += f"; the largest free block is {format_bytes(largest)}"
        fixed = [
            size
            for index, (_pool, blocks) in enumerate(seg.segments)
            if not (index < len(seg.expandable) and seg.expandable[index])
            for size, used in blocks
            if not used
        ]
        if fixed and sum(fixed) >= 2 * max(fixed):
            line += f" ({100 * max(fixed) / sum(fixed):.0f}% of the cached memory: fragmented)"
        elif not fixed:
            line += " (in expandable segments, whose free pages are mapped again where a request needs them)"
    return line + "."


def segments_figure(seg: SegmentMap) -> Figure:
    """One bar per segment (the biggest :data:`MAX_DRAWN`), cut into its blocks."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    order = sorted(range(len(seg.segments)), key=lambda i: -sum(s for s, _ in seg.segments[i][1]))
    drawn = sorted(order[:MAX_DRAWN])
    figure = Figure(figsize=(7, 0.22 * max(len(drawn), 1) + 1.2))
    axes = figure.subplots()
    mib = 2**20
    for row, index in enumerate(drawn):
        start = 0
        for size, used in seg.segments[index][1]:
            axes.barh(
                row,
                size / mib,
                left=start / mib,
                height=0.7,
                color="#2563eb" if used else "#bfdbfe",
                edgecolor="white",
                linewidth=0.8,
            )
            start += size
    labels = [f"{seg.segments[i][0]} {format_bytes(sum(s for s, _ in seg.segments[i][1]))}" for i in drawn]
    axes.set_yticks(range(len(drawn)), labels=labels, parse_math=False, usetex=False, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("MiB from the segment's start", parse_math=False, usetex=False)
    more = len(seg.segments) - len(drawn)
    title = f"Segments of {seg.device}" + (f" (the {len(drawn)} biggest of {len(seg.segments)})" if more else "")
    axes.set_title(title, fontsize=10, loc="left", parse_math=False, usetex=False)
    axes.legend(
        handles=[
            Patch(facecolor="#2563eb", label="allocated"),
            Patch(facecolor="#bfdbfe", edgecolor="#93c5fd", label="cached, free"),
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    for spine in ("top", "right"):
        axes.spines[spine].set_visible(False)
    figure.tight_layout()
    return figure


def segments_bundle(backend: Any) -> dict[str, Any]:
    """A display bundle: the picture as PNG (when matplotlib can draw) and the line as text."""
    import base64
    import html
    import io

    seg = segment_map(backend)
    text = segments_text(seg)
    bundle: dict[str, Any] = {"text/plain": text}
    if not seg.segments:
        return bundle
    try:
        buffer = io.BytesIO()
        segments_figure(seg).savefig(buffer, format="png", dpi=90)
    except Exception:  # a broken matplotlib install must not take the line with it
        return bundle
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    bundle["image/png"] = png
    bundle["text/html"] = f"<div>{html.escape(text)}</div><img src='data:image/png;base64,{png}'/>"
    return bundle
