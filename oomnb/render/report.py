"""A report as text and as HTML: what every frontend without the lab extension shows."""

from __future__ import annotations

import html

from ..model.report import Report
from ..model.units import format_bytes

__all__ = ["device_label", "headline", "to_html", "to_text"]


def device_label(report: Report) -> str:
    capacity = report.device.capacity_bytes
    cap = f"{format_bytes(capacity)}" if capacity is not None else "no limit"
    tag = "simulated on the CPU" if report.simulated else "CUDA"
    return f"{report.device.name} ({cap}, {tag})"


def headline(report: Report) -> str:
    """One line: what `%gpumem auto on` prints for a cell."""
    cell = f"[{report.cell}]" if report.cell is not None else "[-]"
    text = (
        f"oomnb {cell} delta {format_bytes(report.delta_bytes, signed=True)}, "
        f"peak {format_bytes(report.peak_bytes)}, {report.duration_s:.2f} s"
        f" ({'simulated' if report.simulated else report.device.name})"
    )
    if report.oom is not None:
        text += " - OUT OF MEMORY"
    return text


def to_text(report: Report) -> str:
    lines = [f"oomnb · cell {report.cell if report.cell is not None else '-'} · {report.device_label()}"]
    if report.dry_run:
        lines[0] += " · DRY RUN (not executed; figures from fake tensors)"
    free = f" · free {format_bytes(report.free_bytes)}" if report.free_bytes is not None else ""
    lines.append(
        f"  baseline {format_bytes(report.baseline_bytes)} → end {format_bytes(report.end_bytes)}"
        f" (delta {format_bytes(report.delta_bytes, signed=True)}) · peak {format_bytes(report.peak_bytes)}"
        f" · reserved {format_bytes(report.reserved_bytes)}{free} · {report.duration_s:.3f} s"
    )
    if report.batch_var is not None:
        lines.append(f"  {report.batch_var['name']} = {report.batch_var['value']!r}")
    if report.oom is not None:
        lines.extend(_oom_text(report))
    lines.extend(f"  note: {note}" for note in report.notes)
    for number, suggestion in enumerate(report.suggestions, 1):
        saves = f"saves {format_bytes(suggestion.saves_bytes)}" if suggestion.saves_bytes else "saving unknown"
        fit = {True: "; fits", False: "; not enough alone", None: ""}[suggestion.fits]
        lines.append(f"  {number}. {suggestion.title} [{suggestion.kind}; {saves}; {suggestion.source}{fit}]")
        if suggestion.code:
            lines.append(f"     {suggestion.how}")
            lines.extend(f"       {code_line}" for code_line in suggestion.code.splitlines())
    return "\n".join(lines)


def _oom_figures(report: Report) -> list[tuple[str, str]]:
    """(label, figure) of the error: requested, free, over by; what is known of them."""
    oom = report.oom
    if oom is None:
        return []
    pairs = [("requested", oom.requested_bytes), ("free", oom.free_bytes), ("over by", oom.over_bytes)]
    return [(label, format_bytes(value)) for label, value in pairs if value is not None]


def _oom_text(report: Report) -> list[str]:
    oom = report.oom
    if oom is None:
        return []
    lines = ["  OUT OF MEMORY: " + oom.exception_type]
    figures = [f"{label} {value}" for label, value in _oom_figures(report)]
    if figures:
        lines.append("    " + ", ".join(figures))
    if oom.diagnosis:
        lines.append("    why: " + oom.diagnosis)
    recovered = f"    recovered {format_bytes(report.recovered_bytes)}"
    if report.released_names:
        recovered += " (rolled back: " + ", ".join(report.released_names) + ")"
    lines.append(recovered + f"; allocated now {format_bytes(report.end_bytes)}")
    return lines


def to_html(report: Report) -> str:
    esc = html.escape
    cap = report.device.capacity_bytes
    scale = max(v for v in (cap, report.peak_bytes, report.baseline_bytes, 1) if v is not None)
    if report.oom is not None and report.oom.requested_bytes:
        scale = max(
            scale, report.end_bytes + report.oom.requested_bytes, report.peak_bytes + report.oom.requested_bytes
        )

    def pct(value: int) -> str:
        return f"{100.0 * value / scale:.2f}%"

    badge_color = "#b45309" if report.simulated else "#15803d"
    badge = "simulated" if report.simulated else "CUDA"
    rows = [
        ("baseline", format_bytes(report.baseline_bytes)),
        ("end", format_bytes(report.end_bytes)),
        ("delta", format_bytes(report.delta_bytes, signed=True)),
        ("peak", format_bytes(report.peak_bytes)),
        ("reserved", format_bytes(report.reserved_bytes)),
        ("capacity", format_bytes(cap) if cap is not None else "no limit"),
        ("free", format_bytes(report.free_bytes) if report.free_bytes is not None else "unknown"),
        ("duration", f"{report.duration_s:.3f} s"),
    ]
    if report.batch_var is not None:
        rows.append((str(report.batch_var["name"]), repr(report.batch_var["value"])))
    cells = "".join(
        f"<td style='padding:0 10px 0 0'><span style='color:#6b7280'>{esc(k)}</span><br><b>{esc(v)}</b></td>"
        for k, v in rows
    )
    bar = (
        "<div style='position:relative;height:10px;background:#e5e7eb;border-radius:3px;margin:6px 0'>"
        f"<div title='peak' style='position:absolute;height:10px;width:{pct(report.peak_bytes)};"
        "background:#93c5fd;border-radius:3px'></div>"
        f"<div title='baseline' style='position:absolute;height:10px;width:{pct(report.baseline_bytes)};"
        "background:#2563eb;border-radius:3px'></div>"
    )
    if report.oom is not None and report.oom.requested_bytes:
        bar += (
            f"<div title='failed request' style='position:absolute;left:{pct(report.peak_bytes)};height:10px;"
            f"width:{pct(report.oom.requested_bytes)};background:repeating-linear-gradient(45deg,#dc2626,"
            "#dc2626 3px,#fecaca 3px,#fecaca 6px)'></div>"
        )
    if cap is not None:
        bar += (
            f"<div title='capacity' style='position:absolute;left:{pct(cap)};width:2px;height:14px;"
            "top:-2px;background:#111'></div>"
        )
    bar += "</div>"
    parts = [
        "<div class='oomnb-report' style='font-family:var(--jp-ui-font-family,sans-serif);font-size:12px;"
        "border:1px solid #d1d5db;border-radius:6px;padding:6px 10px;max-width:860px'>",
        f"<div><b>GPU memory</b> · cell {esc(str(report.cell if report.cell is not None else '-'))} · "
        f"{esc(report.device.name)} <span style='background:{badge_color};color:white;border-radius:3px;"
        f"padding:0 4px'>{badge}</span>"
        + (" <b>dry run</b> (not executed; figures from fake tensors)" if report.dry_run else "")
        + "</div>",
        bar,
        f"<table style='border-collapse:collapse'><tr>{cells}</tr></table>",
    ]
    if report.oom is not None:
        oom = report.oom
        figures = [f"{label} <b>{esc(value)}</b>" for label, value in _oom_figures(report)]
        recovered = f"recovered {esc(format_bytes(report.recovered_bytes))}"
        if report.released_names:
            recovered += " (rolled back: " + esc(", ".join(report.released_names)) + ")"
        parts.append(
            "<div style='margin-top:6px;padding:4px 6px;background:#fef2f2;border-left:3px solid #dc2626'>"
            f"<b>Out of memory</b> ({esc(oom.exception_type)}): {', '.join(figures)}<br>"
            f"{esc(oom.diagnosis)}<br><span style='color:#6b7280'>{recovered}; the kernel is fine.</span>"
            f"<details><summary>message</summary><pre style='white-space:pre-wrap'>{esc(oom.message)}</pre>"
            "</details></div>"
        )
    if report.notes:
        parts.append(
            "<ul style='margin:6px 0 0 0;padding-left:20px'>"
            + "".join(f"<li>{esc(note)}</li>" for note in report.notes)
            + "</ul>"
        )
    if report.suggestions:
        items = []
        for suggestion in report.suggestions:
            saves = f"saves {esc(format_bytes(suggestion.saves_bytes))}" if suggestion.saves_bytes else "saving unknown"
            code = (
                f"<br><span style='color:#6b7280'>{esc(suggestion.how)}</span>"
                f"<pre style='margin:2px 0;background:#f3f4f6;padding:2px 4px'>{esc(suggestion.code)}</pre>"
                if suggestion.code
                else ""
            )
            fit = {True: "; fits", False: "; not enough alone", None: ""}[suggestion.fits]
            items.append(
                f"<li><b>{esc(suggestion.title)}</b> <span style='color:#6b7280'>[{esc(suggestion.kind)}; "
                f"{saves}; {esc(suggestion.source)}{fit}]</span><br>{esc(suggestion.detail)}{code}</li>"
            )
        parts.append(f"<ol style='margin:6px 0 0 0;padding-left:20px'>{''.join(items)}</ol>")
    parts.append("</div>")
    return "".join(parts)
