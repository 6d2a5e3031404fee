"""``%%gpumem`` and ``%gpumem``: the IPython side of oomnb.

The cell runs the way ``%%time`` runs it (transformed, parsed and executed in
the user namespace, the last expression's value returned so it becomes
``Out[n]``); around it the backend's figures are read, and an out-of-memory
error is caught, its memory given back, and reported.
"""

from __future__ import annotations

import ast
import re
import sys
import time
from typing import Any

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display
from traitlets import Bool, TraitError, Unicode, observe, validate

from ..allocator.oom import is_oom_error
from ..analysis import rules
from ..analysis.census import holds_tensors
from ..backends import Backend, MemorySnapshot, get_backend, limited
from ..model.report import DeviceInfo, OomInfo, Report
from ..model.units import Card, format_bytes, parse_limit
from . import history, recovery

__all__ = ["GpuMem"]

# Names IPython binds by itself: never rolled back.
_IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython)$")


def current_execution_count(shell: Any) -> int | None:
    """The number of the cell now running.

    IPython 9 increments ``execution_count`` before the cell runs and 8 after;
    the running cell's ``ExecutionResult`` has the right number in both.
    """
    result = getattr(shell.displayhook, "exec_result", None)
    count = getattr(result, "execution_count", None)
    return int(count) if count is not None else shell.execution_count


def _first_line(cell: str) -> str:
    for line in cell.splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


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
        recovered: int = 0,
        released: list[str] | None = None,
    ) -> Report:
        backend = self.backend
        card = backend.card
        device = DeviceInfo(
            kind=backend.kind,
            name=backend.name,
            index=backend.index,
            capacity_bytes=end.capacity_bytes,
            card=card.name if card else None,
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
            recovered_bytes=max(0, recovered),
            released_names=released or [],
            source=source,
        )


def oom_report(
    measure: CellMeasure,
    exc: BaseException,
    at_failure: MemorySnapshot,
    cell: int | None,
    *,
    source: str,
    batch_var: dict[str, Any] | None,
) -> tuple[Report, OomInfo]:
    """The report for a cell that ran out of memory, before recovery."""
    backend = measure.backend
    facts = backend.describe_oom(exc)
    capacity = at_failure.capacity_bytes or facts.capacity_bytes
    free = facts.free_bytes if facts.free_bytes is not None else at_failure.free_bytes
    oom = OomInfo(
        requested_bytes=facts.requested_bytes,
        free_bytes=free,
        capacity_bytes=capacity,
        message=str(exc),
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
    report = measure.report(cell, at_failure, at_failure.peak_bytes, source=source, batch_var=batch_var, oom=oom)
    oom.diagnosis, report.suggestions = rules.diagnose(
        oom,
        baseline_bytes=measure.before.allocated_bytes,
        allocated_at_failure=at_failure.allocated_bytes,
        capacity_bytes=capacity,
        simulated=backend.kind == "simulated",
        batch_var=batch_var,
    )
    return report, oom


@magics_class
class GpuMem(Magics):
    """Measure GPU memory of notebook cells; catch and explain out-of-memory errors.

    Settings kept with ``%config`` (or in an IPython profile)::

        %config GpuMem.limit = "T4"        # every cell runs as on a T4
        %config GpuMem.device = "cuda:1"
        %config GpuMem.catch = False       # let OOM errors through
    """

    device = Unicode("auto", help="Device to measure: auto, simulated, cuda or cuda:N. auto is CUDA when usable.").tag(
        config=True
    )
    limit = Unicode(
        "", help="Capacity for every cell: a size (4GiB) or a card (T4, A100-40GB). Empty: the device's own."
    ).tag(config=True)
    catch = Bool(True, help="Catch out-of-memory errors in %%gpumem cells and give their memory back.").tag(config=True)
    rollback = Bool(
        True, help="After an OOM, remove the variables the failed cell created, so memory returns to baseline."
    ).tag(config=True)
    auto = Bool(False, help="Log every cell's delta and peak in one line (like %gpumem auto on).").tag(config=True)
    auto_output = Unicode(
        "line", help="What auto mode shows under each cell: 'line' (one line) or 'report' (the full report)."
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)  # sets self.shell
        self._backends: dict[str, Backend] = {}
        self._auto_measure: CellMeasure | None = None
        self._last_cell: tuple[Any, Any, Backend] | None = None
        self._hooks_on = False
        self._apply_limit()

    @property
    def _ip(self) -> Any:
        """The shell (never None once registered; typed loosely like IPython's own)."""
        return self.shell

    # -- settings ---------------------------------------------------------------
    @validate("limit")
    def _check_limit(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip()
        if value and value.lower() not in ("none", "off"):
            try:
                parse_limit(value)
            except ValueError as exc:
                raise TraitError(str(exc)) from None
        return value

    @validate("device")
    def _check_device(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip() or "auto"
        try:
            get_backend(value)
        except ValueError as exc:
            raise TraitError(str(exc)) from None
        return value

    @observe("limit", "device")
    def _limit_changed(self, change: Any) -> None:
        self._apply_limit()

    @observe("auto")
    def _auto_changed(self, change: Any) -> None:
        self._set_hooks(bool(change["new"]))

    def _parsed_limit(self) -> tuple[int | None, Card | None]:
        value = self.limit.strip()
        if not value or value.lower() in ("none", "off"):
            return None, None
        return parse_limit(value)

    def _apply_limit(self) -> None:
        nbytes, card = self._parsed_limit()
        backend = self.backend()
        if backend.kind == "simulated" or nbytes is not None or backend.current_limit()[0] is not None:
            backend.limit(nbytes, card)

    def backend(self, spec: str | None = None) -> Backend:
        """The backend for ``spec`` (default: the configured device), kept across cells."""
        key = (spec or self.device or "auto").strip().lower()
        if key not in self._backends:
            backend = get_backend(key)
            for known in self._backends.values():
                if known.kind == backend.kind and known.index == backend.index:
                    backend = known
                    break
            self._backends[key] = backend
        return self._backends[key]

    def close(self) -> None:
        """Undo what loading did: hooks off, simulated tracking stopped."""
        self._set_hooks(False)
        from ..backends.simulated import device as simulated_device

        if any(b.kind == "simulated" for b in self._backends.values()) and simulated_device.active:
            simulated_device.capacity = None
            simulated_device.card = None
            simulated_device.stop()
        self._backends.clear()

    # -- %gpumem / %%gpumem -------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument(
        "command",
        nargs="*",
        help="Line magic only: status (default), panel, census, advise, reset, auto on|off, limit SIZE|CARD|off.",
    )
    @magic_arguments.argument("--device", "-d", default=None, help="auto, simulated, cuda or cuda:N.")
    @magic_arguments.argument(
        "--limit", "-l", default=None, help="Run the cell as on a device of this size (4GiB) or card (T4)."
    )
    @magic_arguments.argument(
        "--no-catch", action="store_true", help="Show the report, then re-raise an out-of-memory error."
    )
    @magic_arguments.argument(
        "--no-rollback",
        action="store_true",
        help="After an OOM, keep the variables the failed cell created.",
    )
    @magic_arguments.argument("--quiet", "-q", action="store_true", help="Record the report without showing it.")
    @magic_arguments.argument(
        "--dry-run",
        action="store_true",
        help="Do not run the cell: run it on fake tensors and report the memory it would need, with advice.",
    )
    @magic_arguments.argument(
        "--batch-var", "-b", default=None, metavar="NAME", help="Record this variable's value in the report."
    )
    @magic_arguments.argument(
        "--snapshot",
        default=None,
        metavar="PATH",
        help="CUDA only: record allocator history and write a snapshot for pytorch.org/memory_viz.",
    )
    @line_cell_magic
    def gpumem(self, line: str, cell: str | None = None) -> Any:
        """Measure a cell's GPU memory; catch and explain out-of-memory errors.

        As a cell magic, reports the allocation baseline, end, delta and peak of
        the cell, reserved memory, capacity, free and duration.  An
        out-of-memory error is caught: the memory the cell held is given back,
        the kernel stays usable and the report says why it happened.

        Without a GPU the simulated device counts every tensor exactly as the
        CUDA caching allocator would and, with ``--limit``, raises a real
        ``torch.OutOfMemoryError``.

        Examples
        --------
        ::

            In [1]: %load_ext oomnb

            In [2]: %%gpumem --limit T4 --batch-var batch_size
               ...: out = model(torch.randn(batch_size, 3, 224, 224))

            In [3]: %gpumem                 # status of the device
            In [4]: %gpumem auto on         # one line for every cell
            In [5]: %gpumem limit 8GiB      # every cell runs as on an 8 GiB card
            In [6]: %gpumem panel           # what the notebook holds; free it in one click
            In [7]: %gpumem census          # the same, as text
            In [8]: %gpumem advise          # what would make the last measured cell fit

            In [9]: %%gpumem --dry-run --limit T4 --batch-var batch_size
               ...: train_step(batch_size)  # not run: measured on fake tensors
            In [8]: %gpumem reset           # peak and history start again
        """
        __tracebackhide__ = True  # read by IPython's traceback printer
        args = magic_arguments.parse_argstring(self.gpumem, line)
        if cell is None:
            return self._line(args)
        if args.command:
            raise UsageError(f"%%gpumem takes options only, not {' '.join(args.command)!r} (see %%gpumem?)")
        try:
            backend = self.backend(args.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        nbytes: int | None = None
        card: Card | None = None
        if args.limit is not None:
            try:
                nbytes, card = parse_limit(args.limit)
            except ValueError as exc:
                raise UsageError(f"--limit: {exc}") from None
        if args.batch_var is not None and not args.batch_var.isidentifier():
            raise UsageError(f"--batch-var: {args.batch_var!r} is not a variable name")
        with limited(backend, nbytes, card):
            return self._run(cell, line, backend, args)

    def _line(self, args: Any) -> Any:
        words = [w.lower() for w in args.command]
        if not words or words == ["status"]:
            backend = self._backend_or_usage(args.device)
            display(status_bundle(backend), raw=True)
            return None
        if words == ["reset"]:
            backend = self._backend_or_usage(args.device)
            backend.reset_peak()
            history.clear_history()
            print(f"oomnb: peak reset to {format_bytes(backend.snapshot().allocated_bytes)}; history cleared.")
            return None
        if words == ["panel"]:
            from .panel import MemoryPanel

            display(MemoryPanel(self._ip, self._backend_or_usage(args.device)))
            return None
        if words == ["advise"]:
            self._advise_last(args)
            return None
        if words == ["census"]:
            from .cleanup import shell_census

            census = shell_census(self._ip, self._backend_or_usage(args.device))
            print(census_text(census))
            return None
        if words[0] == "auto" and len(words) == 2 and words[1] in ("on", "off"):
            self.auto = words[1] == "on"
            print(f"oomnb: auto {'on: every cell is measured' if self.auto else 'off'}.")
            return None
        if words[0] == "limit" and len(words) == 2:
            try:
                self.limit = "" if words[1] in ("off", "none") else args.command[1]
            except TraitError as exc:
                raise UsageError(f"limit: {exc}") from None
            backend = self.backend()
            capacity = backend.capacity
            print(
                f"oomnb: {backend.name} limited to {format_bytes(capacity)}."
                if capacity is not None
                else f"oomnb: {backend.name} has no limit."
            )
            return None
        raise UsageError(
            f"unknown %gpumem command {' '.join(args.command)!r}: use status, panel, census, advise, reset, "
            "auto on|off or limit SIZE|off"
        )

    def _backend_or_usage(self, spec: str | None) -> Backend:
        try:
            return self.backend(spec)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def _compile(self, cell: str, line: str) -> tuple[Any, Any, str, Any]:
        """Compile the cell so tracebacks name the notebook's own lines.

        Returns the body without its last expression, that expression (its
        value becomes ``Out[n]``), the file name, and the whole cell as one
        code object (what dry runs execute).
        """
        shell = self._ip
        transformed = shell.transform_cell(cell)
        header = f"%%gpumem {line}".rstrip()
        filename = shell.compile.cache(
            header + "\n" + transformed, current_execution_count(shell) or 0, raw_code=header + "\n" + cell
        )
        tree = shell.compile.ast_parse(transformed, filename=filename)
        ast.increment_lineno(tree, 1)
        tree = shell.transform_ast(tree)
        whole = shell.compile(tree, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = shell.compile(ast.Expression(tree.body.pop().value), filename, "eval")
        body = shell.compile(tree, filename, "exec")
        return body, last, filename, whole

    def _run(self, cell: str, line: str, backend: Backend, args: Any) -> Any:
        __tracebackhide__ = True
        shell = self._ip
        try:
            body, last, filename, whole = self._compile(cell, line)
        except SyntaxError as exc:
            if exc.lineno is not None:
                exc.lineno += 1
            shell.showsyntaxerror()
            return None
        snapshot_path = args.snapshot
        if snapshot_path is not None and backend.kind != "cuda":
            print(
                "oomnb: --snapshot records the CUDA allocator's history; the simulated device has no allocator "
                "history to record. The cell runs without it.",
                file=sys.stderr,
            )
            snapshot_path = None
        if snapshot_path is not None:
            from ..backends.cuda import record_history

            record_history(True)
        number = current_execution_count(shell)
        user_ns = shell.user_ns
        self._last_cell = (whole, args, backend)
        if args.dry_run:
            return self._dry_run(whole, cell, number, backend, args)
        # ids only: holding the values would keep rebound tensors alive.
        ids_before = {name: id(value) for name, value in user_ns.items()}
        catch = self.catch and not args.no_catch
        measure = CellMeasure(backend)
        failure: BaseException | None = None
        in_backward = False
        value: Any = None
        report: Report | None = None
        try:
            exec(body, shell.user_global_ns, user_ns)
            if last is not None:
                value = eval(last, shell.user_global_ns, user_ns)
        except BaseException as exc:
            measure.stop()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not is_oom_error(exc):
                self._stop_snapshot(snapshot_path)
                if isinstance(exc, Exception):
                    show_from_cell_once(shell, filename)
                raise
            at_failure = backend.snapshot()
            report, _ = oom_report(
                measure,
                exc,
                at_failure,
                number,
                source=_first_line(cell),
                batch_var=self._batch_var(args.batch_var),
            )
            if not catch:
                self._stop_snapshot(snapshot_path)
                self._publish(report, args.quiet)
                raise
            in_backward = recovery.raised_in_backward(exc)
            recovery.release_exception(exc)
            failure = exc
        finally:
            measure.stop()
        if failure is not None and report is not None:
            del failure
            if self.rollback and not args.no_rollback:
                report.released_names = roll_back(user_ns, ids_before)
                if in_backward:
                    report.released_names += drop_partial_gradients(user_ns, whole.co_names)
            finish_recovery(report, backend)
            self._stop_snapshot(snapshot_path)
            self._add_advice(report, whole, backend)
            self._publish(report, args.quiet)
            return None
        self._stop_snapshot(snapshot_path)
        end = backend.snapshot()
        report = measure.report(
            number,
            end,
            end.peak_bytes,
            source=_first_line(cell),
            batch_var=self._batch_var(args.batch_var),
        )
        self._publish(report, args.quiet)
        return value

    def _cell_runner(self, body: Any) -> Any:
        from ..analysis.estimator import dry_run_cell

        user_ns = self._ip.user_ns

        def run(overrides: dict[str, Any], **options: Any) -> Any:
            return dry_run_cell(body, user_ns, overrides=overrides, **options)

        return run

    def _cell_probe(self, body: Any, backend: Backend) -> Any:
        from ..analysis.estimator import probe_cell

        user_ns = self._ip.user_ns

        def probe(overrides: dict[str, Any]) -> int:
            try:
                return probe_cell(
                    body,
                    user_ns,
                    overrides,
                    allocated=lambda: backend.snapshot().allocated_bytes,
                    peak=lambda: backend.snapshot().peak_bytes,
                    reset_peak=backend.reset_peak,
                )
            finally:
                recovery.collect()
                backend.empty_cache()

        return probe

    def _add_advice(self, report: Report, body: Any, backend: Backend) -> None:
        """Replace the first-reading suggestions with the advisor's ranked, measured ones."""
        from ..analysis.advisor import advise, describe
        from .cleanup import shell_census

        advice = advise(
            report,
            census=shell_census(self._ip, backend),
            run_cell=self._cell_runner(body),
            cell_names=set(body.co_names),
            bf16=backend.supports_bf16(),
            probe=self._cell_probe(body, backend),
            split_models={
                name: value
                for name in body.co_names
                if isinstance(getattr(value := self._ip.user_ns.get(name), "hf_device_map", None), dict)
            },
        )
        measured_kinds = {s.kind for s in advice.suggestions}
        rules_left = [s for s in report.suggestions if s.kind not in measured_kinds]
        report.suggestions = advice.suggestions + rules_left
        if report.oom is not None:
            extra = "; ".join(describe(advice))
            if extra:
                report.oom.diagnosis = (report.oom.diagnosis + " Advisor: " + extra + ".").strip()

    def _dry_run(self, body: Any, cell: str, number: int | None, backend: Backend, args: Any) -> None:
        from ..analysis.estimator import DryRunError

        measure = CellMeasure(backend)
        try:
            run = self._cell_runner(body)({})
        except DryRunError as exc:
            raise UsageError(f"--dry-run: {exc}") from None
        measure.stop()
        now = backend.snapshot()
        growth = max(0, run.peak_bytes - run.start_bytes)
        report = measure.report(
            number,
            now,
            now.allocated_bytes + growth,
            source=_first_line(cell),
            batch_var=self._batch_var(args.batch_var),
        )
        report.end_bytes = now.allocated_bytes + max(0, run.end_bytes - run.start_bytes)
        report.dry_run = True
        self._add_advice(report, body, backend)
        self._publish(report, args.quiet)

    def _advise_last(self, args: Any) -> None:
        last = getattr(self, "_last_cell", None)
        report = history.last_report()
        if last is None or report is None:
            raise UsageError("%gpumem advise needs a cell measured with %%gpumem first")
        body, _, backend = last
        advised = Report.from_dict(report.to_dict())
        advised.suggestions = []
        self._add_advice(advised, body, backend)
        display(advised.mime_bundle(), raw=True)

    def _stop_snapshot(self, path: str | None) -> None:
        if path is None:
            return
        from ..backends.cuda import record_history, write_snapshot

        written = write_snapshot(path)
        record_history(False)
        print(f"oomnb: allocator snapshot written to {written} (open it at https://pytorch.org/memory_viz)")

    def _batch_var(self, name: str | None) -> dict[str, Any] | None:
        if name is None:
            return None
        value = self._ip.user_ns.get(name)
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            value = repr(value)
        return {"name": name, "value": value}

    def _publish(self, report: Report, quiet: bool) -> None:
        history.record(report)
        if not quiet:
            display(report.mime_bundle(), raw=True)

    # -- %gpumem auto ---------------------------------------------------------------
    def _set_hooks(self, on: bool) -> None:
        events = self._ip.events
        if on and not self._hooks_on:
            events.register("pre_run_cell", self._pre_run_cell)
            events.register("post_run_cell", self._post_run_cell)
            self._hooks_on = True
        elif not on and self._hooks_on:
            for name, hook in (("pre_run_cell", self._pre_run_cell), ("post_run_cell", self._post_run_cell)):
                if hook in events.callbacks[name]:
                    events.unregister(name, hook)
            self._hooks_on = False

    @staticmethod
    def _is_gpumem_cell(raw: str) -> bool:
        return raw.lstrip().startswith("%%gpumem")

    def _pre_run_cell(self, info: Any) -> None:
        if self._is_gpumem_cell(getattr(info, "raw_cell", "") or ""):
            self._auto_measure = None
            return
        self._auto_measure = CellMeasure(self.backend())

    def _post_run_cell(self, result: Any) -> None:
        measure, self._auto_measure = self._auto_measure, None
        if measure is None:
            return
        measure.stop()
        backend = measure.backend
        raw = getattr(result.info, "raw_cell", "") or ""
        number = result.execution_count
        error = result.error_in_exec
        if error is not None and is_oom_error(error):
            at_failure = backend.snapshot()
            report, _ = oom_report(measure, error, at_failure, number, source=_first_line(raw), batch_var=None)
            recovery.release_exception(error)
            del error
            finish_recovery(report, backend)
            self._auto_publish(report)
            return
        end = backend.snapshot()
        report = measure.report(number, end, end.peak_bytes, source=_first_line(raw))
        self._auto_publish(report)

    def _auto_publish(self, report: Report) -> None:
        if self.auto_output == "report":
            self._publish(report, quiet=False)
            return
        history.record(report)
        print(report.headline())
        if report.oom is not None:
            print("  " + report.oom.diagnosis)


def roll_back(user_ns: dict[str, Any], ids_before: dict[str, int]) -> list[str]:
    """Remove the names a failed cell bound (new or rebound) to tensor-holding values.

    Their earlier values are gone already (the cell replaced them), so what
    they hold now is the failed cell's partial work: a ``loss`` with its whole
    autograd graph, a batch, a half-built output.  Plain values (a ``step``
    counter) are left as the cell left them.
    """
    released = []
    for name, value in list(user_ns.items()):
        if _IPYTHON_NAMES.match(name) or ids_before.get(name) == id(value):
            continue
        if holds_tensors(value):
            del user_ns[name]
            released.append(name)
    return sorted(released)


def drop_partial_gradients(user_ns: dict[str, Any], names: Any) -> list[str]:
    """After an OOM inside ``backward()``: drop the gradients it half wrote.

    Backward had already accumulated into the layers it finished; those
    gradients belong to no complete step.  The modules and optimizers the cell
    names get ``zero_grad(set_to_none=True)``.
    """
    import torch

    dropped = []
    for name in dict.fromkeys(names):
        value = user_ns.get(name)
        if isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
            params = (
                value.parameters()
                if isinstance(value, torch.nn.Module)
                else (p for group in value.param_groups for p in group["params"])
            )
            if any(p.grad is not None for p in params):
                value.zero_grad(set_to_none=True)
                dropped.append(f"{name} (gradients)")
    return dropped


def show_from_cell_once(shell: Any, filename: str) -> None:
    """Make IPython print the next error as it would without the magic.

    The traceback of an error raised inside ``%%gpumem`` also passes through
    ``run_cell_magic`` and this module.  For the one error now propagating, a
    one-shot handler starts the printed traceback at the cell's own code and
    sets ``sys.last_*`` as IPython does, so ``%debug`` still works.
    """
    previous = (shell.custom_exceptions, shell.CustomTB)

    def handler(sh: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> Any:
        sh.custom_exceptions, sh.CustomTB = previous
        start = tb
        while start is not None and start.tb_frame.f_code.co_filename != filename:
            start = start.tb_next
        start = start or tb
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, start
        if sys.version_info >= (3, 12):
            sys.last_exc = value
        stb = sh.InteractiveTB.structured_traceback(etype, value, start, tb_offset=0)
        # IPython 9 ignores a handler's return value, 8 shows it: show it here
        # and return nothing, which both accept.
        sh._showtraceback(etype, value, stb)

    shell.set_custom_exc((Exception,), handler)


def finish_recovery(report: Report, backend: Backend) -> None:
    """Free what a failed cell held and put the figures after it in ``report``.

    ``report`` was built at the moment of failure, so its ``end_bytes`` is what
    was allocated then; the exception's frames must already be released.
    """
    at_failure = report.end_bytes
    recovery.clear_last_traceback()
    recovery.collect(done=lambda: backend.snapshot().allocated_bytes <= report.baseline_bytes)
    backend.empty_cache()
    after = backend.snapshot()
    report.end_bytes = after.allocated_bytes
    report.reserved_bytes = after.reserved_bytes
    report.free_bytes = after.free_bytes
    report.recovered_bytes = max(0, at_failure - after.allocated_bytes)


def census_text(census: Any, top: int = 20) -> str:
    """The census as a few lines of text, biggest holders first."""
    lines = [
        f"{len(census.records)} storages reachable from the notebook: {format_bytes(census.device_bytes)}"
        + (
            f"; {format_bytes(census.unreachable_bytes)} allocated but not reachable"
            if census.unreachable_bytes
            else ""
        )
    ]
    for root, nbytes in list(census.root_bytes().items())[:top]:
        lines.append(f"  {format_bytes(nbytes):>11}  {root}")
    return "\n".join(lines)


def status_bundle(backend: Backend) -> dict[str, str]:
    """``%gpumem`` status as a display bundle."""
    import html

    snap = backend.snapshot()
    capacity = format_bytes(snap.capacity_bytes) if snap.capacity_bytes is not None else "no limit"
    free = format_bytes(snap.free_bytes) if snap.free_bytes is not None else "unknown"
    kind = "simulated on the CPU" if backend.kind == "simulated" else "CUDA"
    text = (
        f"{backend.name} ({kind}): allocated {format_bytes(snap.allocated_bytes)} · peak "
        f"{format_bytes(snap.peak_bytes)} · reserved {format_bytes(snap.reserved_bytes)} · capacity {capacity}"
        f" · free {free}"
    )
    return {"text/plain": text, "text/html": f"<code>{html.escape(text)}</code>"}
