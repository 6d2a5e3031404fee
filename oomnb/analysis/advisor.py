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
from .cellsource import accumulation_cell, backward_per_micro_batch, variable_role
from .census import Census, TensorRecord
from .estimator import BatchFit, DryRun, DryRunError, search_batch
from .rules import EXPANDABLE_CODE

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


def _predicted(run: DryRun, baseline: int) -> int:
    """Device peak if the cell ran for real: what the device holds plus the cell's own growth."""
    return baseline + max(0, run.peak_bytes - run.start_bytes)


def advise(
    report: Report,
    *,
    census: Census | None = None,
    run_cell: CellRunner | None = None,
    cell_names: set[str] | None = None,
    bf16: bool | None = None,
    margin: float = 0.05,
    probe: CellProbe | None = None,
    split_models: dict[str, Any] | None = None,
    cell_source: str | None = None,
) -> Advice:
    """Rank the changes that would make ``report``'s cell fit its device.

    ``cell_source`` (the cell as the user wrote it) lets snippets be the
    cell itself, changed: what the dry run measured is what gets pasted.
    """
    capacity = report.device.capacity_bytes or (report.oom.capacity_bytes if report.oom else None)
    # The cell will be rerun from what is allocated now: after an OOM that is
    # at most the baseline, and less where recovery freed what held memory
    # before the cell (the previous error's traceback).
    baseline = min(report.baseline_bytes, report.end_bytes) if report.oom is not None else report.baseline_bytes
    budget = int(capacity * (1 - margin)) if capacity else None
    notes: list[str] = []
    suggestions: list[Suggestion] = []
    as_is: DryRun | None = None
    needed: int | None = None
    if run_cell is not None:
        try:
            as_is = run_cell({})
            needed = _predicted(as_is, baseline)
        except DryRunError as exc:
            notes.append(f"dry run not possible: {exc}")
    if needed is None and report.oom is not None and report.oom.requested_bytes is not None:
        # The cell did not finish: it needed at least this much.
        needed = report.peak_bytes + report.oom.requested_bytes
    deficit = (needed - budget) if needed is not None and budget is not None else None

    if census is not None:
        suggestions += _leak_suggestions(census, cell_names or set())
    if run_cell is not None and as_is is not None and capacity:
        fit = _batch_suggestions(report, run_cell, as_is, baseline, capacity, margin, suggestions, notes, cell_source)
    else:
        fit = None
        if as_is is None and probe is not None and capacity:
            suggestions += _probe_batch(report, probe, baseline, capacity, margin, notes)
    if run_cell is not None and as_is is not None:
        device_type = "cuda" if report.device.kind == "cuda" else "cpu"
        suggestions += _what_if_suggestions(run_cell, as_is, bf16, notes, cell_source, device_type)
        suggestions += _summed_loss_suggestion(run_cell, as_is, cell_source, notes)
        suggestions += _weights_suggestions(as_is, capacity, margin, cell_source)
    if report.oom is not None and report.device.kind == "cuda":
        unallocated = report.oom.reserved_unallocated_bytes or 0
        if unallocated >= max(report.oom.requested_bytes or 0, 64 * 2**20):
            suggestions.append(
                Suggestion(
                    kind="expandable_segments",
                    title="Let the allocator grow segments instead of fragmenting",
                    detail=f"{format_bytes(unallocated)} is reserved by PyTorch but unallocated.",
                    saves_bytes=unallocated,
                    params={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                    code=EXPANDABLE_CODE,
                    source="rule",
                )
            )
    for name, model in (split_models or {}).items():
        suggestions += _device_map_suggestions(name, model, capacity)
    ranked = _rank(suggestions, deficit)
    return Advice(ranked, needed, budget, deficit, fit, notes)


def _rank(suggestions: list[Suggestion], deficit: int | None) -> list[Suggestion]:
    """Those that make the cell fit alone first, then those whose effect is unknown, then the rest."""
    for s in suggestions:
        if s.fits is not None:
            continue
        if deficit is not None and deficit <= 0:
            s.fits = True
        elif deficit is not None and s.saves_bytes is not None:
            s.fits = s.saves_bytes >= deficit

    def key(s: Suggestion) -> tuple[int, int, int]:
        order = 0 if s.fits else (1 if s.fits is None else 2)
        return (order, _PREFERENCE.index(s.kind), -(s.saves_bytes or 0))

    # The same kind twice (two leaks): keep both, best first.
    return sorted(suggestions, key=key)


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
    for record in census.records:
        if not record.graph_bytes:
            continue
        if record.holder in ("variable", "container"):
            graphs.setdefault(record.root, []).append(record)
        elif record.holder == "attribute" and record.root not in module_roots:
            graphs.setdefault(record.path, []).append(record)
    for holder, records in sorted(graphs.items(), key=lambda item: -sum(r.graph_bytes for r in item[1])):
        total = sum(r.graph_bytes for r in records)
        many = f"{len(records)} autograd graphs" if len(records) > 1 else "its autograd graph"
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
        elif any(r.path.startswith((f"{holder}['", f'{holder}["')) for r in records):  # a dict
            code = (
                f"{holder} = {{k: v.detach() if torch.is_tensor(v) else v for k, v in {holder}.items()}}"
                "  # or keep loss.item()"
            )
            detail = "Tensors that still have their grad_fn keep every activation their backward would need."
        else:
            code = f"{holder} = [t.detach() if torch.is_tensor(t) else t for t in {holder}]  # or keep loss.item()"
            detail = "Tensors that still have their grad_fn keep every activation their backward would need."
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
    saves = as_is.peak_bytes - run.peak_bytes
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
        )
    ]


def _batch_suggestions(
    report: Report,
    run_cell: CellRunner,
    as_is: DryRun,
    baseline: int,
    capacity: int,
    margin: float,
    suggestions: list[Suggestion],
    notes: list[str],
    cell_source: str | None = None,
) -> BatchFit | None:
    var = report.batch_var
    value = var.get("value") if var else None
    if var is None or not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return None
    name = str(var["name"])
    role = variable_role(cell_source, name)

    def run_at(b: int) -> DryRun:
        run = run_cell({name: b})
        run.batch_size = b
        run.peak_bytes = _predicted(run, baseline)
        return run

    try:
        fit = search_batch(run_at, value, int(capacity * (1 - margin)), capacity, margin)
    except DryRunError as exc:
        notes.append(f"batch search not possible: {exc}")
        return None
    current = _predicted(as_is, baseline)
    if fit.max_batch >= value or fit.max_batch < 1:
        return fit
    saves = current - fit.verified_peak_bytes
    steps = math.ceil(value / fit.max_batch)
    # --batch-var searches any integer memory grows with: its role in the
    # cell (a batch, or a length or resolution) decides the kind.
    kind = "batch_size" if role == "batch" else "input_size"
    suggestions.append(
        Suggestion(
            kind=kind,
            title=f"Lower {name} from {value} to {fit.max_batch}",
            detail=f"Dry runs: {name}={fit.max_batch} peaks at {format_bytes(fit.verified_peak_bytes)} of "
            f"{format_bytes(capacity)} ({int(margin * 100)}% kept free); {name}={value} needs "
            f"{format_bytes(current)}.",
            saves_bytes=saves,
            params={"variable": name, "value": fit.max_batch, "accumulation_steps": steps},
            code=f"{name} = {fit.max_batch}",
            source="dry-run",
        )
    )
    if kind != "batch_size" or not _gradient_bytes(as_is, cell_source) or not cell_source:
        return fit  # accumulation is for training: a cell without backward has no gradients to keep
    # The cell rewritten as micro-batches with one optimizer step, dry-run as
    # such: the gradients stay allocated between micro-batches, which a plain
    # smaller batch does not pay for.
    sets_it = f"{name} =" in cell_source or f"{name}=" in cell_source
    micro = fit.max_batch
    for _ in range(6):
        steps = math.ceil(value / micro)
        micro = math.ceil(value / steps)
        changed = accumulation_cell(cell_source, name, micro, steps, sets_it)
        if changed is None:
            return fit
        try:
            run = run_cell({name: micro}, source=changed)
        except DryRunError as exc:
            notes.append(f"gradient accumulation dry run: {exc}")
            return fit
        peak = _predicted(run, baseline)
        if peak <= fit.budget_bytes:
            break
        micro = max(1, micro * 3 // 4)
    else:
        return fit
    suggestions.append(
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
        )
    )
    return fit


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
    if not _gradient_bytes(as_is, cell_source):
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
        saves = as_is.peak_bytes - changed.peak_bytes
        if saves <= 0:
            continue
        if options.get("checkpoint") and changed.checkpoint_code:
            # What the dry run did to the model's copy, to run once on the model.
            fields = dict(fields, code=changed.checkpoint_code + "\n# then run the cell again")
        found.append(Suggestion(saves_bytes=saves, source="dry-run", **fields))
    return found


def _gradient_bytes(as_is: DryRun, cell_source: str | None) -> int:
    """The gradients a training cell holds at its peak: a cell ending with
    ``zero_grad(set_to_none=True)`` has none left when the dry run ends."""
    if as_is.gradients_bytes:
        return as_is.gradients_bytes
    return as_is.parameters_bytes if ".backward(" in (cell_source or "") else 0


def _weights_suggestions(
    as_is: DryRun, capacity: int | None, margin: float, cell_source: str | None = None
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
                code="import bitsandbytes as bnb\nopt = bnb.optim.AdamW8bit(model.parameters(), lr=lr)",
                source="rule",
            )
        )
    found.append(
        Suggestion(
            kind="quantization",
            title="Fine-tune a quantized model with adapters (QLoRA)",
            detail="4-bit weights take an eighth of fp32; only small adapters get gradients and state.",
            saves_bytes=int(as_is.parameters_bytes * 0.875 + grads + as_is.optimizer_bytes),
            params={"bits": 4},
            code="# transformers + peft: BitsAndBytesConfig(load_in_4bit=True), then get_peft_model(...)",
            source="rule",
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
            code="from torch.distributed.fsdp import fully_shard\nfully_shard(model)  # under torchrun",
            source="dry-run",
        )
    )
    return found


def describe(advice: Advice) -> list[str]:
    """A few lines on what the ranking was based on."""
    lines = []
    if advice.needed_bytes is not None and advice.budget_bytes is not None:
        lines.append(
            f"needs {format_bytes(advice.needed_bytes)}, budget {format_bytes(advice.budget_bytes)}"
            + (
                f", short by {format_bytes(advice.deficit_bytes)}"
                if advice.deficit_bytes and advice.deficit_bytes > 0
                else ""
            )
        )
    lines.extend(advice.notes)
    return lines
