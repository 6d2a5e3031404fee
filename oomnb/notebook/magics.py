"""``%%gpumem`` and ``%gpumem``: the IPython side of oomnb.

The cell runs the way ``%%time`` runs it (transformed, parsed and executed in
the user namespace, the last expression's value returned so it becomes
``Out[n]``); around it the backend's figures are read, and an out-of-memory
error is caught, its memory given back, and reported.
"""

from __future__ import annotations

import ast
import contextlib
import math
import sys
from typing import Any

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display
from traitlets import Bool, Float, TraitError, Unicode, observe, validate

from ..backends import Backend, get_backend, limited
from ..model.report import MIME_TYPE, Report
from ..model.units import Card, format_bytes, parse_limit, parse_size
from . import history
from .pipeline import (
    CellRun,
    Isolation,
    advise_cell,
    dry_run_report,
    first_line,
    guarded,
    is_oom,
    oom_info,
    reachable_names,
    silence_kernel,
)

__all__ = ["GpuMem"]


def current_execution_count(shell: Any) -> int | None:
    """The number of the cell now running.

    IPython 9 increments ``execution_count`` before the cell runs and 8 after;
    the running cell's ``ExecutionResult`` has the right number in both.
    """
    result = getattr(shell.displayhook, "exec_result", None)
    count = getattr(result, "execution_count", None)
    return int(count) if count is not None else shell.execution_count


def _stored(code: Any) -> set[str]:
    """Names a compiled cell assigns in the notebook's namespace (``x = ...``, ``global x``)."""
    import dis

    names: set[str] = set()
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(
            str(ins.argval) for ins in dis.get_instructions(current) if ins.opname in ("STORE_NAME", "STORE_GLOBAL")
        )
        stack.extend(c for c in current.co_consts if hasattr(c, "co_code"))
    return names


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
    advice_budget = Float(
        10.0, help="Seconds advice may spend running the cell on fake tensors (in a forked child) after an OOM."
    ).tag(config=True)
    auto = Bool(False, help="Log every cell's delta and peak in one line (like %gpumem auto on).").tag(config=True)
    auto_output = Unicode(
        "line", help="What auto mode shows under each cell: 'line' (one line) or 'report' (the full report)."
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)  # sets self.shell
        self._backends: dict[str, Backend] = {}
        self._auto_run: CellRun | None = None
        self._auto_code: Any = None
        self._auto_source: str | None = None
        self._last_source: str | None = None
        self._last_raw: str | None = None
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

    @validate("advice_budget")
    def _check_budget(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not math.isfinite(value) or not 0 < value <= 3600:
            raise TraitError(f"advice_budget must be a number of seconds above 0 and at most 3600, not {value!r}")
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
        help=(
            "Line magic only: status (default), panel, census, segments, empty-cache, advise, reset, auto on|off, "
            "limit SIZE|CARD|off, alloc-conf [SETTING], allocator caching|exact."
        ),
    )
    @magic_arguments.argument("--device", "-d", default=None, help="auto, simulated, cuda or cuda:N.")
    @magic_arguments.argument(
        "--limit", "-l", default=None, help="Run the cell as on a device of this size (4GiB) or card (T4)."
    )
    @magic_arguments.argument(
        "--context",
        default=None,
        metavar="SIZE",
        help="Of the limit, memory held outside PyTorch (the CUDA context; a named card brings 300MiB; 0: none).",
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
        context = self._context_arg(args, nbytes if nbytes is not None else backend.capacity)
        if args.batch_var is not None and not args.batch_var.isidentifier():
            raise UsageError(f"--batch-var: {args.batch_var!r} is not a variable name")
        with limited(backend, nbytes, card, context):
            return self._run(cell, line, backend, args)

    @staticmethod
    def _context_arg(args: Any, capacity: int | None) -> int | None:
        if args.context is None:
            return None
        if args.context.strip() in ("0", "0B", "none", "off"):
            return 0  # a raw capacity: nothing held outside PyTorch
        try:
            context = parse_size(args.context)
        except ValueError as exc:
            raise UsageError(f"--context: {exc}") from None
        if capacity is not None and context >= capacity:
            raise UsageError(
                f"--context: {format_bytes(context)} is not less than the card's {format_bytes(capacity)}: "
                "nothing would be left for PyTorch"
            )
        return context

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
        if words == ["empty-cache"]:
            backend = self._backend_or_usage(args.device)
            before = backend.snapshot().reserved_bytes
            backend.empty_cache()
            after = backend.snapshot().reserved_bytes
            print(
                f"oomnb: {backend.name}: empty_cache() gave back {format_bytes(before - after)}; "
                f"reserved now {format_bytes(after)}."
            )
            return None
        if words == ["segments"]:
            from ..render.segments import segments_bundle

            display(segments_bundle(self._backend_or_usage(args.device)), raw=True)
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
            off = words[1] in ("off", "none")
            try:
                # Both checked before anything changes: a bad --context leaves the old limit.
                context = self._context_arg(args, None if off else parse_limit(args.command[1])[0])
                self.limit = "" if off else args.command[1]
            except (TraitError, ValueError) as exc:
                raise UsageError(f"limit: {exc}") from None
            backend = self.backend()
            if context is not None and backend.kind == "simulated":
                backend.limit(*backend.current_limit(), context)
            capacity = backend.capacity
            held = backend.current_context()
            outside = f", {format_bytes(held)} of it held outside PyTorch (the CUDA context)" if held else ""
            print(
                f"oomnb: {backend.name} limited to {format_bytes(capacity)}{outside}."
                if capacity is not None
                else f"oomnb: {backend.name} has no limit."
            )
            return None
        if words[0] == "alloc-conf":
            # "max_split_size_mb:100, expandable_segments:True" arrives as two words.
            self._alloc_conf("".join(args.command[1:]) if len(words) > 1 else None)
            return None
        if words[0] == "allocator" and len(words) == 2 and words[1] in ("caching", "exact"):
            from ..backends.simulated import device as simulated_device

            simulated_device.caching = words[1] == "caching"
            print(
                "oomnb: the simulated device models the caching allocator (reserved, segments, fragmentation)."
                if simulated_device.caching
                else "oomnb: the simulated device counts exact allocations (reserved equals allocated)."
            )
            return None
        raise UsageError(
            f"unknown %gpumem command {' '.join(args.command)!r}: use status, panel, census, segments, empty-cache, "
            "advise, reset, auto on|off, limit SIZE|off, alloc-conf [SETTING] or allocator caching|exact"
        )

    def _alloc_conf(self, text: str | None) -> None:
        """``%gpumem alloc-conf expandable_segments:True``: PYTORCH_CUDA_ALLOC_CONF for the simulated device."""
        from ..backends.simulated import device as simulated_device

        if text is not None:
            try:
                simulated_device.set_alloc_conf("" if text.lower() in ("off", "default") else text)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        conf = simulated_device.alloc.conf.to_text() or "the defaults"
        mode = "" if simulated_device.caching else " (it applies with `%gpumem allocator caching`)"
        emptied = " Its free cached segments were given back." if text is not None and simulated_device.caching else ""
        print(f"oomnb: the simulated device's PYTORCH_CUDA_ALLOC_CONF is {conf}{mode}.{emptied}")

    def _backend_or_usage(self, spec: str | None) -> Backend:
        try:
            return self.backend(spec)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def _compile(self, cell: str, line: str) -> tuple[Any, Any, str, Any]:
        body, last, filename, whole, _ = self._compile_with_source(cell, line)
        return body, last, filename, whole

    def _compile_with_source(self, cell: str, line: str) -> tuple[Any, Any, str, Any, str]:
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
        return body, last, filename, whole, transformed

    def _run(self, cell: str, line: str, backend: Backend, args: Any) -> Any:
        __tracebackhide__ = True
        shell = self._ip
        try:
            body, last, filename, whole, transformed = self._compile_with_source(cell, line)
        except SyntaxError as exc:
            if exc.lineno is not None:
                exc.lineno += 1
            shell.showsyntaxerror()
            return None
        if args.batch_var is not None and args.batch_var not in shell.user_ns and args.batch_var not in _stored(whole):
            raise UsageError(
                f"--batch-var: there is no variable {args.batch_var!r} in the notebook, and the cell does not set it"
            )
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
        self._last_source = transformed
        self._last_raw = cell
        run = CellRun(
            backend,
            user_ns,
            number=number,
            source=first_line(cell),
            batch_var=args.batch_var,
            rollback=self.rollback and not args.no_rollback and not args.dry_run,
            code=whole,
            cell_source=transformed,
        )
        if args.dry_run:
            return self._dry_run(run, whole, args)
        catch = self.catch and not args.no_catch
        value: Any = None
        try:
            exec(body, shell.user_global_ns, user_ns)
            if last is not None:
                value = eval(last, shell.user_global_ns, user_ns)
        except BaseException as exc:
            if not is_oom(exc):
                self._stop_snapshot(snapshot_path)
                if isinstance(exc, Exception):
                    show_from_cell_once(shell, filename)
                raise
            if not catch:
                # The user asked for the error: show the figures, touch nothing.
                run.ledger = None
                self._stop_snapshot(snapshot_path)
                report = run.measure.report(
                    number, backend.snapshot(), backend.snapshot().peak_bytes, source=run.source
                )
                with guarded(report.notes, "read the error's figures"):
                    report.oom = oom_info(backend, exc, backend.snapshot())
                self._publish(report, args.quiet)
                raise
            report = run.failed(exc, extra_roots=self._output_roots())
            del exc
        else:
            self._stop_snapshot(snapshot_path)
            self._publish(run.succeeded(), args.quiet)
            return value
        self._stop_snapshot(snapshot_path)
        self._advise(report, whole, backend, transformed, cell, run)
        self._publish(report, args.quiet)
        return None

    def _output_roots(self) -> list[Any]:
        """What IPython keeps that rollback must count as still holding the user's data."""
        shell = self._ip
        roots: list[Any] = [shell.user_ns.get("Out", {})]
        hidden = getattr(shell, "user_ns_hidden", {})
        roots.extend(hidden.get(name) for name in ("_", "__", "___"))
        return roots

    def _isolation(self, body: Any, backend: Backend, source: str | None = None) -> Isolation:
        return Isolation(
            user_ns=self._ip.user_ns,
            code=body,
            backend=backend,
            budget_s=float(self.advice_budget),
            prepare=silence_kernel(self._ip),
            source=source,
        )

    def _advise(
        self,
        report: Report,
        body: Any,
        backend: Backend,
        source: str | None = None,
        raw: str | None = None,
        run: CellRun | None = None,
    ) -> None:
        """Add the advisor's suggestions; any failure becomes one line of the report."""

        user_ns = self._ip.user_ns
        try:
            self._advise_guarded(report, body, backend, source, raw, run, user_ns)
        except KeyboardInterrupt:
            # Stopping the advice must not cost the report: the recovery is done.
            report.notes.append("advice interrupted: the suggestions are what was found before")

    def _advise_guarded(
        self,
        report: Report,
        body: Any,
        backend: Backend,
        source: str | None,
        raw: str | None,
        run: CellRun | None,
        user_ns: dict[str, Any],
    ) -> None:
        import torch

        from ..analysis.trainer import is_trainer
        from .cleanup import shell_census

        with guarded(report.notes, "advise"):
            advise_cell(
                report,
                isolation=self._isolation(body, backend, source),
                raw_cell=raw,
                freed_traceback=run.freed_traceback if run is not None else None,
                census=shell_census(self._ip, backend),
                cell_names=set(body.co_names),
                # What the cell reads, itself or through the notebook's functions it calls.
                namespace_values={
                    name: value
                    for name in sorted(reachable_names(body, user_ns))
                    if type(value := user_ns.get(name)) is int or isinstance(value, torch.Tensor)
                },
                trainers={
                    name: getattr(value, "args", None)
                    for name in body.co_names
                    if is_trainer(value := user_ns.get(name))
                },
                split_models={
                    name: value
                    for name in body.co_names
                    if isinstance(getattr(value := user_ns.get(name), "hf_device_map", None), dict)
                },
            )

    def _dry_run(self, run: CellRun, body: Any, args: Any) -> None:
        from ..analysis.estimator import DryRunError

        isolation = self._isolation(body, run.backend, self._last_source)
        try:
            report = dry_run_report(run, isolation)
        except (DryRunError, KeyboardInterrupt) as exc:
            # Not a mistake of the user's: a report that says why, with no figures.
            run.measure.stop()
            now = run.backend.snapshot()
            report = run.measure.report(run.number, now, now.allocated_bytes, source=run.source)
            report.dry_run = True
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            report.notes.append(f"the dry run could not run the cell ({why}): no figures for it")
            self._publish(report, args.quiet)
            return
        self._advise(report, body, run.backend, self._last_source, self._last_raw)
        self._publish(report, args.quiet)

    def _advise_last(self, args: Any) -> None:
        last = getattr(self, "_last_cell", None)
        report = history.last_report()
        if last is None or report is None:
            raise UsageError("%gpumem advise needs a cell measured with %%gpumem first")
        body, _, backend = last
        advised = Report.from_dict(report.to_dict())
        advised.suggestions = []
        self._advise(advised, body, backend, self._last_source, self._last_raw)
        display(advised.mime_bundle(), raw=True)

    def _stop_snapshot(self, path: str | None) -> None:
        if path is None:
            return
        from ..backends.cuda import record_history, write_snapshot

        written = write_snapshot(path)
        record_history(False)
        print(f"oomnb: allocator snapshot written to {written} (open it at https://pytorch.org/memory_viz)")

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
        raw = getattr(info, "raw_cell", "") or ""
        self._auto_run = None
        if self._is_gpumem_cell(raw):
            return
        code = None
        self._auto_source = None
        with contextlib.suppress(Exception):  # a cell that does not compile fails on its own
            self._auto_source = self._ip.transform_cell(raw)
            code = self._ip.compile(self._auto_source, "<oomnb auto>", "exec")
        self._auto_run = CellRun(
            self.backend(),
            self._ip.user_ns,
            number=None,
            source=first_line(raw),
            rollback=self.rollback,
            code=code,
            cell_source=self._auto_source,
        )
        self._auto_code = code

    def _post_run_cell(self, result: Any) -> None:
        run, self._auto_run = self._auto_run, None
        if run is None:
            return
        run.number = result.execution_count
        error = result.error_in_exec
        if error is not None and is_oom(error):
            report = run.failed(error, extra_roots=self._output_roots())
            del error
            code, self._auto_code = self._auto_code, None
            if code is not None:
                self._advise(report, code, run.backend, self._auto_source, self._auto_source, run)
            self._auto_publish(report)
            return
        self._auto_publish(run.succeeded())

    def _auto_publish(self, report: Report) -> None:
        if self.auto_output == "report":
            self._publish(report, quiet=False)
            return
        from ..render.report import compact_html, compact_text

        history.record(report)
        # The whole report travels as JSON, so the sidebar shows it; frontends
        # draw it compact (the metadata says so), the text is one line.
        bundle = {"text/plain": compact_text(report), "text/html": compact_html(report), MIME_TYPE: report.to_dict()}
        display(bundle, metadata={MIME_TYPE: {"compact": True}}, raw=True)


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
