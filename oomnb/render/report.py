"""A report as text and as HTML: what every frontend without the lab extension shows.

Every rendering tells one story of an out-of-memory error, the line that
:func:`story` writes ("needs X, has Y, short by Z"); the lab extension's
``story()`` in ``labextension/src/model.ts`` writes the same line from the
same JSON, and a test holds the two to each other on fixture reports.

The HTML is read on light and dark backgrounds alike (JupyterLab's themes,
VS Code's dark theme, an nbconvert page): text keeps the frontend's colour,
muted text is the same colour made fainter, and backgrounds are translucent.
"""

from __future__ import annotations

import html

from ..model.report import Report
from ..model.units import format_bytes

__all__ = ["compact_html", "compact_text", "device_label", "headline", "story", "to_html", "to_text"]

# One palette, translucent so that it reads on any background.
_MUTED = "opacity:0.72"
_BORDER = "rgba(128,128,128,0.45)"
_TRACK = "rgba(128,128,128,0.25)"
_CODE_BG = "rgba(128,128,128,0.14)"
_OOM_BG = "rgba(220,38,38,0.10)"
_RED = "#dc2626"
_PEAK = "#60a5fa"
_BASELINE = "#2563eb"
_MONO = "var(--jp-code-font-family,ui-monospace,SFMono-Regular,Menlo,Consolas,DejaVu Sans Mono,monospace)"
_FIT = {True: "fits", False: "not enough alone", None: ""}


def device_label(report: Report) -> str:
    capacity = report.device.capacity_bytes
    cap = f"{format_bytes(capacity)}" if capacity is not None else "no limit"
    tag = "simulated on the CPU" if report.simulated else "CUDA"
    held = report.device.context_bytes
    # What CUDA's own message calls non-PyTorch memory: on the simulated device
    # the card's CUDA context; on a card, also other processes' memory.
    what = " (CUDA context)" if report.simulated else ""
    outside = f", {format_bytes(held)} of it non-PyTorch memory{what}" if held else ""
    return f"{report.device.name} ({cap}{outside}, {tag})"


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


def story(report: Report) -> str:
    """The one line every rendering tells of an OOM: "needs X, has Y usable of Z, short by W".

    X is the device total the cell needs at its peak ("at least" where the
    failure only gives a lower bound), Y what the device has for it (what
    advice is checked against), Z the device's capacity where it differs.
    Empty for a report without an OOM.
    """
    oom = report.oom
    if oom is None:
        return ""
    if oom.needs_bytes is not None and oom.has_bytes is not None:
        at_least = "at least " if oom.needs_at_least else ""
        capacity = report.device.capacity_bytes or oom.capacity_bytes
        of = f" usable of {format_bytes(capacity)}" if capacity is not None and capacity != oom.has_bytes else ""
        text = f"needs {at_least}{format_bytes(oom.needs_bytes)}, has {format_bytes(oom.has_bytes)}{of}"
        short = oom.needs_bytes - oom.has_bytes
        if short > 0:
            return f"{text}, short by {at_least}{format_bytes(short)}"
        return f"{text}, {format_bytes(-short)} to spare"
    if oom.requested_bytes is not None and oom.free_bytes is not None:
        # Only the error's own figures: the failing request against what was free.
        text = f"needs {format_bytes(oom.requested_bytes)} more, has {format_bytes(oom.free_bytes)} free"
        short = oom.requested_bytes - oom.free_bytes
        return f"{text}, short by {format_bytes(short)}" if short > 0 else text
    return ""


def _failure(report: Report) -> str:
    """ "OutOfMemoryError allocating 128.00 MiB": the exception type and the failing request."""
    oom = report.oom
    if oom is None:
        return ""
    if oom.requested_bytes is None:
        return oom.exception_type
    return f"{oom.exception_type} allocating {format_bytes(oom.requested_bytes)}"


def _recovered(report: Report) -> str:
    text = f"recovered {format_bytes(report.recovered_bytes)}"
    if report.released_names:
        text += " (rolled back: " + ", ".join(report.released_names) + ")"
    return text + f"; allocated now {format_bytes(report.end_bytes)}; the kernel is fine"


def _figures(report: Report) -> list[tuple[str, str]]:
    """(label, figure) of the cell, in the order every rendering shows them."""
    cap = report.device.capacity_bytes
    rows = [
        ("baseline", format_bytes(report.baseline_bytes)),
        ("end", format_bytes(report.end_bytes)),
        ("delta", format_bytes(report.delta_bytes, signed=True)),
        ("peak", format_bytes(report.peak_bytes)),
        ("reserved", format_bytes(report.reserved_bytes)),
        ("capacity", format_bytes(cap) if cap is not None else "no limit"),
        ("free now", format_bytes(report.free_bytes) if report.free_bytes is not None else "unknown"),
        ("duration", f"{report.duration_s:.3f} s"),
    ]
    if report.batch_var is not None:
        rows.append((str(report.batch_var["name"]), repr(report.batch_var["value"])))
    return rows


def _saves(saves_bytes: int | None) -> str:
    return f"saves {format_bytes(saves_bytes)}" if saves_bytes else "saving unknown"


def _oom_lines(report: Report, head: str, indent: str) -> list[str]:
    """``head`` with the story, then why and what recovery did: the OOM in the text renderings."""
    told = story(report)
    lines = [head + (f": {told}" if told else "")]
    if report.oom is not None and report.oom.diagnosis:
        lines.append(f"{indent}why: {report.oom.diagnosis}")
    lines.append(indent + _recovered(report))
    return lines


def to_text(report: Report) -> str:
    lines = [f"oomnb · cell {report.cell if report.cell is not None else '-'} · {report.device_label()}"]
    if report.dry_run:
        lines[0] += " · DRY RUN (not executed; figures from fake tensors)"
    lines.append("  " + " · ".join(f"{label} {value}" for label, value in _figures(report)))
    oom = report.oom
    if oom is not None:
        lines.extend(_oom_lines(report, f"  OUT OF MEMORY ({_failure(report)})", "    "))
        if not story(report) and oom.message.strip():
            # No figures to tell: the error's own words (the HTML keeps them one click away).
            lines.append("    error message: " + oom.message.strip().splitlines()[0][:300])
    lines.extend(f"  note: {note}" for note in report.notes)
    for number, suggestion in enumerate(report.suggestions, 1):
        fit = f"; {_FIT[suggestion.fits]}" if suggestion.fits is not None else ""
        lines.append(
            f"  {number}. {suggestion.title} [{suggestion.kind}; {_saves(suggestion.saves_bytes)}; "
            f"{suggestion.source}{fit}]"
        )
        if suggestion.code:
            lines.append(f"     {suggestion.how}")
            lines.extend(f"       {code_line}" for code_line in suggestion.code.splitlines())
    return "\n".join(lines)


def compact_text(report: Report) -> str:
    """What auto mode prints under a cell: the headline, and for an OOM its story and the suggestions' titles."""
    lines = [headline(report)]
    if report.oom is not None:
        lines.extend(_oom_lines(report, f"  {_failure(report)}", "  "))
        for number, suggestion in enumerate(report.suggestions, 1):
            fit = f"; {_FIT[suggestion.fits]}" if suggestion.fits is not None else ""
            lines.append(f"  {number}. {suggestion.title} [{_saves(suggestion.saves_bytes)}{fit}]")
    return "\n".join(lines)


def _oom_html(report: Report) -> str:
    esc = html.escape
    oom = report.oom
    if oom is None:
        return ""
    told = story(report)
    return (
        f"<div style='margin-top:6px;padding:4px 6px;background:{_OOM_BG};border-left:3px solid {_RED}'>"
        f"<b>Out of memory</b> ({esc(_failure(report))})"
        + (f": <b class='oomnb-story'>{esc(told)}</b>" if told else "")
        + (f"<br>{esc(oom.diagnosis)}" if oom.diagnosis else "")
        + f"<br><span style='{_MUTED}'>{esc(_recovered(report))}.</span>"
        "<details><summary style='cursor:pointer'>error message</summary>"
        f"<pre style='white-space:pre-wrap;font-family:{_MONO};margin:2px 0'>{esc(oom.message)}</pre>"
        "</details></div>"
    )


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
    cells = "".join(
        f"<td style='padding:0 10px 0 0'><span style='{_MUTED}'>{esc(k)}</span><br><b>{esc(v)}</b></td>"
        for k, v in _figures(report)
    )
    bar = (
        f"<div style='position:relative;height:10px;background:{_TRACK};border-radius:3px;margin:6px 0'>"
        f"<div title='peak' style='position:absolute;height:10px;width:{pct(report.peak_bytes)};"
        f"background:{_PEAK};border-radius:3px'></div>"
        f"<div title='baseline' style='position:absolute;height:10px;width:{pct(report.baseline_bytes)};"
        f"background:{_BASELINE};border-radius:3px'></div>"
    )
    if report.oom is not None and report.oom.requested_bytes:
        bar += (
            f"<div title='failed request' style='position:absolute;left:{pct(report.peak_bytes)};height:10px;"
            f"width:{pct(report.oom.requested_bytes)};background:repeating-linear-gradient(45deg,{_RED},"
            f"{_RED} 3px,transparent 3px,transparent 6px)'></div>"
        )
    if cap is not None:
        bar += (
            f"<div title='capacity' style='position:absolute;left:{pct(cap)};width:2px;height:14px;"
            "top:-2px;background:currentColor'></div>"
        )
    bar += "</div>"
    parts = [
        "<div class='oomnb-report' style='font-family:var(--jp-ui-font-family,sans-serif);font-size:12px;"
        f"border:1px solid {_BORDER};border-radius:6px;padding:6px 10px;max-width:860px'>",
        f"<div><b>GPU memory</b> · cell {esc(str(report.cell if report.cell is not None else '-'))} · "
        f"{esc(report.device.name)} <span style='background:{badge_color};color:white;border-radius:3px;"
        f"padding:0 4px'>{badge}</span>"
        + (" <b>dry run</b> (not executed; figures from fake tensors)" if report.dry_run else "")
        + "</div>",
        bar,
        f"<table style='border-collapse:collapse;color:inherit;background:transparent'><tr>{cells}</tr></table>",
        _oom_html(report),
    ]
    if report.notes:
        parts.append(
            "<ul style='margin:6px 0 0 0;padding-left:20px'>"
            + "".join(f"<li>{esc(note)}</li>" for note in report.notes)
            + "</ul>"
        )
    if report.suggestions:
        items = []
        for suggestion in report.suggestions:
            code = (
                f"<br><span style='{_MUTED}'>{esc(suggestion.how)}</span>"
                f"<pre style='margin:2px 0;background:{_CODE_BG};padding:2px 4px;font-family:{_MONO};"
                f"white-space:pre-wrap;color:inherit'>{esc(suggestion.code)}</pre>"
                if suggestion.code
                else ""
            )
            fit = f"; {_FIT[suggestion.fits]}" if suggestion.fits is not None else ""
            items.append(
                f"<li><b>{esc(suggestion.title)}</b> <span style='{_MUTED}'>[{esc(suggestion.kind)}; "
                f"{esc(_saves(suggestion.saves_bytes))}; {esc(suggestion.source)}{fit}]</span>"
                f"<br>{esc(suggestion.detail)}{code}</li>"
            )
        parts.append(f"<ol style='margin:6px 0 0 0;padding-left:20px'>{''.join(items)}</ol>")
    parts.append("</div>")
    return "".join(parts)


def compact_html(report: Report) -> str:
    """Auto mode's inline HTML: one line, the OOM's story under it, the whole report one click away."""
    esc = html.escape
    line = f"<span style='font-family:{_MONO}'>{esc(headline(report))}</span>"
    if report.oom is None:
        return f"<div class='oomnb-compact' style='font-size:12px'>{line}</div>"
    return (
        f"<details class='oomnb-compact' style='font-size:12px'><summary style='cursor:pointer'>{line}"
        f"<br><b class='oomnb-story'>{esc(_failure(report))}: {esc(story(report))}</b></summary>"
        f"{to_html(report)}</details>"
    )
