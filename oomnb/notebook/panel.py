"""The cleanup panel: what the notebook holds, biggest first, freed in one click.

Stock ipywidgets and matplotlib only.  Every figure shown is measured: the
census for what is held, the backend for what is allocated, and each action's
"freed" figure is allocated-before minus allocated-after with garbage
collected.  Names and keys are shown as text, never as HTML.
"""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as widgets

from ..analysis.census import Census, TensorRecord
from ..backends import Backend
from ..model.units import format_bytes
from .cleanup import ActionResult, Cleaner

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
    cap = format_bytes(capacity) if capacity is not None else "no limit"
    return (
        "<div style='font-size:12px'>"
        f"<b>{html.escape(backend.name)}</b> ({kind}) · allocated <b>{format_bytes(snap.allocated_bytes)}</b>"
        f" · reserved {format_bytes(snap.reserved_bytes)} · capacity {cap}"
        "<div style='position:relative;height:12px;background:#e5e7eb;border-radius:3px;margin:3px 0 6px 0'>"
        f"<div style='position:absolute;height:12px;width:{width(snap.reserved_bytes)};background:#bfdbfe'></div>"
        f"<div style='position:absolute;height:12px;width:{width(snap.allocated_bytes)};background:#2563eb'></div>"
        "</div></div>"
    )


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

        self.device_bar = widgets.HTML()
        self.summary = widgets.HTML()
        self.filter = widgets.Text(placeholder="filter by name, holder, dtype", description="Filter")
        self.sort = widgets.Dropdown(options=list(_SORTS), value="size", description="Sort by")
        self.grouped = widgets.Checkbox(value=True, description="group by variable", indent=False)
        self.rows = widgets.SelectMultiple(options=[], rows=12, layout=widgets.Layout(width="100%"))
        self.details = widgets.HTML()
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="640px"))
        self.result = widgets.HTML()

        def button(label: str, tip: str, handler: Any, style: str = "") -> widgets.Button:
            b = widgets.Button(description=label, tooltip=tip, button_style=style)
            b.on_click(lambda _b: handler())
            return b

        self.delete = button("del selected", "del the selected variables from the namespace", self._delete, "danger")
        self.detach = button("detach graph", "x = x.detach() for tensors that keep an autograd graph", self._detach)
        self.free_grads = button("free gradients", "zero_grad(set_to_none=True) on selected modules", self._grads)
        self.to_host = button("move to CPU", "move the selected tensors or modules to host memory", self._to_host)
        self.clear_out = button("clear Out cache", "empty Out, _, __, ___ and _N", self._clear_out)
        self.clear_tb = button("clear traceback", "drop sys.last_traceback and what its frames hold", self._clear_tb)
        self.collect = button("gc + empty_cache", "gc.collect() and torch.cuda.empty_cache()", self._collect)
        self.refresh = button("refresh", "take the census again", self.update, "info")

        self.filter.observe(lambda _c: self._fill_rows(), names="value")
        self.sort.observe(lambda _c: self._fill_rows(), names="value")
        self.grouped.observe(lambda _c: self._fill_rows(), names="value")
        self.rows.observe(lambda _c: self._show_details(), names="value")

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
        self.device_bar.value = _bars_html(self.backend)
        census = self.census
        unreachable = census.unreachable_bytes
        self.summary.value = (
            f"<span style='font-size:12px'>{len(census.records)} storages reachable from the notebook: "
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
        options: list[tuple[str, str]] = []
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
                label = f"{format_bytes(total):>11}  {root}  ({len(members)} tensors: {', '.join(holders)})"
                options.append((label, root))
        else:
            options = [(_row_label(r), r.root) for r in records]
        # SelectMultiple needs unique labels.
        seen: set[str] = set()
        unique = []
        for label, value in options:
            while label in seen:
                label += " "
            seen.add(label)
            unique.append((label, value))
        self.rows.options = unique
        self._show_details()

    def selected_roots(self) -> list[str]:
        return list(dict.fromkeys(self.rows.value))

    def _show_details(self) -> None:
        chosen = set(self.selected_roots())
        records = [r for r in self.visible_records() if r.root in chosen] if chosen else []
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
        from matplotlib.figure import Figure

        sizes = list(self.census.root_bytes().items())[: self.top]
        if not sizes:
            self.chart.value = b""
            self.chart.layout.display = "none"
            return
        self.chart.layout.display = None
        figure = Figure(figsize=(7, 0.3 * len(sizes) + 0.8))
        axes = figure.subplots()
        names = [name for name, _ in sizes][::-1]
        values = [value / 2**20 for _, value in sizes][::-1]
        axes.barh(names, values, color="#2563eb")
        axes.set_xlabel("MiB")
        axes.set_title("Biggest holders", fontsize=10)
        for spine in ("top", "right"):
            axes.spines[spine].set_visible(False)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        self.chart.value = buffer.getvalue()

    # -- actions ------------------------------------------------------------------------
    def _after(self, result: ActionResult) -> ActionResult:
        self.last_result = result
        color = "#15803d" if result.freed_bytes else "#92400e"
        self.result.value = f"<span style='color:{color};font-size:12px'>{html.escape(result.summary())}</span>"
        self.update()
        return result

    def _delete(self) -> ActionResult:
        return self._after(self.cleaner.delete(self.selected_roots()))

    def _detach(self) -> ActionResult:
        return self._after(self.cleaner.detach(self.selected_roots()))

    def _grads(self) -> ActionResult:
        return self._after(self.cleaner.free_gradients(self.selected_roots()))

    def _to_host(self) -> ActionResult:
        return self._after(self.cleaner.move_to_host(self.selected_roots()))

    def _clear_out(self) -> ActionResult:
        return self._after(self.cleaner.clear_output_cache())

    def _clear_tb(self) -> ActionResult:
        return self._after(self.cleaner.clear_traceback())

    def _collect(self) -> ActionResult:
        return self._after(self.cleaner.collect())
