"""``oomnb profile NOTEBOOK``: run a whole notebook headlessly, every cell measured.

The notebook runs in a real kernel (nbclient) with oomnb loaded and auto mode
publishing a full report under every cell; ``%%gpumem`` cells publish their
own.  The reports are read back from the executed notebook's outputs, so the
table shows exactly what the notebook itself recorded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..model.report import MIME_TYPE, Report
from ..model.units import format_bytes, parse_limit, parse_size

__all__ = ["ProfileError", "ProfileResult", "profile"]

SETUP_TAG = "oomnb-profile-setup"


class ProfileError(Exception):
    """Bad input or a failed run: one line for the user, and the exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CellRow:
    index: int  # position among the notebook's code cells, from 1
    source: str
    report: Report | None
    error: str | None = None


@dataclass
class ProfileResult:
    path: str
    rows: list[CellRow]
    seconds: float
    notebook: Any = field(repr=False, default=None)

    @property
    def reports(self) -> list[Report]:
        return [row.report for row in self.rows if row.report is not None]

    def max_peak(self) -> int:
        return max((r.peak_bytes for r in self.reports), default=0)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"code_cell": row.index, "source": row.source, "error": row.error, "report": row.report.to_dict()}
            for row in self.rows
            if row.report is not None
        ]


def _setup_source(limit: str | None, device: str | None) -> str:
    lines = ["%load_ext oomnb"]
    if device:
        lines.append(f"%config GpuMem.device = {device!r}")
    if limit:
        lines.append(f"%config GpuMem.limit = {limit!r}")
    lines += ['%config GpuMem.auto_output = "report"', "%gpumem auto on"]
    return "\n".join(lines)


def _read(path: str) -> Any:
    import nbformat

    file = Path(path)
    if not file.exists():
        raise ProfileError(f"no such notebook: {path}")
    if file.is_dir():
        raise ProfileError(f"{path} is a folder, not a notebook")
    try:
        return nbformat.read(str(file), as_version=4)
    except Exception as exc:
        raise ProfileError(f"{path} is not a Jupyter notebook ({type(exc).__name__})") from None


def profile(
    path: str,
    *,
    limit: str | None = None,
    device: str | None = None,
    timeout: int = 600,
    progress: TextIO | None = None,
) -> ProfileResult:
    """Run the notebook at ``path`` with every cell measured; raises :class:`ProfileError`."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    if limit:
        try:
            parse_limit(limit)
        except ValueError as exc:
            raise ProfileError(f"--limit: {exc}") from None
    nb = _read(path)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    setup = nbformat.v4.new_code_cell(_setup_source(limit, device))
    setup.metadata["tags"] = [SETUP_TAG]
    nb.cells.insert(0, setup)
    total = len(code_cells)
    done = [0]
    started = time.perf_counter()

    def on_cell_executed(cell: Any, **_: Any) -> None:
        if cell.cell_type != "code" or SETUP_TAG in cell.metadata.get("tags", []):
            return
        done[0] += 1
        if progress is not None:
            width = 30
            filled = int(width * done[0] / max(total, 1))
            first = next((line for line in cell.source.splitlines() if line.strip()), "")[:40]
            progress.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done[0]}/{total} {first:<40}")
            progress.flush()

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(Path(path).resolve().parent)}},
        on_cell_executed=on_cell_executed,
    )
    try:
        client.execute()
    except DeadKernelError:
        raise ProfileError(
            f"the kernel died while running code cell {done[0] + 1} of {path} (out of host memory, or os._exit?)",
            status=4,
        ) from None
    except CellTimeoutError:
        raise ProfileError(f"code cell {done[0] + 1} of {path} ran past --timeout {timeout} s", status=5) from None
    except Exception as exc:
        raise ProfileError(f"could not run {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    finally:
        if progress is not None:
            progress.write("\n")
    nb.cells.pop(0)
    rows = []
    for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        report = None
        error = None
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if MIME_TYPE in data:
                report = Report.from_dict(data[MIME_TYPE])
            if output.get("output_type") == "error":
                error = f"{output.get('ename')}: {output.get('evalue', '')[:120]}"
        first = next((line for line in cell.source.splitlines() if line.strip()), "")
        rows.append(CellRow(index + 1, first, report, error))
    return ProfileResult(os.fspath(path), rows, time.perf_counter() - started, nb)


def table(result: ProfileResult) -> str:
    """The per-cell table and the advice for cells that ran out of memory."""
    lines = [f"{'cell':>4}  {'source':<44} {'delta':>11} {'peak':>11} {'time':>8}"]
    for row in result.rows:
        source = row.source if len(row.source) <= 44 else row.source[:43] + "…"
        if row.report is None:
            lines.append(f"{row.index:>4}  {source:<44} {'-':>11} {'-':>11} {'-':>8}")
            continue
        r = row.report
        flag = "  OUT OF MEMORY" if r.oom else ("  error" if row.error else "")
        lines.append(
            f"{row.index:>4}  {source:<44} {format_bytes(r.delta_bytes, signed=True):>11} "
            f"{format_bytes(r.peak_bytes):>11} {r.duration_s:>7.2f}s{flag}"
        )
    device = result.reports[0].device_label() if result.reports else "no cell was measured"
    lines.append(f"device: {device}; highest peak {format_bytes(result.max_peak())}; ran in {result.seconds:.1f} s")
    for row in result.rows:
        if row.report is not None and row.report.oom is not None:
            lines.append(f"\ncell {row.index} ran out of memory: {row.report.oom.diagnosis}")
            for number, s in enumerate(row.report.suggestions[:5], 1):
                saves = f"saves {format_bytes(s.saves_bytes)}" if s.saves_bytes else "saving unknown"
                lines.append(f"  {number}. {s.title} [{s.kind}; {saves}; {s.source}]")
    return "\n".join(lines)


def main(args: Any) -> int:
    """The ``oomnb profile`` command; returns the exit status."""
    import nbformat

    fail_over = None
    if args.fail_over:
        try:
            fail_over = parse_size(args.fail_over)
        except ValueError as exc:
            print(f"oomnb profile: --fail-over: {exc}", file=sys.stderr)
            return 2
    try:
        result = profile(
            args.notebook,
            limit=args.limit,
            device=args.device,
            timeout=args.timeout,
            progress=sys.stderr if not args.no_progress else None,
        )
    except ProfileError as exc:
        print(f"oomnb profile: {exc}", file=sys.stderr)
        return exc.status
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
        print(f"reports written to {args.json}")
    if args.output:
        nbformat.write(result.notebook, args.output)
        print(f"executed notebook written to {args.output}")
    if fail_over is not None:
        over = [row for row in result.rows if row.report and row.report.peak_bytes > fail_over]
        if over:
            cells = ", ".join(str(row.index) for row in over)
            print(
                f"oomnb profile: peak over the budget of {format_bytes(fail_over)} in cell(s) {cells}", file=sys.stderr
            )
            return 3
    return 0
