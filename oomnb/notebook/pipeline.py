"""One cell pipeline for ``%%gpumem``, ``--dry-run``, ``%gpumem advise`` and auto mode.

A measured cell is a transaction (see :mod:`.transaction`): its code runs
once, for real, in the user's namespace; before it runs, the baseline and a
:class:`~.transaction.Ledger` of what the user has are taken.  Then one of:

- it succeeds: the report of its figures;
- it runs out of memory: the report of the failure, the exception's frames
  released, what the cell created rolled back, memory collected back to the
  baseline, then advice;
- any other error: nothing is touched, the error goes on as without oomnb.

Advice executes the cell again, on fake tensors, and never in the kernel:
every dry run or probe runs in a forked child (:mod:`oomnb.analysis.isolation`)
under one time budget.  Every step of the handling after an OOM is guarded:
a failure in one (building the report, reading the batch variable, rolling
back, advising) becomes one line in ``report.notes`` and the others still run.

This module knows IPython only as "a shell with ``user_ns``"; the magics do
the parsing and the display.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..allocator.oom import is_oom_error
from ..analysis import rules
from ..analysis.cellsource import edit_in_cell, loop_variables, override_assignments
from ..analysis.isolation import CAN_ISOLATE, run_isolated
from ..backends import Backend, MemorySnapshot
from ..model.report import DeviceInfo, OomInfo, Report, Suggestion
from ..model.safe import safe_value
from ..model.units import format_bytes
from . import recovery
from .transaction import Ledger

__all__ = ["CellRun", "advise_cell", "dry_run_report", "first_line"]


def first_line(cell: str) -> str:
    """The cell's first non-empty line (what reports show as its source)."""
    for line in cell.splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


@contextlib.contextmanager
def guarded(notes: list[str], step: str) -> Iterator[None]:
    """Run one step of oomnb's own handling; a failure becomes one line in ``notes``."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        notes.append(f"oomnb could not {step} ({_one_line(exc)}); the rest of the report stands")


def batch_var_of(user_ns: dict[str, Any], name: str | None) -> dict[str, Any] | None:
    """The batch variable as the report stores it: a bounded, JSON-safe value."""
    if name is None:
        return None
    if name not in user_ns:
        return {"name": name, "value": None}
    return {"name": name, "value": safe_value(user_ns[name])}


def reachable_names(code: Any, user_ns: dict[str, Any], depth: int = 4) -> set[str]:
    """The names a cell can rebind or reach: those its code names, and those named by the
    functions, classes and methods of the notebook it calls (``train_step`` uses ``model``)."""
    names: set[str] = set()
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(code, 0)]
    while stack:
        current, level = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        names.update(current.co_names)
        stack.extend((const, level) for const in current.co_consts if isinstance(const, types.CodeType))
        if level >= depth:
            continue
        for name in current.co_names:
            value = user_ns.get(name)
            if value is None:
                continue
            for function in _functions_of(value):
                stack.append((function.__code__, level + 1))
                names.update(function.__code__.co_freevars)
    return names


def _functions_of(value: Any) -> list[types.FunctionType]:
    """The notebook-defined code behind ``value``: a function, a method, or a class's methods."""
    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, types.MethodType) and isinstance(value.__func__, types.FunctionType):
        return [value.__func__]
    cls = value if isinstance(value, type) else type(value)
    if getattr(cls, "__module__", None) != "__main__":
        return []  # a library's classes do not reach the notebook's globals
    return [f for f in vars(cls).values() if isinstance(f, types.FunctionType)]


class CellMeasure:
    """Figures taken around one cell: baseline and timer at the start."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        backend.ensure_started()
        self.before: MemorySnapshot = backend.snapshot()
        backend.reset_peak()
        self.started = time.perf_counter()
        self.duration = 0.0

    def stop(self) -> None:
        self.duration = time.perf_counter() - self.started

    def report(
        self,
        cell: int | None,
        end: MemorySnapshot,
        peak: int,
        *,
        source: str = "",
        batch_var: dict[str, Any] | None = None,
        oom: OomInfo | None = None,
    ) -> Report:
        backend = self.backend
        card = backend.card
        device = DeviceInfo(
            kind=backend.kind,
            name=backend.name,
            index=backend.index,
            capacity_bytes=end.capacity_bytes,
            card=card.name if card else None,
            context_bytes=backend.current_context(),
        )
        return Report(
            cell=cell,
            device=device,
            baseline_bytes=self.before.allocated_bytes,
            end_bytes=end.allocated_bytes,
            peak_bytes=max(peak, self.before.allocated_bytes, end.allocated_bytes),
            reserved_bytes=end.reserved_bytes,
            free_bytes=end.free_bytes,
            duration_s=round(self.duration, 6),
            batch_var=batch_var,
            oom=oom,
            source=source,
        )


def oom_info(backend: Backend, exc: BaseException, at_failure: MemorySnapshot) -> OomInfo:
    """What the error and the backend say about an out-of-memory error."""
    facts = backend.describe_oom(exc)
    capacity = at_failure.capacity_bytes or facts.capacity_bytes
    free = facts.free_bytes if facts.free_bytes is not None else at_failure.free_bytes
    oom = OomInfo(
        requested_bytes=facts.requested_bytes,
        free_bytes=free,
        capacity_bytes=capacity,
        message=str(exc)[:4000],
        over_bytes=(facts.requested_bytes - free) if facts.requested_bytes is not None and free is not None else None,
        allocated_bytes=facts.allocated_bytes,
        reserved_unallocated_bytes=facts.reserved_unallocated_bytes,
        exception_type=type(exc).__name__,
    )
    if facts.kind in ("cuda", "hip") and capacity and facts.free_bytes is not None and facts.process_bytes:
        # What the card has in use that this process does not account for.
        oom.other_processes_bytes = max(0, capacity - facts.free_bytes - facts.process_bytes)
    if oom.over_bytes is not None:
        oom.over_bytes = max(0, oom.over_bytes)
    return oom


class CellRun:
    """One measured cell, from before its code runs to its report.

    Parameters
    ----------
    backend
        Where the figures come from.
    user_ns
        The namespace the cell runs in (a dict).
    number, source
        The cell's execution count and first line, for the report.
    batch_var
        A variable to record in the report (and to size batch advice by).
    rollback
        After an OOM, undo what the cell created (a ledger is taken before
        the cell for that).
    code
        The cell's compiled code: the ledger then records in full only the
        names the cell can reach (see :func:`reachable_names`).
    cell_source
        The cell's source (after IPython's transforms): names it binds in
        loops are temporaries that rollback releases.
    """

    def __init__(
        self,
        backend: Backend,
        user_ns: dict[str, Any],
        *,
        number: int | None,
        source: str,
        batch_var: str | None = None,
        rollback: bool = True,
        code: Any = None,
        cell_source: str | None = None,
    ) -> None:
        self.backend = backend
        self.user_ns = user_ns
        self.number = number
        self.source = source
        self.batch_var_name = batch_var
        self.ledger: Ledger | None = None
        #: Names the cell rebinds in its loops: temporaries to rollback.
        self.temporaries = loop_variables(cell_source)
        #: What the previous error's traceback held, freed by recovery.
        self.freed_traceback: tuple[str, int] | None = None
        if rollback:
            scope = reachable_names(code, user_ns) if code is not None else None
            self.ledger = Ledger(user_ns, scope)
        self.measure = CellMeasure(backend)

    def succeeded(self) -> Report:
        """The report of a cell that finished."""
        self.measure.stop()
        end = self.backend.snapshot()
        report = self.measure.report(self.number, end, end.peak_bytes, source=self.source)
        with guarded(report.notes, f"read the batch variable `{self.batch_var_name}`"):
            report.batch_var = batch_var_of(self.user_ns, self.batch_var_name)
        return report

    def failed(self, exc: BaseException, *, extra_roots: list[Any] | None = None) -> Report:
        """Recover from an out-of-memory error ``exc`` and report it.

        The exception's frames are released here: the caller must drop its own
        reference to ``exc`` afterwards.  Never raises.
        """
        self.measure.stop()
        notes: list[str] = []
        backend = self.backend
        at_failure = backend.snapshot()
        report = self.measure.report(self.number, at_failure, at_failure.peak_bytes, source=self.source)
        with guarded(notes, "read the error's figures"):
            report.oom = oom_info(backend, exc, at_failure)
        if report.oom is None:
            report.oom = OomInfo(None, None, at_failure.capacity_bytes, str(exc)[:4000])
        with guarded(notes, f"read the batch variable `{self.batch_var_name}`"):
            report.batch_var = batch_var_of(self.user_ns, self.batch_var_name)
        oom = report.oom
        with guarded(notes, "diagnose the error"):
            oom.diagnosis, report.suggestions = rules.diagnose(
                oom,
                baseline_bytes=self.measure.before.allocated_bytes,
                allocated_at_failure=at_failure.allocated_bytes,
                capacity_bytes=oom.capacity_bytes,
                simulated=backend.kind == "simulated",
                batch_var=report.batch_var,
                context_bytes=report.device.context_bytes,
            )
        with guarded(notes, "tell what the cell needed"):
            rules.set_lower_bound_story(report)
        with guarded(notes, "release the error's frames"):
            recovery.release_exception(exc)
        with guarded(notes, "roll back what the failed cell created"):
            if self.ledger is not None:
                recovery.collect()
                undone = self.ledger.roll_back(
                    self.user_ns, extra_roots=extra_roots or [], temporaries=self.temporaries
                )
                report.released_names = sorted(undone.released)
                notes.extend(undone.notes)
                if undone.restored:
                    notes.append(
                        "bound "
                        + ", ".join(f"`{n}`" for n in sorted(undone.restored))
                        + " again to what "
                        + ("it" if len(undone.restored) == 1 else "they")
                        + " held before the cell"
                    )
        with guarded(notes, "collect the failed cell's memory"):
            self.freed_traceback = finish_recovery(report, backend)
        report.notes = notes + report.notes
        return report


def _describe_last_error() -> str | None:
    """``ValueError in load()``: what ``sys.last_*`` keeps, in a few words."""
    value = getattr(sys, "last_value", None) or getattr(sys, "last_exc", None)
    if value is None:
        return None
    tb = getattr(sys, "last_traceback", None) or value.__traceback__
    where = ""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name != "<module>":
            where = f" in {code.co_name}()"
        tb = tb.tb_next
    return f"{type(value).__name__}{where}"


def finish_recovery(report: Report, backend: Backend) -> tuple[str, int] | None:
    """Free what a failed cell held and put the figures after it in ``report``.

    ``report`` was built at the moment of failure, so its ``end_bytes`` is what
    was allocated then; the exception's frames must already be released.
    Returns what the previous error's traceback held, when releasing it freed
    memory: (its description, bytes).
    """
    at_failure = report.end_bytes
    recovery.collect(done=lambda: backend.snapshot().allocated_bytes <= report.baseline_bytes)
    before_traceback = backend.snapshot().allocated_bytes
    last_error = _describe_last_error()
    held = None
    if recovery.clear_last_traceback():
        recovery.collect(done=lambda: backend.snapshot().allocated_bytes < before_traceback)
        freed = before_traceback - backend.snapshot().allocated_bytes
        if freed > 0 and last_error is not None:
            held = (last_error, freed)
            report.notes.append(
                f"recovery also freed {format_bytes(freed)} held by the last error's traceback ({last_error})"
            )
    backend.empty_cache()
    after = backend.snapshot()
    report.end_bytes = after.allocated_bytes
    report.reserved_bytes = after.reserved_bytes
    report.free_bytes = after.free_bytes
    report.recovered_bytes = max(0, at_failure - after.allocated_bytes)
    return held


# -- advice: every execution isolated ----------------------------------------------------
@dataclass
class Isolation:
    """How advice executes the cell: in forked children, under one time budget."""

    user_ns: dict[str, Any]
    code: Any
    backend: Backend
    budget_s: float
    #: Called first in each child: cut it off from the kernel's channels.
    prepare: Callable[[], None] | None = None
    #: The cell's source (after IPython's transforms), so that a variable the
    #: cell sets itself (``bs = 8192`` on its first line) can be overridden.
    source: str | None = None

    def __post_init__(self) -> None:
        self.deadline = time.perf_counter() + self.budget_s
        self.spent_note: str | None = None

    def code_for(self, overrides: dict[str, Any], source: str | None = None) -> Any:
        """The cell's code (or ``source``, a changed cell) with ``overrides`` applied where
        it assigns them a constant."""
        if source is None and (not overrides or self.source is None):
            return self.code
        tree, edited = override_assignments(source if source is not None else str(self.source), overrides)
        if not edited and source is None:
            return self.code
        ast.increment_lineno(tree, 1)  # the %%gpumem line
        return compile(tree, self.code.co_filename, "exec")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run_cell(self, overrides: dict[str, Any], source: str | None = None, **options: Any) -> Any:
        """A dry run of the cell (or of ``source``, the cell changed) in a child;
        raises ``DryRunError`` with one line."""
        from ..analysis.estimator import DryRunError, dry_run_cell

        if not CAN_ISOLATE:
            raise DryRunError("this platform cannot fork, and oomnb never dry-runs a cell in the kernel itself")
        try:
            code = self.code_for(overrides, source)
        except SyntaxError as exc:
            raise DryRunError(f"the changed cell does not compile: {exc}") from None
        user_ns = self.user_ns

        def child() -> Any:
            return dry_run_cell(code, user_ns, overrides=overrides, **options)

        result = run_isolated(child, budget_s=self.left(), prepare=self.prepare)
        if result.timed_out:
            self.spent_note = (
                f"advice stopped after {self.budget_s:g} s, its time budget "
                "(`%config GpuMem.advice_budget = 30` gives it more)"
            )
            raise DryRunError(self.spent_note)
        if not result.ok:
            raise DryRunError(str(result.error).removeprefix("DryRunError: "))
        return result.value

    def probe(self, overrides: dict[str, Any]) -> int:
        """A real run of the cell in a child (simulated device only)."""
        from ..analysis.estimator import probe_cell

        if self.backend.kind != "simulated":
            raise RuntimeError("real probes run only on the simulated device (a forked child cannot use CUDA)")
        if not CAN_ISOLATE:
            raise RuntimeError("this platform cannot fork")
        code, user_ns, backend = self.code_for(overrides), self.user_ns, self.backend

        def child() -> int:
            return probe_cell(
                code,
                user_ns,
                overrides,
                allocated=lambda: backend.snapshot().allocated_bytes,
                peak=lambda: backend.snapshot().peak_bytes,
                reset_peak=backend.reset_peak,
            )

        result = run_isolated(child, budget_s=self.left(), prepare=self.prepare)
        if not result.ok or result.value is None:
            raise RuntimeError(result.error or "no result")
        return int(result.value)


def advise_cell(
    report: Report,
    *,
    isolation: Isolation,
    census: Any,
    cell_names: set[str],
    split_models: dict[str, Any],
    raw_cell: str | None = None,
    freed_traceback: tuple[str, int] | None = None,
    namespace_values: dict[str, Any] | None = None,
    trainers: dict[str, Any] | None = None,
) -> None:
    """Put the advisor's ranked, measured suggestions into ``report`` (guarded by the caller)."""
    from ..analysis.advisor import advise

    backend = isolation.backend
    runner = isolation.run_cell if CAN_ISOLATE else None
    advice = advise(
        report,
        census=census,
        run_cell=runner,
        cell_names=cell_names,
        bf16=backend.supports_bf16(),
        probe=isolation.probe if CAN_ISOLATE and backend.kind == "simulated" else None,
        split_models=split_models,
        cell_source=raw_cell,
        namespace_values=namespace_values,
        trainers=trainers,
    )
    report.suggestions = advice.suggestions
    for suggestion in report.suggestions:
        if suggestion.source != "dry-run":
            # A rule's or a probe's new batch goes where the cell sets it (dry-run ones are edited already).
            edit_in_cell(suggestion, isolation.source, raw_cell)
    if freed_traceback is not None and advice.deficit_bytes is not None and advice.deficit_bytes <= 0:
        # Recovery itself removed the cause: say so first, with the figure.
        what, freed = freed_traceback
        report.suggestions.insert(
            0,
            Suggestion(
                kind="clear_traceback",
                title="The memory is free now: run the cell again",
                detail=f"The last error's traceback ({what}) held {format_bytes(freed)}; recovery released it, "
                "and the dry run says the cell now fits.",
                saves_bytes=freed,
                params={"error": what},
                code=raw_cell or "",
                source="measured",
                fits=True,
                apply="replace_cell",
            ),
        )
    if not CAN_ISOLATE:
        report.notes.append("advice without dry runs: this platform cannot fork, and oomnb never reruns a cell")
    report.notes.extend(note for note in advice.notes if note not in report.notes)
    if isolation.spent_note and isolation.spent_note not in report.notes:
        report.notes.append(isolation.spent_note)
    oom = report.oom
    if oom is not None and advice.needed_bytes is not None and advice.budget_bytes is not None:
        oom.needs_bytes, oom.has_bytes = advice.needed_bytes, advice.budget_bytes
        oom.needs_at_least = not advice.needs_measured


def dry_run_report(run: CellRun, isolation: Isolation) -> Report:
    """``--dry-run``: the cell's figures from one isolated dry run; the cell itself is not run."""
    from ..analysis.estimator import DryRunError

    try:
        dry = isolation.run_cell({})
    except DryRunError:
        raise
    run.measure.stop()
    now = run.backend.snapshot()
    growth = max(0, dry.peak_bytes - dry.start_bytes)
    report = run.measure.report(run.number, now, now.allocated_bytes + growth, source=run.source)
    report.end_bytes = now.allocated_bytes + max(0, dry.end_bytes - dry.start_bytes)
    report.dry_run = True
    report.notes.extend(dry.notes)
    with guarded(report.notes, f"read the batch variable `{run.batch_var_name}`"):
        report.batch_var = batch_var_of(run.user_ns, run.batch_var_name)
    return report


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error oomnb catches (never KeyboardInterrupt or SystemExit)."""
    return not isinstance(exc, (KeyboardInterrupt, SystemExit)) and is_oom_error(exc)


def silence_kernel(shell: Any) -> Callable[[], None]:
    """For a forked child: nothing it displays or prints may reach the kernel's channels."""

    def prepare() -> None:
        def nothing(*_args: Any, **_kwargs: Any) -> None:
            return None

        session_module = sys.modules.get("jupyter_client.session")
        if session_module is not None:
            session_module.Session.send = nothing
        with contextlib.suppress(Exception):
            shell.display_pub.publish = nothing
        with contextlib.suppress(Exception):
            shell.displayhook.write_output_prompt = nothing
            shell.displayhook.write_format_data = nothing
        # The notebook's `open` is IPython's wrapper around an io.open bound at
        # import: make it look io.open up at call time, so the child's
        # in-memory files (see isolation) are what it opens.
        interactive = sys.modules.get("IPython.core.interactiveshell")
        if interactive is not None:
            import io

            def late_open(*args: Any, **kwargs: Any) -> Any:
                return io.open(*args, **kwargs)  # noqa: UP020 - looked up at call time on purpose

            setattr(interactive, "io_open", late_open)  # noqa: B010

    return prepare
