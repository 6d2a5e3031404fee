"""The report: plain data, its JSON form, and its text and HTML renderings.

The JSON form is the contract with every frontend (the ipywidgets panel, the
JupyterLab sidebar, ``oomnb profile``).  It is described by
``oomnb/schema/report.schema.json`` and carries ``schema_version``.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from .units import format_bytes

__all__ = [
    "MIME_TYPE",
    "SCHEMA_VERSION",
    "SUGGESTION_KINDS",
    "SUGGESTION_SOURCES",
    "DeviceInfo",
    "OomInfo",
    "Report",
    "Suggestion",
    "load_schema",
]

SCHEMA_VERSION = 1
MIME_TYPE = "application/vnd.oomnb.report+json"

#: The fixed vocabulary of suggestion kinds (also in the JSON Schema).
SUGGESTION_KINDS = (
    "batch_size",
    "mixed_precision",
    "gradient_checkpointing",
    "gradient_accumulation",
    "free_references",
    "no_grad",
    "clear_output_cache",
    "clear_traceback",
    "expandable_segments",
    "quantization",
    "optimizer",
    "input_size",
    "sharding",
    "device_map",
    "combination",
)
#: How a suggestion's saving was obtained.
SUGGESTION_SOURCES = ("dry-run", "measured", "rule")
#: How a suggestion's code is applied: it is the cell, changed (run it instead
#: of the cell); it runs once, then the cell runs again unchanged; or it
#: changes the set-up (environment, install, model loading) and needs a restart.
SUGGESTION_APPLIES = ("replace_cell", "run_first", "setup")
_APPLY_WORDS = {
    "replace_cell": "instead of the cell:",
    "run_first": "run once, then the cell again:",
    "setup": "in the set-up (a restart or a new install):",
}


@dataclass
class DeviceInfo:
    """Which device a report is about."""

    kind: str  # "cuda" or "simulated"
    name: str
    index: int
    capacity_bytes: int | None
    card: str | None = None


@dataclass
class OomInfo:
    """What an out-of-memory error said, plus oomnb's first reading of it."""

    requested_bytes: int | None
    free_bytes: int | None
    capacity_bytes: int | None
    message: str
    over_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_unallocated_bytes: int | None = None
    exception_type: str = "OutOfMemoryError"
    diagnosis: str = ""
    #: Memory in use on the GPU by other processes (CUDA messages only).
    other_processes_bytes: int | None = None


@dataclass
class Suggestion:
    """One change that would make the cell fit, with what it saves."""

    kind: str
    title: str
    detail: str
    saves_bytes: int | None
    params: dict[str, Any] = field(default_factory=dict)
    code: str = ""
    source: str = "rule"
    #: Whether this change alone makes the cell fit (from its own dry run or
    #: measurement); None where that is unknown.
    fits: bool | None = None
    #: How ``code`` is applied (one of SUGGESTION_APPLIES).
    apply: str = "run_first"

    def __post_init__(self) -> None:
        if self.kind not in SUGGESTION_KINDS:
            raise ValueError(f"unknown suggestion kind {self.kind!r}")
        if self.source not in SUGGESTION_SOURCES:
            raise ValueError(f"unknown suggestion source {self.source!r}")
        if self.apply not in SUGGESTION_APPLIES:
            raise ValueError(f"unknown way to apply a suggestion {self.apply!r}")

    @property
    def how(self) -> str:
        """Where the code goes, in a few words."""
        return _APPLY_WORDS[self.apply]


@dataclass
class Report:
    """Memory of one measured cell.  All figures are bytes.

    ``peak_bytes`` is the highest allocated figure reached while the cell ran
    (absolute, like ``torch.cuda.max_memory_allocated``); ``delta_bytes`` is
    ``end_bytes - baseline_bytes``.
    """

    cell: int | None
    device: DeviceInfo
    baseline_bytes: int
    end_bytes: int
    peak_bytes: int
    reserved_bytes: int
    duration_s: float
    free_bytes: int | None = None
    batch_var: dict[str, Any] | None = None
    oom: OomInfo | None = None
    recovered_bytes: int = 0
    released_names: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    source: str = ""
    dry_run: bool = False
    #: One line each: what a failed cell left changed in place, and any step
    #: of oomnb's own handling that failed (the rest of the report stands).
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def delta_bytes(self) -> int:
        return self.end_bytes - self.baseline_bytes

    @property
    def simulated(self) -> bool:
        return self.device.kind == "simulated"

    # -- JSON ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["delta_bytes"] = self.delta_bytes
        order = [
            "schema_version",
            "cell",
            "source",
            "device",
            "baseline_bytes",
            "end_bytes",
            "delta_bytes",
            "peak_bytes",
            "reserved_bytes",
            "free_bytes",
            "duration_s",
            "batch_var",
            "oom",
            "recovered_bytes",
            "released_names",
            "suggestions",
            "dry_run",
            "notes",
        ]
        return {key: data[key] for key in order}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from its JSON form (as saved in a notebook)."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {version!r} (this oomnb reads {SCHEMA_VERSION})")
        oom = data.get("oom")
        return cls(
            cell=data.get("cell"),
            device=DeviceInfo(**data["device"]),
            baseline_bytes=data["baseline_bytes"],
            end_bytes=data["end_bytes"],
            peak_bytes=data["peak_bytes"],
            reserved_bytes=data["reserved_bytes"],
            duration_s=data["duration_s"],
            free_bytes=data.get("free_bytes"),
            batch_var=data.get("batch_var"),
            oom=OomInfo(**oom) if oom else None,
            recovered_bytes=data.get("recovered_bytes", 0),
            released_names=list(data.get("released_names", [])),
            suggestions=[Suggestion(**s) for s in data.get("suggestions", [])],
            source=data.get("source", ""),
            dry_run=bool(data.get("dry_run", False)),
            notes=[str(n) for n in data.get("notes", [])],
        )

    # -- renderings ---------------------------------------------------------
    def device_label(self) -> str:
        capacity = self.device.capacity_bytes
        cap = f"{format_bytes(capacity)}" if capacity is not None else "no limit"
        tag = "simulated on the CPU" if self.simulated else "CUDA"
        return f"{self.device.name} ({cap}, {tag})"

    def headline(self) -> str:
        """One line: what `%gpumem auto on` prints for a cell."""
        cell = f"[{self.cell}]" if self.cell is not None else "[-]"
        text = (
            f"oomnb {cell} delta {format_bytes(self.delta_bytes, signed=True)}, "
            f"peak {format_bytes(self.peak_bytes)}, {self.duration_s:.2f} s"
            f" ({'simulated' if self.simulated else self.device.name})"
        )
        if self.oom is not None:
            text += " - OUT OF MEMORY"
        return text

    def to_text(self) -> str:
        lines = [f"oomnb · cell {self.cell if self.cell is not None else '-'} · {self.device_label()}"]
        if self.dry_run:
            lines[0] += " · DRY RUN (not executed; figures from fake tensors)"
        free = f" · free {format_bytes(self.free_bytes)}" if self.free_bytes is not None else ""
        lines.append(
            f"  baseline {format_bytes(self.baseline_bytes)} → end {format_bytes(self.end_bytes)}"
            f" (delta {format_bytes(self.delta_bytes, signed=True)}) · peak {format_bytes(self.peak_bytes)}"
            f" · reserved {format_bytes(self.reserved_bytes)}{free} · {self.duration_s:.3f} s"
        )
        if self.batch_var is not None:
            lines.append(f"  {self.batch_var['name']} = {self.batch_var['value']!r}")
        if self.oom is not None:
            lines.extend(self._oom_text())
        lines.extend(f"  note: {note}" for note in self.notes)
        for number, suggestion in enumerate(self.suggestions, 1):
            saves = f"saves {format_bytes(suggestion.saves_bytes)}" if suggestion.saves_bytes else "saving unknown"
            fit = {True: "; fits", False: "; not enough alone", None: ""}[suggestion.fits]
            lines.append(f"  {number}. {suggestion.title} [{suggestion.kind}; {saves}; {suggestion.source}{fit}]")
            if suggestion.code:
                lines.append(f"     {suggestion.how}")
                lines.extend(f"       {code_line}" for code_line in suggestion.code.splitlines())
        return "\n".join(lines)

    def _oom_figures(self) -> list[tuple[str, str]]:
        """(label, figure) of the error: requested, free, over by; what is known of them."""
        oom = self.oom
        if oom is None:
            return []
        pairs = [("requested", oom.requested_bytes), ("free", oom.free_bytes), ("over by", oom.over_bytes)]
        return [(label, format_bytes(value)) for label, value in pairs if value is not None]

    def _oom_text(self) -> list[str]:
        oom = self.oom
        if oom is None:
            return []
        lines = ["  OUT OF MEMORY: " + oom.exception_type]
        figures = [f"{label} {value}" for label, value in self._oom_figures()]
        if figures:
            lines.append("    " + ", ".join(figures))
        if oom.diagnosis:
            lines.append("    why: " + oom.diagnosis)
        recovered = f"    recovered {format_bytes(self.recovered_bytes)}"
        if self.released_names:
            recovered += " (rolled back: " + ", ".join(self.released_names) + ")"
        lines.append(recovered + f"; allocated now {format_bytes(self.end_bytes)}")
        return lines

    def to_html(self) -> str:
        esc = html.escape
        cap = self.device.capacity_bytes
        scale = max(v for v in (cap, self.peak_bytes, self.baseline_bytes, 1) if v is not None)
        if self.oom is not None and self.oom.requested_bytes:
            scale = max(scale, self.end_bytes + self.oom.requested_bytes, self.peak_bytes + self.oom.requested_bytes)

        def pct(value: int) -> str:
            return f"{100.0 * value / scale:.2f}%"

        badge_color = "#b45309" if self.simulated else "#15803d"
        badge = "simulated" if self.simulated else "CUDA"
        rows = [
            ("baseline", format_bytes(self.baseline_bytes)),
            ("end", format_bytes(self.end_bytes)),
            ("delta", format_bytes(self.delta_bytes, signed=True)),
            ("peak", format_bytes(self.peak_bytes)),
            ("reserved", format_bytes(self.reserved_bytes)),
            ("capacity", format_bytes(cap) if cap is not None else "no limit"),
            ("free", format_bytes(self.free_bytes) if self.free_bytes is not None else "unknown"),
            ("duration", f"{self.duration_s:.3f} s"),
        ]
        if self.batch_var is not None:
            rows.append((str(self.batch_var["name"]), repr(self.batch_var["value"])))
        cells = "".join(
            f"<td style='padding:0 10px 0 0'><span style='color:#6b7280'>{esc(k)}</span><br><b>{esc(v)}</b></td>"
            for k, v in rows
        )
        bar = (
            "<div style='position:relative;height:10px;background:#e5e7eb;border-radius:3px;margin:6px 0'>"
            f"<div title='peak' style='position:absolute;height:10px;width:{pct(self.peak_bytes)};"
            "background:#93c5fd;border-radius:3px'></div>"
            f"<div title='baseline' style='position:absolute;height:10px;width:{pct(self.baseline_bytes)};"
            "background:#2563eb;border-radius:3px'></div>"
        )
        if self.oom is not None and self.oom.requested_bytes:
            bar += (
                f"<div title='failed request' style='position:absolute;left:{pct(self.peak_bytes)};height:10px;"
                f"width:{pct(self.oom.requested_bytes)};background:repeating-linear-gradient(45deg,#dc2626,"
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
            f"<div><b>GPU memory</b> · cell {esc(str(self.cell if self.cell is not None else '-'))} · "
            f"{esc(self.device.name)} <span style='background:{badge_color};color:white;border-radius:3px;"
            f"padding:0 4px'>{badge}</span>"
            + (" <b>dry run</b> (not executed; figures from fake tensors)" if self.dry_run else "")
            + "</div>",
            bar,
            f"<table style='border-collapse:collapse'><tr>{cells}</tr></table>",
        ]
        if self.oom is not None:
            oom = self.oom
            figures = [f"{label} <b>{esc(value)}</b>" for label, value in self._oom_figures()]
            recovered = f"recovered {esc(format_bytes(self.recovered_bytes))}"
            if self.released_names:
                recovered += " (rolled back: " + esc(", ".join(self.released_names)) + ")"
            parts.append(
                "<div style='margin-top:6px;padding:4px 6px;background:#fef2f2;border-left:3px solid #dc2626'>"
                f"<b>Out of memory</b> ({esc(oom.exception_type)}): {', '.join(figures)}<br>"
                f"{esc(oom.diagnosis)}<br><span style='color:#6b7280'>{recovered}; the kernel is fine.</span>"
                f"<details><summary>message</summary><pre style='white-space:pre-wrap'>{esc(oom.message)}</pre>"
                "</details></div>"
            )
        if self.notes:
            parts.append(
                "<ul style='margin:6px 0 0 0;padding-left:20px'>"
                + "".join(f"<li>{esc(note)}</li>" for note in self.notes)
                + "</ul>"
            )
        if self.suggestions:
            items = []
            for suggestion in self.suggestions:
                saves = (
                    f"saves {esc(format_bytes(suggestion.saves_bytes))}" if suggestion.saves_bytes else "saving unknown"
                )
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

    def mime_bundle(self) -> dict[str, Any]:
        """The display bundle: text, HTML and the JSON every frontend reads."""
        return {"text/plain": self.to_text(), "text/html": self.to_html(), MIME_TYPE: self.to_dict()}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.mime_bundle()


def load_schema() -> dict[str, Any]:
    """The report's JSON Schema, as shipped in the package."""
    text = resources.files("oomnb").joinpath("schema/report.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
