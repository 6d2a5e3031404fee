"""Advice for a cell that calls ``trainer.train()`` (Hugging Face ``Trainer``), as ``TrainingArguments``.

Dry-running ``train()`` itself would run the whole loop on fake tensors; what
sets its memory is one optimizer step.  So each what-if dry-runs two
``training_step`` calls and optimizer steps (the second with the optimizer's
state allocated, as every step after the first) on a batch from the
trainer's own dataloader, with one argument changed.  Suggestions are lines
that change ``trainer.args`` (and the batch size the Trainer read when it
was built), run once before ``trainer.train()`` again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..model.report import Suggestion
from ..model.units import format_bytes
from .cellsource import method_callers
from .estimator import DryRun, DryRunError, search_batch

__all__ = ["is_trainer", "trainer_called", "trainer_suggestions"]

#: Two training steps on one batch of the trainer's dataloader: the second
#: runs with the optimizer's state allocated.
_STEPS = """
_oomnb_batch = next(iter({t}.get_train_dataloader()))
{t}.create_optimizer()
{t}.model.train()
{t}.current_gradient_accumulation_steps = 1
for _oomnb_step in range(2):
    {t}.training_step({t}.model, _oomnb_batch)
    {t}.optimizer.step()
    {t}.optimizer.zero_grad(set_to_none=True)
"""


_NOT_REENTRANT = '{"use_reentrant": False}'


def is_trainer(value: Any) -> bool:
    """A ``transformers.Trainer`` (or a subclass: ``SFTTrainer``, ``Seq2SeqTrainer``)."""
    return any(cls.__name__ == "Trainer" and cls.__module__.startswith("transformers") for cls in type(value).__mro__)


def trainer_called(cell_source: str | None, names: list[str]) -> str | None:
    """The name of the trainer whose ``.train()`` the cell calls, if any."""
    return next((name for name in method_callers(cell_source, "train") if name in names), None)


def _batch_lines(t: str, batch: int, steps: int | None = None) -> list[str]:
    lines = [
        f"{t}.args.per_device_train_batch_size = {batch}",
        f"{t}._train_batch_size = {t}.args.train_batch_size  # the Trainer read it when it was built",
    ]
    if steps is not None:
        lines.append(f"{t}.args.gradient_accumulation_steps = {steps}")
    return lines


def trainer_suggestions(
    t: str,
    run_cell: Callable[..., DryRun],
    baseline: int,
    capacity: int,
    margin: float,
    args: Any,
    notes: list[str],
    device_type: str,
) -> tuple[DryRun | None, list[Suggestion]]:
    """(one training step as the trainer is set up, the TrainingArguments changes that save memory)."""

    def run(lines: list[str], **options: Any) -> DryRun:
        return run_cell({}, source="\n".join(lines) + _STEPS.format(t=t), **options)

    def predicted(dry: DryRun) -> int:
        return dry.footprint(baseline)

    try:
        as_is = run([])
    except DryRunError as exc:
        notes.append(f"dry run of one training step of `{t}` not possible: {exc}")
        return None, []
    budget = int(capacity * (1 - margin))
    current = predicted(as_is)
    found: list[Suggestion] = []
    batch = int(getattr(args, "per_device_train_batch_size", 0) or 0)
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    if batch > 1:

        def run_at(b: int) -> DryRun:
            dry = run(_batch_lines(t, b))
            dry.batch_size = b
            dry.peak_bytes = predicted(dry)
            return dry

        try:
            fit = search_batch(run_at, batch, budget, capacity, margin)
        except DryRunError as exc:
            notes.append(f"batch search of `{t}` not possible: {exc}")
            fit = None
        if fit is not None and 1 <= fit.max_batch < batch:
            # The same effective batch: as many micro-batches as needed, evened out.
            steps = math.ceil(batch / fit.max_batch)
            micro = math.ceil(batch / steps)
            steps *= accumulation
            saves = current - fit.verified_peak_bytes
            peak = format_bytes(fit.verified_peak_bytes)
            figures = f"Dry runs of two training steps: peak {peak} of {format_bytes(capacity)}"
            found.append(
                Suggestion(
                    kind="gradient_accumulation",
                    title=f"per_device_train_batch_size={micro}, gradient_accumulation_steps={steps}",
                    detail=f"Keeps the effective batch of {batch * accumulation} per device. {figures}.",
                    saves_bytes=saves,
                    params={"per_device_train_batch_size": micro, "gradient_accumulation_steps": steps},
                    code="\n".join(_batch_lines(t, micro, steps)),
                    source="dry-run",
                    fits=True,
                )
            )
            found.append(
                Suggestion(
                    kind="batch_size",
                    title=f"per_device_train_batch_size={micro} (from {batch})",
                    detail=f"A smaller effective batch changes the training. {figures}.",
                    saves_bytes=saves,
                    params={"variable": "per_device_train_batch_size", "value": micro},
                    code="\n".join(_batch_lines(t, micro)),
                    source="dry-run",
                    fits=True,
                )
            )
    field = "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    what_ifs: list[tuple[list[str], dict[str, Any], dict[str, Any]]] = [
        (
            [
                f'if hasattr({t}.model, "activation_checkpointing_enable"):',
                f"    {t}.model.activation_checkpointing_enable(activation_checkpointing_kwargs={_NOT_REENTRANT})",
                "else:",
                f"    {t}.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={_NOT_REENTRANT})",
                f"{t}.model.config.use_cache = False",
            ],
            {},
            {
                "kind": "gradient_checkpointing",
                "title": f"{field}=True",
                "detail": "Recompute each layer's activations in backward instead of keeping them; "
                "train() turns it on from the arguments.",
                "params": {field: True},
                "code": f"{t}.args.{field} = True\n{t}.model.config.use_cache = False",
            },
        ),
        (
            [],
            {"autocast": torch.bfloat16},
            {
                "kind": "mixed_precision",
                "title": "bf16=True",
                "detail": "The Trainer sets up mixed precision when it is built: pass bf16=True to "
                "TrainingArguments and build the Trainer again.",
                "params": {"bf16": True},
                "code": "TrainingArguments(..., bf16=True)  # then Trainer(...) again",
                "apply": "setup",
            },
        ),
    ]
    for lines, options, fields in what_ifs:
        try:
            dry = run(lines, **options)
        except DryRunError as exc:
            notes.append(f"{fields['kind']} dry run of `{t}`: {exc}")
            continue
        saves = current - predicted(dry)
        if saves > 0:
            found.append(Suggestion(saves_bytes=saves, source="dry-run", **fields))
    if getattr(args, "optim", None) is not None and "8bit" not in str(args.optim) and as_is.parameters_bytes:
        found.append(
            Suggestion(
                kind="optimizer",
                title='optim="adamw_bnb_8bit"',
                detail="8-bit AdamW keeps its two moments in one byte each instead of four (needs bitsandbytes).",
                saves_bytes=int(as_is.parameters_bytes * 2 * 0.75),
                params={"optim": "adamw_bnb_8bit"},
                code='TrainingArguments(..., optim="adamw_bnb_8bit")  # then Trainer(...) again',
                source="rule",
                apply="setup",
            )
        )
    return as_is, found
