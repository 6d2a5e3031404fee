"""The cleanup panel: what the notebook holds, biggest first, freed in one click.

Stock ipywidgets and matplotlib only.  Every figure shown is measured: the
census for what is held, the backend for what is allocated, and each action's
"freed" figure is allocated-before minus allocated-after with garbage
collected.  Names and keys are shown as text, never as HTML.

Nothing the user owns changes unless they chose it: each row carries exactly
the name or path it shows, an action acts on exactly the selected rows (and
only when it applies to every one of them), and a name rebound since the
panel was drawn is left alone.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import ipywidgets as widgets
import torch

from ..analysis.census import Census, TensorRecord
from ..backends import Backend
from ..model.units import format_bytes
from .cleanup import ActionResult, Cleaner, Held, root_kind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MemoryPanel"]

_SORTS = {
    "size": lambda r: -r.nbytes,
    "path": lambda r: r.path,
    "holder": lambda r: (r.holder, -r.nbytes),
    "device": lambda r: (r.device, -r.nbytes),
    "graph": lambda r: -r.graph_bytes,
}


def _bars_html(backend: Backend) -> str:
    """One bar per device: every CUDA device the process has started, or the simulated one."""
    if backend.kind != "cuda":
        return _bar_html(backend)
    import torch

    from ..backends.cuda import CudaBackend

    count = torch.cuda.device_count() if torch.cuda.is_initialized() else 1
    others = [i for i in range(count) if i != backend.index and torch.cuda.memory_reserved(i) > 0]
    return "".join([_bar_html(backend), *(_bar_html(CudaBackend(i)) for i in others)])


def _bar_html(backend: Backend) -> str:
    snap = backend.snapshot()
    capacity = snap.capacity_bytes
    scale = max(capacity or 0, snap.reserved_bytes, snap.allocated_bytes, 1)

    def width(value: int) -> str:
        return f"{100.0 * value / scale:.2f}%"

    kind = "simulated on the CPU" if backend.kind == "simulated" else "CUDA"
    head = (
        "<div style='font-size:12px'>"
        f"<b>{html.escape(backend.name)}</b> ({kind}) · allocated <b>{format_bytes(snap.allocated_bytes)}</b>"
        f" · reserved {format_bytes(snap.reserved_bytes)}"
    )
    if capacity is None:
        # Nothing to fill: a bar would be drawn full whatever the figures.
        return head + " · no limit (<code>%gpumem limit T4</code> simulates a card)</div>"
    return (
        head + f" · capacity {format_bytes(capacity)}"
        "<div style='position:relative;height:12px;background:rgba(128,128,128,0.25);border-radius:3px;"
        "margin:3px 0 6px 0'>"
        f"<div style='position:absolute;height:12px;width:{width(snap.reserved_bytes)};background:#93c5fd'></div>"
        f"<div style='position:absolute;height:12px;width:{width(snap.allocated_bytes)};background:#2563eb'></div>"
        "</div></div>"
    )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _chart_figure(sizes: list[tuple[str, int]]) -> Figure:
    """Bars of the biggest roots, labelled with their names as literal text."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 0.3 * len(sizes) + 0.8))
    axes = figure.subplots()
    names = [name for name, _ in sizes][::-1]
    values = [value / 2**20 for _, value in sizes][::-1]
    # Numeric positions and explicit labels: a name is text, never mathtext
    # ("loss$_$1" would not parse) nor TeX (a user's rcParams may turn usetex on).
    axes.barh(range(len(names)), values, color="#2563eb")
    axes.set_yticks(range(len(names)), labels=names, parse_math=False, usetex=False)
    axes.set_xlabel("MiB", parse_math=False, usetex=False)
    axes.set_title("Biggest holders", fontsize=10, parse_math=False, usetex=False)
    for spine in ("top", "right"):
        axes.spines[spine].set_visible(False)
    figure.tight_layout()
    return figure


Action = Literal["delete", "detach", "free_grads", "to_host"]
_ACTION_LABELS: dict[Action, str] = {
    "delete": "del",
    "detach": "detach",
    "free_grads": "free gradients",
    "to_host": "move to CPU",
}


@dataclass(frozen=True)
class _Row:
    """One row of the list: ``value`` is exactly what it shows (a root name for a
    group, a record's path otherwise) and all an action may act on."""

    value: str
    root: str
    records: tuple[TensorRecord, ...]
    group: bool

    @property
    def is_root(self) -> bool:
        """Whether the row is a whole root (a variable, ``Out[n]``...), not a part of one."""
        return self.group or self.value == self.root


def _row_label(record: TensorRecord) -> str:
    shape = "×".join(str(d) for d in record.shape) or "scalar"
    graph = f" +graph {format_bytes(record.graph_bytes)}" if record.graph_bytes else ""
    return f"{format_bytes(record.nbytes):>11}  {record.path}  [{record.holder}, {shape} {record.dtype}]{graph}"


class MemoryPanel:
    """The census as a panel of stock widgets, with cleanup actions.

    ``panel.widget`` is the box to display; ``panel.cleaner`` runs the same
    actions without widgets.  Buttons: ``delete``, ``detach``, ``free_grads``,
    ``to_host``, ``clear_out``, ``clear_tb``, ``collect``, ``refresh``.
    """

    def __init__(self, shell: Any, backend: Backend, top: int = 12) -> None:
        self.cleaner = Cleaner(shell, backend)
        self.backend = backend
        self.top = top
        self.census = Census(records=[], bytes_by_device={})
        self.last_result: ActionResult | None = None
        #: What each root held when the panel was drawn (checked before acting).
        self.drawn: dict[str, Held] = {}
        self._rows: dict[str, _Row] = {}

        self.device_bar = widgets.HTML()
        self.summary = widgets.HTML()
        self.filter = widgets.Text(placeholder="filter by name, holder, dtype", description="Filter")
        self.sort = widgets.Dropdown(options=list(_SORTS), value="size", description="Sort by")
        self.grouped = widgets.Checkbox(value=True, description="group by variable", indent=False)
        self.rows = widgets.SelectMultiple(options=[], rows=12, layout=widgets.Layout(width="100%"))
        self.details = widgets.HTML()
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="640px"))
        self.chart_status = widgets.HTML()
        self.result = widgets.HTML()
        self._tips: dict[widgets.Button, str] = {}

        def button(label: str, tip: str, handler: Callable[[], Any], style: str = "") -> widgets.Button:
            b = widgets.Button(description=label, tooltip=tip, button_style=style)
            b.on_click(lambda _b: handler())
            self._tips[b] = tip
            return b

        self.delete = button(
            "del selected", "del the selected variables (or forget the selected outputs)", self._delete, "danger"
        )
        self.detach = button("detach graph", "x = x.detach() for tensors that keep an autograd graph", self._detach)
        self.free_grads = button(
            "free gradients", "zero_grad(set_to_none=True) on selected modules, or drop one gradient", self._grads
        )
        self.to_host = button("move to CPU", "move the selected tensors or modules to host memory", self._to_host)
        self._selection_buttons: dict[Action, widgets.Button] = {
            "delete": self.delete,
            "detach": self.detach,
            "free_grads": self.free_grads,
            "to_host": self.to_host,
        }
        self.clear_out = button("clear Out cache", "empty Out, _, __, ___ and _N", self._clear_out)
        self.clear_tb = button("clear traceback", "drop sys.last_traceback and what its frames hold", self._clear_tb)
        self.collect = button("gc + empty_cache", "gc.collect() and torch.cuda.empty_cache()", self._collect)
        self.refresh = button("refresh", "take the census again", self.update, "info")

        self.filter.observe(lambda _c: self._fill_rows(), names="value")
        self.sort.observe(lambda _c: self._fill_rows(), names="value")
        self.grouped.observe(lambda _c: self._fill_rows(), names="value")
        self.rows.observe(lambda _c: self._selection_changed(), names="value")

        self.widget = widgets.VBox(
            [
                self.device_bar,
                self.summary,
                widgets.HBox([self.filter, self.sort, self.grouped]),
                self.rows,
                self.details,
                widgets.HBox([self.delete, self.detach, self.free_grads, self.to_host]),
                widgets.HBox([self.clear_out, self.clear_tb, self.collect, self.refresh]),
                self.result,
                self.chart,
                self.chart_status,
            ]
        )
        self.update()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # -- views ------------------------------------------------------------------------
    def update(self) -> None:
        """Take the census again and redraw everything."""
        self.census = self.cleaner.census()
        # Taken with the census: actions check that each root still holds this.
        self.drawn = self.cleaner.snapshot({r.root for r in self.census.records})
        self.device_bar.value = _bars_html(self.backend)
        census = self.census
        unreachable = census.unreachable_bytes
        self.summary.value = (
            f"<span style='font-size:12px'>{_plural(len(census.records), 'storage')} reachable from the notebook: "
            f"<b>{format_bytes(census.device_bytes)}</b> on {html.escape(str(census.device))}"
            + (
                f" · {format_bytes(unreachable)} allocated but not reachable from the notebook "
                "(closures, C++ caches, other frames)"
                if unreachable
                else ""
            )
            + "</span>"
        )
        self._fill_rows()
        self._draw_chart()

    def visible_records(self) -> list[TensorRecord]:
        needle = self.filter.value.strip().lower()
        records = [
            r
            for r in self.census.records
            if not needle or needle in f"{r.path} {r.holder} {r.dtype} {r.device} {' '.join(r.also_held_by)}".lower()
        ]
        return sorted(records, key=_SORTS[self.sort.value])

    def _fill_rows(self) -> None:
        records = self.visible_records()
        rows: list[tuple[str, _Row]] = []
        if self.grouped.value:
            groups: dict[str, list[TensorRecord]] = {}
            for record in records:
                groups.setdefault(record.root, []).append(record)
            order = sorted(groups.items(), key=lambda item: -sum(r.nbytes for r in item[1]))
            if self.sort.value == "path":
                order = sorted(groups.items())
            for root, members in order:
                total = sum(r.nbytes for r in members)
                holders = sorted({r.holder for r in members})
                label = f"{format_bytes(total):>11}  {root}  ({_plural(len(members), 'tensor')}: {', '.join(holders)})"
                rows.append((label, _Row(root, root, tuple(members), group=True)))
        else:
            by_path: dict[str, list[TensorRecord]] = {}
            for record in records:
                by_path.setdefault(record.path, []).append(record)
            rows.extend((_row_label(r), _Row(r.path, r.root, tuple(by_path[r.path]), group=False)) for r in records)
        self._rows = {row.value: row for _, row in rows}
        # SelectMultiple needs unique labels.
        seen: set[str] = set()
        unique = []
        for label, row in rows:
            while label in seen:
                label += " "
            seen.add(label)
            unique.append((label, row.value))
        self.rows.options = unique
        self._selection_changed()

    def selected(self) -> list[_Row]:
        """The selected rows, each standing for exactly the name or path it shows."""
        return [self._rows[value] for value in dict.fromkeys(self.rows.value) if value in self._rows]

    def _selection_changed(self) -> None:
        self._show_details()
        rows = self.selected()
        for action, button in self._selection_buttons.items():
            refusal = self._refusal(action, rows)
            button.disabled = refusal is not None
            button.tooltip = refusal if refusal is not None else self._tips[button]

    def _refusal(self, action: Action, rows: list[_Row]) -> str | None:
        """Why ``action`` cannot act on the selection, or None when it applies to every row."""
        if not rows:
            return "select a row first"
        for row in rows:
            reason = self._row_refusal(action, row)
            if reason is not None:
                return reason
        return None

    def _row_refusal(self, action: Action, row: _Row) -> str | None:
        kind = root_kind(row.root)
        if not row.is_root:
            gradient = row.value.endswith(".grad") and all(r.holder == "gradient" for r in row.records)
            if action == "free_grads" and gradient and kind == "variable":
                return None
            return f"`{row.value}` is part of `{row.root}`: select the group to act on the variable"
        if action == "delete":
            return None
        if kind != "variable":
            what = "the last error's traceback" if kind == "traceback" else "a cached output"
            return f"`{row.root}` is {what}: only del applies (it forgets it)"
        held = self.drawn.get(row.root)
        value_type: type = held.kind if held is not None else type(None)
        accepts: dict[Action, tuple[tuple[type, ...], str]] = {
            "detach": ((torch.Tensor, list, dict), "a tensor, or a list or dict of tensors"),
            "to_host": ((torch.Tensor, torch.nn.Module), "a tensor or a module"),
            "free_grads": ((torch.nn.Module, torch.optim.Optimizer), "a module, an optimizer or one gradient"),
        }
        types, wanted = accepts[action]
        if not issubclass(value_type, types):
            return f"`{row.root}` ({value_type.__name__}): {_ACTION_LABELS[action]} needs {wanted}"
        return None

    def _show_details(self) -> None:
        records = [r for row in self.selected() for r in row.records]
        if not records:
            self.details.value = "<i style='font-size:12px'>Select variables to see their tensors.</i>"
            return
        head = "".join(
            f"<th style='text-align:left;padding:0 8px'>{h}</th>"
            for h in ("path", "holder", "shape", "dtype", "device", "size", "also held by", "graph")
        )
        body = []
        for r in records[:200]:
            cells = (
                r.path,
                r.holder,
                "×".join(str(d) for d in r.shape) or "scalar",
                r.dtype,
                r.device,
                format_bytes(r.nbytes),
                ", ".join(r.also_held_by[:4]) + (" ..." if len(r.also_held_by) > 4 else ""),
                format_bytes(r.graph_bytes) if r.graph_bytes else "",
            )
            body.append("<tr>" + "".join(f"<td style='padding:0 8px'>{html.escape(c)}</td>" for c in cells) + "</tr>")
        self.details.value = (
            f"<table style='font-size:12px;font-family:monospace'><tr>{head}</tr>{''.join(body)}</table>"
        )

    def _draw_chart(self) -> None:
        sizes = list(self.census.root_bytes().items())[: self.top]
        if not sizes:
            self._hide_chart("")
            return
        try:
            figure = _chart_figure(sizes)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=80)
        except Exception as error:
            # The chart only repeats the list: whatever breaks it (a name,
            # a matplotlib backend or font) must not take the panel with it.
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            self._hide_chart(f"chart not drawn: {type(error).__name__}: {first_line}".rstrip(": "))
            return
        self.chart.value = buffer.getvalue()
        self.chart.layout.display = None
        self.chart_status.value = ""

    def _hide_chart(self, why: str) -> None:
        self.chart.value = b""
        self.chart.layout.display = "none"
        self.chart_status.value = f"<span style='color:#92400e;font-size:12px'>{html.escape(why)}</span>" if why else ""

    # -- actions ------------------------------------------------------------------------
    def _after(self, result: ActionResult) -> ActionResult:
        self.last_result = result
        color = "#15803d" if result.freed_bytes else "#92400e"
        self.result.value = f"<span style='color:{color};font-size:12px'>{html.escape(result.summary())}</span>"
        self.update()
        return result

    def _say(self, line: str) -> None:
        """One line in the result area for an action that did nothing."""
        self.last_result = None
        self.result.value = f"<span style='color:#92400e;font-size:12px'>{html.escape(line)}</span>"

    def _checked(self, action: Action) -> list[_Row] | None:
        """The selection if ``action`` may act on it now; otherwise says why and gives None.

        Buttons that do not apply are disabled, but ``click()`` (or a stale
        front end) still calls the handler: refuse here too, for every row.
        """
        rows = self.selected()
        refusal = self._refusal(action, rows)
        if refusal is not None:
            self._say(f"{_ACTION_LABELS[action]} did nothing: {refusal}")
            return None
        changed = self.cleaner.changed(self.drawn, [row.root for row in rows])
        if changed:
            names = ", ".join(f"`{name}`" for name in changed)
            self.update()
            self._say(f"{names} changed since the panel was drawn and nothing was done; the panel is refreshed")
            return None
        return rows

    def _delete(self) -> ActionResult | None:
        rows = self._checked("delete")
        return None if rows is None else self._after(self.cleaner.delete([row.root for row in rows]))

    def _detach(self) -> ActionResult | None:
        rows = self._checked("detach")
        return None if rows is None else self._after(self.cleaner.detach([row.root for row in rows]))

    def _grads(self) -> ActionResult | None:
        rows = self._checked("free_grads")
        if rows is None:
            return None
        names = [row.root for row in rows if row.is_root]
        gradients = {row.value: row.root for row in rows if not row.is_root}
        return self._after(self.cleaner.free_gradients(names, gradients))

    def _to_host(self) -> ActionResult | None:
        rows = self._checked("to_host")
        return None if rows is None else self._after(self.cleaner.move_to_host([row.root for row in rows]))

    def _clear_out(self) -> ActionResult:
        return self._after(self.cleaner.clear_output_cache())

    def _clear_tb(self) -> ActionResult:
        return self._after(self.cleaner.clear_traceback())

    def _collect(self) -> ActionResult:
        return self._after(self.cleaner.collect())
