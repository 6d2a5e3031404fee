"""The report: plain data, its JSON form, and its text and HTML renderings.

The JSON form is the contract with every frontend (the ipywidgets panel, the
JupyterLab sidebar, ``oomnb profile``).  It is described by
``oomnb/schema/report.schema.json`` and carries ``schema_version``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

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
    #: Of the capacity, what the process holds outside PyTorch's allocator
    #: (the CUDA context, libraries): PyTorch can reserve the rest.
    context_bytes: int = 0


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
    #: The one story every rendering tells, "needs X, has Y, short by Z":
    #: the device total the cell needs at its peak (measured by a dry run of
    #: the whole cell, or, where none ran, the lower bound the failure gives),
    #: and what the device has for it (the figure advice is checked against).
    needs_bytes: int | None = None
    has_bytes: int | None = None
    #: ``needs_bytes`` is a lower bound: the cell failed before its peak.
    needs_at_least: bool = False

    @property
    def short_by_bytes(self) -> int | None:
        """How much more the cell needs than the device has (negative: to spare)."""
        if self.needs_bytes is None or self.has_bytes is None:
            return None
        return self.needs_bytes - self.has_bytes


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

    # -- renderings (oomnb.render) -------------------------------------------
    def device_label(self) -> str:
        from ..render.report import device_label

        return device_label(self)

    def headline(self) -> str:
        """One line: what `%gpumem auto on` prints for a cell."""
        from ..render.report import headline

        return headline(self)

    def to_text(self) -> str:
        from ..render.report import to_text

        return to_text(self)

    def to_html(self) -> str:
        from ..render.report import to_html

        return to_html(self)

    def story(self) -> str:
        """ "needs X, has Y of Z, short by W": the line every rendering tells of an OOM ("" without one)."""
        from ..render.report import story

        return story(self)

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
