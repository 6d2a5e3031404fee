"""The first reading of an OOM, from the facts alone.

Pure functions over plain data.  The advisor (a later stage) adds suggestions
measured by dry runs; these rules say what the numbers already show.
"""

from __future__ import annotations

from ..model.report import OomInfo, Report, Suggestion
from ..model.units import MiB, format_bytes

__all__ = ["MARGIN", "diagnose", "failure_lower_bound", "set_lower_bound_story", "usable_capacity"]

EXPANDABLE_CODE = (
    "# Must be set before CUDA starts: first cell of the notebook, or restart the kernel.\n"
    "import os\n"
    'os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"'
)


#: The share of the device advice keeps free (the allocator's rounding and
#: cache need some): a change "fits" when the cell's need is within the rest.
MARGIN = 0.05


def failure_lower_bound(report: Report) -> int | None:
    """What a cell that failed needed at least: its peak, or what was allocated when
    the failing request came plus that request, whichever is more."""
    oom = report.oom
    if oom is None or oom.requested_bytes is None:
        return None
    at_failure = oom.allocated_bytes if oom.allocated_bytes is not None else report.peak_bytes
    return max(report.peak_bytes, at_failure + oom.requested_bytes)


def usable_capacity(report: Report) -> int | None:
    """What PyTorch can have of the report's device: its capacity less the memory held outside PyTorch."""
    oom = report.oom
    capacity = report.device.capacity_bytes or (oom.capacity_bytes if oom else None)
    if not capacity:
        return None
    return max(0, capacity - report.device.context_bytes)


def set_lower_bound_story(report: Report) -> None:
    """The story a failed cell tells before any dry run: it needs at least what the failure shows."""
    oom = report.oom
    capacity = usable_capacity(report)
    needs = failure_lower_bound(report)
    if oom is None or needs is None or not capacity:
        return
    oom.needs_bytes, oom.has_bytes, oom.needs_at_least = needs, int(capacity * (1 - MARGIN)), True


def expandable_already(kind: str) -> bool:
    """Whether the device's allocator already grows its segments (nothing to suggest then)."""
    if kind == "simulated":
        from ..backends.simulated import device

        return bool(device.alloc.conf.expandable_segments)
    import os

    from ..allocator.caching import parse_alloc_conf

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        try:
            if parse_alloc_conf(os.environ.get(name, "")).expandable_segments:
                return True
        except ValueError:
            continue
    return False


def diagnose(
    oom: OomInfo,
    *,
    baseline_bytes: int,
    allocated_at_failure: int,
    capacity_bytes: int | None,
    simulated: bool,
    batch_var: dict[str, object] | None = None,
    context_bytes: int = 0,
) -> tuple[str, list[Suggestion]]:
    """A one-paragraph diagnosis and the suggestions that follow from the figures.

    ``allocated_at_failure`` is what was allocated when the error was raised,
    before recovery (the cell's partial work included).
    """
    requested = oom.requested_bytes or 0
    capacity = capacity_bytes or oom.capacity_bytes
    unallocated = oom.reserved_unallocated_bytes or 0
    suggestions: list[Suggestion] = []
    reasons: list[str] = []
    cell_bytes = max(0, allocated_at_failure - baseline_bytes) + requested

    if capacity and requested > capacity:
        reasons.append(
            f"One tensor of {format_bytes(requested)} is larger than the whole device "
            f"({format_bytes(capacity)}): no amount of freeing helps; make that tensor smaller "
            "(batch, sequence length, resolution)."
        )
        suggestions.append(
            Suggestion(
                kind="input_size",
                title="Make the largest tensor smaller",
                detail=f"A single allocation of {format_bytes(requested)} cannot fit a "
                f"{format_bytes(capacity)} device.",
                saves_bytes=None,
                params={"requested_bytes": requested},
            )
        )
    elif (
        unallocated >= (1 if simulated else 64 * MiB)
        and oom.allocated_bytes is not None
        and capacity
        and oom.allocated_bytes + requested + context_bytes <= capacity
    ):
        # Had the cached-but-unallocated memory been usable, the request would have fit.
        reasons.append(
            f"{format_bytes(unallocated)} is reserved by PyTorch's cache but unallocated; without it the "
            f"{format_bytes(requested)} request would fit beside the {format_bytes(oom.allocated_bytes)} "
            "allocated: the cache is fragmented."
        )
        if expandable_already("simulated" if simulated else "cuda"):
            reasons[-1] += " Expandable segments are on already: the free ranges lie between live tensors."
        else:
            suggestions.append(
                Suggestion(
                    kind="expandable_segments",
                    title="Let the allocator grow segments instead of fragmenting",
                    detail=f"{format_bytes(unallocated)} sits reserved but unused; expandable segments let "
                    "PyTorch reuse it for large requests.",
                    saves_bytes=unallocated,
                    params={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                    code=EXPANDABLE_CODE,
                    apply="setup",
                )
            )
    others = oom.other_processes_bytes or 0
    if capacity and others > 0.05 * capacity:
        reasons.append(
            f"{format_bytes(others)} of the GPU is used by other processes (another notebook's kernel?): "
            "`nvidia-smi` lists them; shut down the kernels you do not need."
        )
    if capacity and baseline_bytes > 0.5 * capacity:
        reasons.append(
            f"Before this cell ran, {format_bytes(baseline_bytes)} ({100 * baseline_bytes / capacity:.0f}% of the "
            "device) was already allocated by earlier cells: what the notebook keeps alive is the first thing "
            "to free (`%gpumem panel`)."
        )
    if capacity and cell_bytes and not reasons:
        available = max(0, capacity - baseline_bytes)
        reasons.append(
            f"The cell's own tensors are the problem: earlier cells keep only {format_bytes(baseline_bytes)} "
            f"({100 * baseline_bytes / capacity:.0f}% of the device), so a smaller batch or input, lower "
            "precision or recomputed activations is what makes it fit."
        )
        value = batch_var.get("value") if batch_var else None
        if batch_var is not None and isinstance(value, int) and not isinstance(value, bool) and value > 1:
            # The cell did not finish, so it needed at least cell_bytes: scale
            # the batch down by at least that ratio (an upper bound).
            ceiling = max(1, int(value * available / cell_bytes))
            # The figure is an upper bound: take the power of two below it.
            guess = min(1 << (ceiling.bit_length() - 1), value - 1)
            name = str(batch_var["name"])
            suggestions.append(
                Suggestion(
                    kind="batch_size",
                    title=f"Lower {name} to at most {guess}",
                    detail="Scaled down from where the cell failed, if memory grows with the batch; "
                    "`%gpumem advise` measures the exact value by dry runs.",
                    saves_bytes=None,
                    params={"variable": name, "value": guess, "accumulation_steps": -(-value // guess)},
                    code=f"{name} = {guess}",
                )
            )
    if simulated and capacity:
        reasons.append("(Simulated device: no GPU memory was used.)")
    return " ".join(reasons), suggestions
