"""Which change makes the cell fit, with the memory each saves.

Plain data in (a report, a census, a way to dry-run the cell), ranked
suggestions out.  Savings come from dry runs on fake tensors (``dry-run``),
from the census of live tensors (``measured``), or, where neither can say,
from the figures of the error itself (``rule``).  A suggestion whose saving
covers the cell's deficit ranks before those that do not; among those, the
least intrusive change comes first.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.report import Report, Suggestion
from ..model.units import format_bytes
from .cellsource import accumulation_cell, backward_per_micro_batch, loop_variables, method_callers
from .census import Census, TensorRecord
from .estimator import BatchFit, DryRun, DryRunError, search_batch
from .rules import EXPANDABLE_CODE, MARGIN, expandable_already, failure_lower_bound, usable_capacity
from .sizes import Knob, find_knobs
from .trainer import trainer_called, trainer_suggestions

__all__ = ["Advice", "advise"]

# What ranks a suggestion among those that fit: changes that keep the math
# identical first (free what leaks, clear caches, no_grad, backward per
# micro-batch, accumulation, checkpointing, a balanced device map), then those
# that change numerics slightly (autocast, an 8-bit optimizer), then those
# that change the experiment (a smaller batch or input, a quantized model,
# more GPUs).
_PREFERENCE = [
    "clear_output_cache",
    "clear_traceback",
    "free_references",
    "no_grad",
    "expandable_segments",
    "gradient_accumulation",
    "gradient_checkpointing",
    "device_map",
    "mixed_precision",
    "optimizer",
    "batch_size",
    "input_size",
    "combination",
    "quantization",
    "sharding",
]

#: ``run(overrides, autocast=..., no_grad=..., checkpoint=...) -> DryRun`` for the cell.
CellRunner = Callable[..., DryRun]
#: ``probe(overrides) -> bytes the cell grew by at its peak``, a real run on copies.
CellProbe = Callable[[dict[str, Any]], int]


@dataclass
class Advice:
    """The ranked suggestions and the figures they were ranked by."""

    suggestions: list[Suggestion]
    needed_bytes: int | None
    budget_bytes: int | None
    deficit_bytes: int | None
    batch_fit: BatchFit | None = None
    notes: list[str] = field(default_factory=list)
    #: ``needed_bytes`` comes from a dry run of the whole cell (else it is
    #: the lower bound the failure gives).
    needs_measured: bool = False


def _predicted(run: DryRun, baseline: int) -> int:
    """Device peak if the cell ran for real: what the device holds plus the cell's own growth.

    Reserved memory where the device runs out by it (the caching allocator's
    segments, fragmentation included), else allocated bytes.
    """
    return run.footprint(baseline)


@dataclass
class _Context:
    """What every source of suggestions reads, and what the earlier ones found."""

    report: Report
    census: Census | None
    run_cell: CellRunner | None
    cell_names: set[str]
    bf16: bool | None
    margin: float
    probe: CellProbe | None
    split_models: dict[str, Any]
    cell_source: str | None
    knobs: list[Knob]
    capacity: int | None
    baseline: int
    budget: int | None
    as_is: DryRun | None
    notes: list[str]
    found: list[Suggestion] = field(default_factory=list)
    fit: BatchFit | None = None
    #: The knobs a dry run showed the cell's memory grows with, with their search.
    sized: list[tuple[Knob, BatchFit]] = field(default_factory=list)
    #: Kinds of suggestion a measurement showed do not help (the first reading's are dropped).
    refuted: set[str] = field(default_factory=set)

    @property
    def device_type(self) -> str:
        return "cuda" if self.report.device.kind == "cuda" else "cpu"

    @property
    def autocast_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 is not False else torch.float16


def advise(
    report: Report,
    *,
    census: Census | None = None,
    run_cell: CellRunner | None = None,
    cell_names: set[str] | None = None,
    bf16: bool | None = None,
    margin: float = MARGIN,
    probe: CellProbe | None = None,
    split_models: dict[str, Any] | None = None,
    cell_source: str | None = None,
    namespace_values: dict[str, Any] | None = None,
    trainers: dict[str, Any] | None = None,
) -> Advice:
    """Rank the changes that would make ``report``'s cell fit its device.

    One pipeline: each source in ``_SOURCES`` adds suggestions (it sees what
    the earlier ones found); one ranking orders them; where none fits alone,
    the smallest combination that does is searched.  ``cell_source`` (the
    cell as the user wrote it) lets snippets be the cell itself, changed:
    what the dry run measured is what gets pasted.  ``namespace_values``
    holds the ints and tensors the cell reads from the notebook, where sizes
    it grows with are looked for; ``trainers`` maps the names of Hugging Face
    Trainers the cell reads to their ``args``.  The suggestions already in ``report``
    (the first reading of the error's figures) are one of the sources.
    """
    # What the allocator can have: the card less the CUDA context.
    capacity = usable_capacity(report)
    # The cell will be rerun from what is allocated now.
    # That is what recovery left allocated: less than the baseline where it
    # freed the last traceback, more where the failed cell grew something the
    # user keeps (a list of losses), which the rerun starts from too.
    baseline = report.end_bytes if report.oom is not None else report.baseline_bytes
    budget = int(capacity * (1 - margin)) if capacity else None
    batch_var = str(report.batch_var["name"]) if report.batch_var else None
    context = _Context(
        report=report,
        census=census,
        run_cell=run_cell,
        cell_names=cell_names or set(),
        bf16=bf16,
        margin=margin,
        probe=probe,
        split_models=split_models or {},
        cell_source=cell_source,
        knobs=find_knobs(cell_source, namespace_values or {}, batch_var),
        capacity=capacity,
        baseline=baseline,
        budget=budget,
        as_is=None,
        notes=[],
    )
    needed: int | None = None
    sources = _SOURCES
    trainer = trainer_called(cell_source, list(trainers or {}))
    if trainer is not None and run_cell is not None and capacity:
        # trainer.train(): one training step says what the loop needs, and the
        # advice is TrainingArguments changes (dry-running the whole loop would not end).
        context.as_is, context.found = trainer_suggestions(
            trainer,
            run_cell,
            baseline,
            capacity,
            margin,
            (trainers or {})[trainer],
            context.notes,
            context.device_type,
        )
        sources = [(name, source) for name, source in _SOURCES if source in (_leaks, _weights)]
        if context.as_is is not None:
            needed = _predicted(context.as_is, baseline)
    elif run_cell is not None:
        try:
            context.as_is = run_cell({})
            needed = _predicted(context.as_is, baseline)
        except DryRunError as exc:
            context.notes.append(f"dry run not possible: {exc}")
    if context.as_is is not None and _short_of_the_failure(context.as_is, report, context.notes):
        # Its what-ifs would be measured the same wrong way: no dry-run advice.
        context.as_is, context.found, needed = None, [], None
    measured = needed is not None
    if needed is None and report.oom is not None:
        # The cell did not finish: it needed at least this much.
        needed = failure_lower_bound(report)
    deficit = (needed - budget) if needed is not None and budget is not None else None
    first_reading = list(report.suggestions)
    for name, source in sources:
        try:
            context.found += source(context)
        except DryRunError as exc:
            context.notes.append(f"{name}: {exc}")
    context.found += _error_facts(context, first_reading)
    ranked = _rank(context.found, deficit)
    if deficit is not None and deficit > 0 and not any(s.fits for s in ranked):
        combined = _combination(context, ranked)
        if combined is not None:
            ranked.insert(0, combined)
    for suggestion in ranked:
        _no_line_for_a_loop(suggestion, cell_source, context.notes)
    ranked = [s for s in ranked if not s.params.get("looped")]
    return Advice(ranked, needed, budget, deficit, context.fit, context.notes, measured)


def _short_of_the_failure(run: DryRun, report: Report, notes: list[str]) -> bool:
    """Whether the dry run of the whole cell grew by less than the real cell did before it failed.

    Then the dry run did not do what the cell does (typically a size read from
    data with ``.item()``, which fake tensors answer with 1), and its figures
    are not to be trusted.
    """
    lower = failure_lower_bound(report)
    if lower is None:
        return False
    real_growth = lower - report.baseline_bytes
    dry_growth = max(0, run.peak_bytes - run.start_bytes)
    if dry_growth >= real_growth:
        return False
    notes.append(
        f"the dry run grew by {format_bytes(dry_growth)}, less than the {format_bytes(real_growth)} the cell "
        "reached before it failed (a size read from data?): its figures were not used"
    )
    return True


def _rank(suggestions: list[Suggestion], deficit: int | None) -> list[Suggestion]:
    """Those that make the cell fit alone first, then those whose effect is unknown, then the rest;
    within each, the order of ``_PREFERENCE`` (same math, then numerics, then the experiment)."""
    for s in suggestions:
        if s.fits is not None or s.params.pop("fit_unknown", False):
            continue
        if deficit is not None and deficit <= 0:
            s.fits = True
        elif deficit is not None and s.saves_bytes is not None:
            s.fits = s.saves_bytes >= deficit

    def key(s: Suggestion) -> tuple[int, int, int]:
        order = 0 if s.fits else (1 if s.fits is None else 2)
        preference = _PREFERENCE.index(s.kind) if s.kind in _PREFERENCE else len(_PREFERENCE)
        return (order, preference, -(s.saves_bytes or 0))

    # The same kind twice (two leaks): keep both, best first.
    return sorted(suggestions, key=key)


def _no_line_for_a_loop(suggestion: Suggestion, cell_source: str | None, notes: list[str]) -> None:
    """``bs = 2048`` pasted above a cell that loops ``for bs in [...]`` changes nothing: a note instead."""
    variable = suggestion.params.get("variable")
    if suggestion.kind in ("batch_size", "input_size") and variable in loop_variables(cell_source):
        suggestion.params["looped"] = True
        notes.append(
            f"the cell sets `{variable}` in its own loop: change the loop's values to "
            f"{suggestion.params.get('value')} or less"
        )


def _error_facts(context: _Context, first_reading: list[Suggestion]) -> list[Suggestion]:
    """The first reading of the error's figures: kept only where nothing measured says the same."""
    measured = {s.kind for s in context.found} | context.refuted
    return [s for s in first_reading if s.kind not in measured]


def _python_path(path: str) -> str:
    """A census path as an expression that assigns: ``model.blocks.3.last`` is
    ``model.get_submodule("blocks.3").last`` (a ModuleList's index is no attribute)."""
    head, _, tail = path.partition("[")
    segments = head.split(".")
    if len(segments) <= 2 or all(s.isidentifier() and not keyword.iskeyword(s) for s in segments):
        return path
    root, middle, attr = segments[0], segments[1:-1], segments[-1]
    expression = f'{root}.get_submodule("{".".join(middle)}").{attr}'
    return expression + ("[" + tail if tail else "")


def _leak_suggestions(census: Census, cell_names: set[str]) -> list[Suggestion]:
    found: list[Suggestion] = []
    # A variable or container is detached as a whole, a tensor kept on an
    # object's attribute on its own path.  Tensors a module keeps on
    # attributes in forward are replaced by the next forward: what clearing
    # them saves at the peak needs a dry run, not the census (left out).
    graphs: dict[str, list[TensorRecord]] = {}
    module_roots = {r.root for r in census.records if r.holder == "parameter"}
    held = [r for r in census.records if r.graph_bytes]
    # A variable or container is one holder, whatever inside it keeps graphs
    # (a Hugging Face output's loss and its key/value cache).
    whole = {r.root for r in held if r.holder in ("variable", "container")}
    for record in held:
        if record.holder in ("variable", "container") or (record.holder == "attribute" and record.root in whole):
            graphs.setdefault(record.root, []).append(record)
        elif record.holder == "attribute" and record.root not in module_roots:
            graphs.setdefault(record.path, []).append(record)

    def union(records: list[TensorRecord]) -> int:
        """The graphs' bytes, each storage once (graphs overlap: a loss reaches every activation)."""
        prefixes = tuple(f"{r.path}.grad_fn" for r in records)
        return sum(r.nbytes for r in census.records if r.holder == "autograd_graph" and r.path.startswith(prefixes))

    totals = {holder: union(records) for holder, records in graphs.items()}
    for holder, records in sorted(graphs.items(), key=lambda item: -totals[item[0]]):
        total = totals[holder]
        if not total:
            continue  # every storage of these graphs is held by something else too
        many = f"{len(records)} autograd graphs" if len(records) > 1 else "its autograd graph"
        keys = (f"{holder}['", f'{holder}["')
        if holder != records[0].root:  # an attribute
            target = _python_path(holder)
            code = f"{target} = {target}.detach()\n# and where it is set (in forward): store h.detach(), not h"
            detail = (
                f"An attribute of `{records[0].root}` keeps a tensor with its grad_fn, and with it every "
                "activation its backward would need, after backward has run."
            )
        elif all(r.path == holder for r in records):  # the variable itself
            code = f"{holder} = {holder}.detach()  # or keep {holder}.item()"
            detail = "A tensor that still has its grad_fn keeps every activation its backward would need."
        elif all(r.path.startswith(keys) and r.path.endswith(("']", '"]')) for r in records):  # a mapping
            # In place: a dict stays a dict, a Hugging Face output keeps its attributes.
            code = (
                f"for key, value in {holder}.items():\n"
                f"    if torch.is_tensor(value):\n"
                f"        {holder}[key] = value.detach()"
            )
            detail = "Tensors that still have their grad_fn keep every activation their backward would need."
        elif all(r.path.startswith(f"{holder}[") and r.path.endswith("]") and "." not in r.path for r in records):
            code = f"{holder} = [t.detach() if torch.is_tensor(t) else t for t in {holder}]  # or keep loss.item()"
            detail = "Tensors that still have their grad_fn keep every activation their backward would need."
        else:  # graphs deep inside objects (a key/value cache): detaching each is no snippet
            inside = ", ".join(f"`{r.path}`" for r in records[:3]) + (" ..." if len(records) > 3 else "")
            code = f"del {holder}  # keep only what you need from it, detached (loss.item())"
            detail = f"Tensors inside it still have their grad_fn ({inside}): every activation their backward needs."
        found.append(
            Suggestion(
                kind="free_references",
                title=f"`{holder}` keeps {many} alive ({format_bytes(total)})",
                detail=detail,
                saves_bytes=total,
                params={"names": [records[0].root], "path": holder, "action": "detach"},
                code=code,
                source="measured",
            )
        )
    found += _module_attribute_graphs(census, module_roots)
    out_bytes = sum(r.nbytes for r in census.records if r.holder == "output_cache")
    if out_bytes:
        names = [r.path for r in census.records if r.holder == "output_cache"][:3]
        found.append(
            Suggestion(
                kind="clear_output_cache",
                title=f"{', '.join(names)} hold{'s' if len(names) == 1 else ''} {format_bytes(out_bytes)}",
                detail="IPython keeps every displayed result in Out[n], _, __ and ___.",
                saves_bytes=out_bytes,
                params={"names": names},
                # %reset out leaves _, __ and ___ in IPython's hidden namespace.
                code="%reset -f out\nget_ipython().user_ns_hidden.update(_='', __='', ___='')",
                source="measured",
            )
        )
    tb_bytes = sum(r.nbytes for r in census.records if r.holder == "traceback")
    if tb_bytes:
        found.append(
            Suggestion(
                kind="clear_traceback",
                title=f"The last traceback holds {format_bytes(tb_bytes)}",
                detail="The frames of the last error keep their local tensors alive.",
                saves_bytes=tb_bytes,
                params={},
                code="import sys\nsys.last_traceback = sys.last_value = sys.last_type = sys.last_exc = None",
                source="measured",
            )
        )
    # The three biggest variables the cell does not use. Group once: a
    # namespace can have thousands of names.
    candidates = 0
    for root, records in census.by_root().items():
        if candidates == 3:
            break
        if root in cell_names or root in graphs or root.startswith(("Out[", "_", "<")):
            continue
        if not any(r.holder in ("variable", "container", "attribute") for r in records):
            continue
        candidates += 1
        nbytes = sum(r.nbytes for r in records)
        if nbytes and not all(r.also_held_by for r in records):
            found.append(
                Suggestion(
                    kind="free_references",
                    title=f"`{root}` holds {format_bytes(nbytes)} and this cell does not use it",
                    detail="Delete it (or move it to the CPU) before running the cell.",
                    saves_bytes=nbytes,
                    params={"names": [root], "action": "del"},
                    code=f"del {root}",
                    source="measured",
                )
            )
    return found


def _module_attribute_graphs(census: Census, module_roots: set[str]) -> list[Suggestion]:
    """Modules that keep activations on an attribute in forward (``self.last = h``).

    Each keeps the last forward's tensor, and with its grad_fn every activation
    its backward would need, until the next forward replaces it: one step's
    activations are alive during the next.  Clearing them frees both now.
    """
    groups: dict[tuple[str, str], list[TensorRecord]] = {}
    for record in census.records:
        if record.holder == "attribute" and record.root in module_roots and record.requires_grad:
            attribute = record.path.rsplit(".", 1)[-1]
            if attribute.isidentifier():
                groups.setdefault((record.root, attribute), []).append(record)
    found = []
    for (root, attribute), records in groups.items():
        paths = tuple(r.path for r in records)
        # Graphs overlap (block 3's reaches block 0's): count each storage once,
        # and none that something outside these attributes and graphs holds too.
        graphs = sum(
            r.nbytes
            for r in census.records
            if r.holder == "autograd_graph"
            and r.path.startswith(paths)
            and all(p.startswith(paths) for p in r.also_held_by)
        )
        total = graphs + sum(r.nbytes for r in records if all(p.startswith(paths) for p in r.also_held_by))
        if not total:
            continue
        many = len(records) > 1
        where = f"{records[0].path} and {len(records) - 1} more" if many else records[0].path
        found.append(
            Suggestion(
                kind="free_references",
                title=f"`{where}` keep{'' if many else 's'} the last forward's activations ({format_bytes(total)})",
                detail=f"A module stores a tensor on `self.{attribute}` in forward, with its grad_fn: it and "
                f"its graph ({format_bytes(graphs)}) stay alive until the next forward replaces it, so one "
                "step's activations are alive during the next. Clear them before the cell; the cell's own "
                "forward stores them again, so in forward store `h.detach()` (or nothing) instead.",
                saves_bytes=total,
                code=f"for module in {root}.modules():  # forward sets `{attribute}` again, detach it there\n"
                f'    if torch.is_tensor(module.__dict__.get("{attribute}")):\n'
                f"        module.{attribute} = None",
                source="measured",
                # Freed now, but the cell's own forward stores them again: whether the cell then
                # fits is not known from the census.
                params={"names": [root], "paths": [r.path for r in records], "action": "clear", "fit_unknown": True},
            )
        )
    return found


def _summed_loss_suggestion(
    run_cell: CellRunner, as_is: DryRun, cell_source: str | None, notes: list[str]
) -> list[Suggestion]:
    found = backward_per_micro_batch(cell_source or "")
    if found is None:
        return []
    total, changed = found
    try:
        run = run_cell({}, source=changed)
    except DryRunError as exc:
        notes.append(f"backward per micro-batch dry run: {exc}")
        return []
    saves = _predicted(as_is, 0) - _predicted(run, 0)
    if saves <= 0:
        return []
    return [
        Suggestion(
            kind="gradient_accumulation",
            title=f"`{total}` keeps every micro-batch's graph until backward(): call backward() in the loop",
            detail=f"Summing the losses first keeps each term's activations alive until `{total}.backward()`. "
            "Calling backward on each term gives the same gradients and frees each graph at once "
            f"(dry run of the cell changed so: {format_bytes(run.peak_bytes - run.start_bytes)} at the peak "
            f"instead of {format_bytes(as_is.peak_bytes - as_is.start_bytes)}).",
            saves_bytes=saves,
            params={"variable": total, "action": "backward_per_micro_batch"},
            code=changed,
            source="dry-run",
            apply="replace_cell",
        )
    ]


def _sizes(context: _Context) -> list[Suggestion]:
    """The sizes the cell grows with (a batch, an image, a sequence), each searched by dry runs."""
    run_cell, as_is, capacity = context.run_cell, context.as_is, context.capacity
    if run_cell is None or as_is is None or not capacity:
        if as_is is None and context.probe is not None and capacity:
            return _probe_batch(
                context.report, context.probe, context.baseline, capacity, context.margin, context.notes
            )
        return []
    found: list[Suggestion] = []
    growth = max(1, as_is.peak_bytes - as_is.start_bytes)
    told = str(context.report.batch_var["name"]) if context.report.batch_var else None
    searched: set[str] = set()
    for knob in context.knobs:
        if knob.role in searched:
            continue
        if knob.name != told:
            # Does the cell's memory grow with it at all?  One dry run at half says.
            try:
                half = knob.measure(run_cell, context.cell_source, max(1, knob.value // 2))
            except DryRunError:
                continue
            if as_is.peak_bytes - half.peak_bytes < 0.05 * growth:
                continue
        fit = _search(context, knob)
        if fit is None:
            continue
        searched.add(knob.role)
        context.sized.append((knob, fit))
        if context.fit is None:
            context.fit = fit
        found += _size_suggestions(context, knob, fit)
    return found


def _search(context: _Context, knob: Knob, **options: Any) -> BatchFit | None:
    """The largest value of ``knob`` whose dry run fits the budget (with ``options``: autocast...)."""
    run_cell, baseline, capacity = context.run_cell, context.baseline, context.capacity
    if run_cell is None or not capacity:
        return None

    def run_at(b: int) -> DryRun:
        run = knob.measure(run_cell, context.cell_source, b, **options)
        run.batch_size = b
        run.peak_bytes = _predicted(run, baseline)
        return run

    try:
        return search_batch(run_at, knob.value, int(capacity * (1 - context.margin)), capacity, context.margin)
    except DryRunError as exc:
        context.notes.append(f"search of {knob.label} not possible: {exc}")
        return None


def _size_suggestions(context: _Context, knob: Knob, fit: BatchFit) -> list[Suggestion]:
    as_is, capacity, margin, cell_source = context.as_is, context.capacity, context.margin, context.cell_source
    if as_is is None or not capacity:
        return []
    value = knob.value
    current = _predicted(as_is, context.baseline)
    if fit.max_batch >= value or fit.max_batch < 1:
        return []
    saves = current - fit.verified_peak_bytes
    steps = math.ceil(value / fit.max_batch)
    kind = "batch_size" if knob.role == "batch" else "input_size"
    code, apply = knob.snippet(cell_source, fit.max_batch)
    what = knob.label
    found = [
        Suggestion(
            kind=kind,
            title=f"Lower {what} from {value} to {fit.max_batch}",
            detail=f"Dry runs: {fit.max_batch} peaks at {format_bytes(fit.verified_peak_bytes)} of "
            f"{format_bytes(capacity)} ({int(margin * 100)}% kept free); {value} needs {format_bytes(current)}."
            + (f" The cell sets `{knob.name}` itself: its line is edited." if knob.set_in_cell else ""),
            saves_bytes=saves,
            params={"variable": knob.name, "value": fit.max_batch}
            | ({"accumulation_steps": steps} if kind == "batch_size" else {})
            | ({"literal": True} if knob.how == "literal" else {})
            | ({"cell_line": knob.line} if knob.line else {})
            | ({"shape": list(knob.new_shape(fit.max_batch))} if knob.how == "tensor" else {}),
            code=code,
            source="dry-run",
            fits=True,
            apply=apply,
        )
    ]
    if kind != "batch_size" or knob.how != "variable" or not _gradient_bytes(as_is, cell_source) or not cell_source:
        return found  # accumulation is for training: a cell without backward has no gradients to keep
    # The cell rewritten as micro-batches with one optimizer step, dry-run as
    # such: the gradients stay allocated between micro-batches, which a plain
    # smaller batch does not pay for.
    run_cell = context.run_cell
    if run_cell is None:
        return found
    name = knob.name
    micro = fit.max_batch
    for _ in range(6):
        steps = math.ceil(value / micro)
        micro = math.ceil(value / steps)
        changed = accumulation_cell(cell_source, name, micro, steps, knob.set_in_cell)
        if changed is None:
            return found
        try:
            run = run_cell({name: micro}, source=changed)
        except DryRunError as exc:
            context.notes.append(f"gradient accumulation dry run: {exc}")
            return found
        peak = _predicted(run, context.baseline)
        if peak <= fit.budget_bytes:
            break
        micro = max(1, micro * 3 // 4)
    else:
        return found
    found.append(
        Suggestion(
            kind="gradient_accumulation",
            title=f"Keep the effective batch of {value}: {steps} micro-batches of {micro}",
            detail=f"Backward on each micro-batch (the loss divided by {steps}), one optimizer step after them. "
            f"Dry run of the cell rewritten so: peak {format_bytes(peak)}, gradients kept between "
            "micro-batches included.",
            saves_bytes=current - peak,
            params={"variable": name, "value": micro, "accumulation_steps": steps},
            code=changed,
            source="dry-run",
            fits=True,
            apply="replace_cell",
        )
    )
    return found


def _combination(context: _Context, ranked: list[Suggestion]) -> Suggestion | None:
    """No change fits alone: autocast with the largest size that then fits, verified by dry runs."""
    precision = next((s for s in ranked if s.kind == "mixed_precision" and (s.saves_bytes or 0) > 0), None)
    as_is = context.as_is
    if precision is None or as_is is None or context.run_cell is None or not context.capacity or not context.knobs:
        return None
    dtype = context.autocast_dtype
    for knob in [k for k, _ in context.sized] or context.knobs[:1]:
        fit = _search(context, knob, autocast=dtype)
        if fit is None or fit.max_batch < 1 or fit.max_batch >= knob.value:
            continue
        first, changed = knob.change(context.cell_source, fit.max_batch)
        body = changed if changed is not None else (context.cell_source or "")
        header = f'with torch.autocast("{context.device_type}", dtype={dtype}):'
        code = "\n".join([*first, _wrapped(body, header, "...  # the cell")])
        current = _predicted(as_is, context.baseline)
        label = "bf16" if dtype is torch.bfloat16 else "fp16"
        return Suggestion(
            kind="combination",
            title=f"{label} autocast and {knob.label} {fit.max_batch} (from {knob.value})",
            detail=f"No single change fits. Together, dry run: peak {format_bytes(fit.verified_peak_bytes)} "
            f"of {format_bytes(context.capacity)} ({int(context.margin * 100)}% kept free).",
            saves_bytes=current - fit.verified_peak_bytes,
            params={
                "kinds": ["mixed_precision", "batch_size" if knob.role == "batch" else "input_size"],
                "dtype": label,
                "variable": knob.name,
                "value": fit.max_batch,
            },
            code=code,
            source="dry-run",
            fits=True,
            apply="replace_cell",
        )
    return None


def _probe_batch(
    report: Report, probe: CellProbe, baseline: int, capacity: int, margin: float, notes: list[str]
) -> list[Suggestion]:
    """The batch size from two small real probes, for a cell a dry run cannot take."""
    var = report.batch_var
    value = var.get("value") if var else None
    if var is None or not isinstance(value, int) or isinstance(value, bool) or value < 4:
        return []
    name = str(var["name"])
    small, large = max(1, value // 8), max(2, value // 4)
    try:
        growth = {b: probe({name: b}) for b in (small, large)}
    except Exception as exc:  # the probe itself ran out, or the cell failed on copies
        notes.append(f"real probes failed: {type(exc).__name__}")
        return []
    per_sample = (growth[large] - growth[small]) / (large - small)
    if per_sample <= 0:
        return []
    fixed = growth[small] - per_sample * small
    budget = int(capacity * (1 - margin)) - baseline
    best = int((budget - fixed) // per_sample)
    if best < 1 or best >= value:
        return []
    predicted = baseline + int(fixed + per_sample * best)
    return [
        Suggestion(
            kind="batch_size",
            title=f"Lower {name} from {value} to {best}",
            detail=f"Two real probes ({name}={small} and {large}, on copies) grew by "
            f"{format_bytes(growth[small])} and {format_bytes(growth[large])}: {format_bytes(per_sample)} per "
            f"sample, so {name}={best} should peak near {format_bytes(predicted)}.",
            saves_bytes=max(0, baseline + int(fixed + per_sample * value) - predicted),
            params={"variable": name, "value": best, "accumulation_steps": math.ceil(value / best)},
            code=f"{name} = {best}",
            source="measured",
        )
    ]


def _device_map_suggestions(name: str, model: Any, capacity: int | None) -> list[Suggestion]:
    """A model split with ``hf_device_map`` that overloads one device: a balanced map."""
    from .devicemap import balance, bytes_per_device

    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict) or len(set(map(str, device_map.values()))) < 2 or not capacity:
        return []
    per_device = bytes_per_device(model, device_map)
    devices = sorted(per_device)
    balanced = balance(model, device_map, dict.fromkeys(devices, capacity))
    after = bytes_per_device(model, balanced)
    heaviest, lightest = max(per_device.values()), min(per_device.values())
    if heaviest <= 1.25 * max(lightest, 1) or max(after.values()) >= heaviest:
        return []
    figures = ", ".join(f"{d} {format_bytes(per_device[d])}" for d in devices)
    return [
        Suggestion(
            kind="device_map",
            title=f"Balance `{name}` over its {len(devices)} GPUs",
            detail=f"Its device_map puts {figures}; balanced: "
            + ", ".join(f"{d} {format_bytes(after.get(d, 0))}" for d in devices)
            + ".",
            saves_bytes=heaviest - max(after.values()),
            params={"device_map": balanced, "bytes_per_device": per_device},
            code=f"device_map = {balanced!r}\n# from_pretrained(..., device_map=device_map)",
            source="measured",
            apply="setup",
        )
    ]


def _wrapped(cell_source: str | None, header: str, placeholder: str) -> str:
    """The cell under ``header`` (a ``with`` line), or a placeholder body when the cell is unknown."""
    if not cell_source:
        return f"{header}\n    {placeholder}"
    body = "\n".join(("    " + line) if line.strip() else line for line in cell_source.splitlines())
    return f"{header}\n{body}"


def _what_if_suggestions(
    run_cell: CellRunner,
    as_is: DryRun,
    bf16: bool | None,
    notes: list[str],
    cell_source: str | None = None,
    device_type: str = "cuda",
) -> list[Suggestion]:
    """Dry runs of the cell with one change each; a change that saves memory becomes a suggestion.

    Each snippet is the whole cell under the change, as the dry run measured
    it, with the autocast device of the cell's own tensors ("cpu" on the
    simulated device, where CUDA autocast would do nothing).
    """
    dtype = torch.bfloat16 if bf16 is not False else torch.float16
    label = "bf16" if dtype is torch.bfloat16 else "fp16"
    if bf16:
        support = "This device supports bf16."
    elif bf16 is False:
        support = "This device has no bf16: fp16 with a GradScaler."
    else:
        support = "bf16 needs an Ampere or newer GPU; use fp16 with a GradScaler otherwise."
    # (options of the dry run, suggestion fields, whether a failure is worth a note)
    variants: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
        (
            {"autocast": dtype},
            {
                "kind": "mixed_precision",
                "title": f"Run the forward pass in {label} autocast",
                "detail": support,
                "params": {"dtype": label},
                "code": _wrapped(
                    cell_source,
                    f'with torch.autocast("{device_type}", dtype={dtype}):',
                    "loss = ...  # the forward pass",
                ),
            },
            True,
        ),
        (
            {"checkpoint": True},
            {
                "kind": "gradient_checkpointing",
                "title": "Checkpoint the model's repeated blocks",
                "detail": "Recompute each block's activations in backward instead of keeping them.",
                "params": {},
                "code": "from torch.utils.checkpoint import checkpoint\n"
                "# in forward: x = checkpoint(block, x, use_reentrant=False)\n"
                "# Hugging Face models: model.gradient_checkpointing_enable()",
            },
            False,  # most models have no run of like blocks: nothing to say
        ),
    ]
    training = bool(_gradient_bytes(as_is, cell_source))
    if not training:
        # Checkpointing trades recomputation in backward for memory: a cell
        # without backward wants no_grad instead.
        variants = [v for v in variants if not v[0].get("checkpoint")]
        variants.append(
            (
                {"no_grad": True},
                {
                    "kind": "no_grad",
                    "title": "This cell never calls backward: run it under torch.no_grad()",
                    "detail": "Without no_grad every output keeps the activations its backward would need.",
                    "params": {},
                    "code": _wrapped(cell_source, "with torch.no_grad():", "...  # the cell"),
                },
                False,
            )
        )
    found = []
    for options, fields, noted in variants:
        try:
            changed = run_cell({}, **options)
        except DryRunError as exc:
            if noted:
                notes.append(f"{fields['kind']} dry run: {exc}")
            continue
        saves = _predicted(as_is, 0) - _predicted(changed, 0)
        if saves <= 0:
            continue
        if options.get("checkpoint") and changed.checkpoint_code:
            # What the dry run did to the model's copy, to run once on the model.
            fields = dict(fields, code=changed.checkpoint_code + "\n# then run the cell again")
        apply = "replace_cell" if cell_source and not options.get("checkpoint") else "run_first"
        found.append(Suggestion(saves_bytes=saves, source="dry-run", apply=apply, **fields))
    return found


def _gradient_bytes(as_is: DryRun, cell_source: str | None) -> int:
    """The gradients a training cell holds at its peak: a cell ending with
    ``zero_grad(set_to_none=True)`` has none left when the dry run ends."""
    if as_is.gradients_bytes:
        return as_is.gradients_bytes
    return as_is.parameters_bytes if ".backward(" in (cell_source or "") else 0


def _weights_suggestions(
    as_is: DryRun,
    capacity: int | None,
    margin: float,
    cell_source: str | None = None,
    *,
    model: str = "model",
    optimizer: str = "opt",
) -> list[Suggestion]:
    grads = _gradient_bytes(as_is, cell_source)
    fixed = as_is.parameters_bytes + grads + as_is.optimizer_bytes
    if not capacity or fixed <= capacity * (1 - margin) * 0.8:
        return []
    found = []
    if as_is.optimizer_bytes:
        saves = int(as_is.optimizer_bytes * 0.75)
        found.append(
            Suggestion(
                kind="optimizer",
                title="Use an 8-bit optimizer",
                detail="8-bit Adam keeps its two moments in one byte each instead of four.",
                saves_bytes=saves,
                params={"optimizer": "bitsandbytes.optim.AdamW8bit"},
                code="import bitsandbytes as bnb  # pip install bitsandbytes\n"
                f"{optimizer} = bnb.optim.AdamW8bit({model}.parameters(), "
                f'lr={optimizer}.param_groups[0]["lr"])',
                source="rule",
                apply="setup",
            )
        )
    found.append(
        Suggestion(
            kind="quantization",
            title="Fine-tune a quantized model with adapters (QLoRA)",
            detail="4-bit weights take an eighth of fp32; only small adapters get gradients and state.",
            saves_bytes=int(as_is.parameters_bytes * 0.875 + grads + as_is.optimizer_bytes),
            params={"bits": 4, "fit_unknown": True},  # a different model to load: nothing here measures it
            code="# transformers + peft: BitsAndBytesConfig(load_in_4bit=True), then get_peft_model(...)",
            source="rule",
            apply="setup",
        )
    )
    gpus = max(2, math.ceil(fixed / (capacity * (1 - margin) * 0.8)))
    per_gpu = math.ceil(fixed / gpus)
    found.append(
        Suggestion(
            kind="sharding",
            title=f"Shard parameters, gradients and optimizer state over {gpus} GPUs (FSDP / ZeRO-3)",
            detail=f"{format_bytes(fixed)} of weights, gradients and state alone; {format_bytes(per_gpu)} per GPU "
            f"over {gpus} GPUs.",
            saves_bytes=fixed - per_gpu,
            params={"gpus": gpus, "per_gpu_bytes": per_gpu},
            code=f"from torch.distributed.fsdp import fully_shard\nfully_shard({model})  # under torchrun",
            source="dry-run",
            apply="setup",
        )
    )
    return found


# -- the sources, in order --------------------------------------------------------------
def _leaks(context: _Context) -> list[Suggestion]:
    return _leak_suggestions(context.census, context.cell_names) if context.census is not None else []


def _what_ifs(context: _Context) -> list[Suggestion]:
    if context.run_cell is None or context.as_is is None:
        return []
    return _what_if_suggestions(
        context.run_cell, context.as_is, context.bf16, context.notes, context.cell_source, context.device_type
    )


def _summed_loss(context: _Context) -> list[Suggestion]:
    if context.run_cell is None or context.as_is is None:
        return []
    return _summed_loss_suggestion(context.run_cell, context.as_is, context.cell_source, context.notes)


def _weights(context: _Context) -> list[Suggestion]:
    if context.as_is is None:
        return []
    model, optimizer = _model_and_optimizer(context)
    return _weights_suggestions(
        context.as_is, context.capacity, context.margin, context.cell_source, model=model, optimizer=optimizer
    )


def _model_and_optimizer(context: _Context) -> tuple[str, str]:
    """The names the notebook uses: the biggest module the cell reaches, and what it calls ``step()`` on."""
    model = "model"
    if context.census is not None:
        sizes: dict[str, int] = {}
        for record in context.census.records:
            if record.holder == "parameter" and (not context.cell_names or record.root in context.cell_names):
                sizes[record.root] = sizes.get(record.root, 0) + record.nbytes
        if sizes:
            model = max(sizes, key=lambda name: sizes[name])
    callers = method_callers(context.cell_source, "step")
    optimizer = callers[0] if callers else "opt"
    return model, optimizer


#: The allocator settings a fragmented cache is measured under, in the order they are tried.
_FRAGMENTATION_FIXES = (
    (
        "expandable_segments:True",
        "Let the allocator grow segments instead of fragmenting",
        "one expandable segment per pool, mapped in pages of 2 MiB for small tensors and 20 MiB for large "
        "ones, so freed ranges join",
    ),
)


def _allocator(context: _Context) -> list[Suggestion]:
    """Memory PyTorch reserved but could not use for the request: a fragmented cache.

    Only where that is what made the cell fail: the request would have fit
    beside what was allocated had the reserved-but-unallocated memory been
    usable.  On the simulated device the fix is measured: the notebook's
    tensors and the cell are replayed by an allocator with the other setting.
    (``empty_cache()`` is never the fix for an OOM: the allocator returns every
    wholly free cached segment itself before it raises one; what stays
    unallocated sits in split segments, which ``empty_cache()`` cannot return.)
    """
    oom = context.report.oom
    if oom is None or expandable_already(context.report.device.kind):
        return []
    unallocated = oom.reserved_unallocated_bytes or 0
    requested = oom.requested_bytes or 0
    allocated = oom.allocated_bytes
    capacity = context.capacity
    # Had the cached-but-unallocated memory been usable, the request would have fit.
    fragmented = (
        unallocated > 0 and allocated is not None and capacity is not None and allocated + requested <= capacity
    )
    as_is, run_cell = context.as_is, context.run_cell
    if as_is is not None and as_is.whole_device and run_cell is not None:
        if not fragmented:
            context.refuted.add("expandable_segments")
            return []
        return _measured_allocator_fixes(context, as_is, run_cell, unallocated)
    if context.report.device.kind != "cuda" or unallocated < max(requested, 64 * 2**20):
        return []
    return [
        Suggestion(
            kind="expandable_segments",
            title="Let the allocator grow segments instead of fragmenting",
            detail=f"{format_bytes(unallocated)} is reserved by PyTorch but unallocated.",
            saves_bytes=unallocated,
            params={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
            code=EXPANDABLE_CODE,
            source="rule",
            apply="setup",
        )
    ]


def _measured_allocator_fixes(
    context: _Context, as_is: DryRun, run_cell: CellRunner, unallocated: int
) -> list[Suggestion]:
    found: list[Suggestion] = []
    current = _predicted(as_is, context.baseline)
    for setting, title, how in _FRAGMENTATION_FIXES:
        try:
            run = run_cell({}, alloc_conf=setting)
        except DryRunError as exc:
            context.notes.append(f"{setting} dry run: {exc}")
            continue
        peak = _predicted(run, context.baseline)
        saves = current - peak
        if saves <= 0:
            context.refuted.add("expandable_segments")
            context.notes.append(
                f"{setting} would not help: replayed with it, the cell still reserves {format_bytes(peak)}"
            )
            continue
        # Against the whole usable capacity, not the budget: the replay is of the
        # allocator itself, and a cache that fills the card to its last segment is normal.
        budget = context.capacity
        found.append(
            Suggestion(
                kind="expandable_segments",
                title=title,
                detail=f"{format_bytes(unallocated)} was reserved by PyTorch but unallocated when the cell failed: "
                f"the cache is fragmented. Replayed with PYTORCH_CUDA_ALLOC_CONF={setting} ({how}), the "
                f"notebook's memory (its blocks made again as they lie, segment by segment, the free ones freed "
                f"after) and the cell reserve {format_bytes(peak)} at the peak instead of {format_bytes(current)}. "
                "The history is read from the layout: an estimate where freed memory was reused in another "
                "order. Set it before torch starts (a kernel restart), then run the notebook again.",
                saves_bytes=saves,
                params={"PYTORCH_CUDA_ALLOC_CONF": setting},
                code=EXPANDABLE_CODE,
                source="dry-run",
                fits=budget is not None and peak <= budget,
                apply="setup",
            )
        )
    return found


def _device_maps(context: _Context) -> list[Suggestion]:
    found: list[Suggestion] = []
    for name, model in context.split_models.items():
        found += _device_map_suggestions(name, model, context.capacity)
    return found


#: Every source of suggestions, in the order they run (the first reading of
#: the error's figures comes last: it stands only where nothing measured the same).
#: Cheap and specific first: under the time budget, a search over sizes (ten
#: dry runs or more) must not starve the one dry run that finds a summed loss.
_SOURCES: list[tuple[str, Callable[[_Context], list[Suggestion]]]] = [
    ("leaks", _leaks),
    ("summed loss", _summed_loss),
    ("what-ifs", _what_ifs),
    ("sizes", _sizes),
    ("weights", _weights),
    ("allocator", _allocator),
    ("device maps", _device_maps),
]
