"""The cleanup panel, driven by button clicks without a browser."""

from __future__ import annotations

from typing import Any

import oomnb
from oomnb.notebook.panel import MemoryPanel

MiB = 1024**2


def panel_for(shell: Any) -> MemoryPanel:
    panel = oomnb.panel()
    assert isinstance(panel, MemoryPanel)
    return panel


def test_del_of_64_mib_frees_exactly_that(shell: Any) -> None:
    shell.run("big = torch.ones(16 * MiB_)".replace("MiB_", str(MiB)))
    panel = panel_for(shell)
    assert panel.rows.options[0][1] == "big"
    before = shell.allocated()
    panel.rows.value = ("big",)
    panel.delete.click()
    result = panel.last_result
    assert result is not None
    assert result.freed_bytes == 64 * MiB
    assert before - shell.allocated() == 64 * MiB
    assert "big" not in shell.ns
    assert result.still_held_by == []
    assert "freed 64.00 MiB" in panel.result.value
    assert all(value != "big" for _, value in panel.rows.options)


def test_still_held_elsewhere_frees_nothing(shell: Any) -> None:
    shell.run(f"big = torch.ones({16 * MiB})\ncache = {{'x': big}}")
    panel = panel_for(shell)
    panel.rows.value = ("big",)
    panel.delete.click()
    result = panel.last_result
    assert result is not None
    assert result.freed_bytes == 0
    assert result.still_held_by == ["cache['x']"]
    assert "still held by cache[&#x27;x&#x27;]" in panel.result.value
    assert "freed 0 B" in panel.result.value
    panel.rows.value = ("cache",)
    panel.delete.click()
    assert panel.last_result.freed_bytes == 64 * MiB  # type: ignore[union-attr]


def test_clear_output_cache_and_traceback(shell: Any) -> None:
    shell.run(f"torch.zeros({MiB})")  # 4 MiB in Out[n], _ and IPython's hidden _
    shell.run(f"def f():\n    held = torch.ones({MiB // 2})\n    raise ValueError('boom')\nf()")
    panel = panel_for(shell)
    panel.clear_out.click()
    assert panel.last_result.freed_bytes == 4 * MiB  # type: ignore[union-attr]
    panel.clear_tb.click()
    assert panel.last_result.freed_bytes == 2 * MiB  # type: ignore[union-attr]
    panel.clear_tb.click()
    assert "there was no traceback" in panel.result.value


def test_free_gradients_detach_and_move_to_host(shell: Any) -> None:
    shell.run(
        "lin = torch.nn.Linear(512, 512)\n"  # 1 MiB of weights, 2 KiB of bias
        "loss = lin(torch.randn(256, 512)).relu().sum()\n"
        "kept = torch.ones(1024)"
    )
    panel = panel_for(shell)
    panel.rows.value = ("loss",)
    panel.detach.click()
    # the graph held the 256x512 input and the ReLU output: 512 KiB each
    assert panel.last_result.freed_bytes == 2 * 256 * 512 * 4  # type: ignore[union-attr]
    assert shell.ns["loss"].grad_fn is None
    shell.run("lin(torch.randn(4, 512)).sum().backward()")
    panel.update()
    panel.rows.value = ("lin",)
    panel.free_grads.click()
    assert panel.last_result.freed_bytes == 512 * 512 * 4 + 2048  # type: ignore[union-attr]
    assert shell.ns["lin"].weight.grad is None
    panel.rows.value = ("lin",)
    panel.to_host.click()
    assert panel.last_result.freed_bytes == 512 * 512 * 4 + 2048  # type: ignore[union-attr]
    shell.run("y = lin(torch.ones(1, 512))")  # the module still works from the host
    panel.rows.value = ("kept",)
    assert panel.free_grads.disabled  # a tensor has no gradients to zero as a whole
    before = shell.allocated()
    panel.free_grads.click()  # invoked anyway: refused, nothing changes
    assert panel.last_result is None
    assert "free gradients did nothing: `kept` (Tensor)" in panel.result.value
    assert shell.allocated() == before


def test_filter_sort_group_and_escaping(shell: Any) -> None:
    shell.run(
        "cache = {'<img src=x onerror=alert(1)>': torch.ones(4096), 'small': torch.ones(8)}\nalpha = torch.ones(2048)"
    )
    panel = panel_for(shell)
    labels = [label for label, _ in panel.rows.options]
    assert labels[0].strip().startswith("16.50 KiB  cache")
    panel.rows.value = ("cache",)
    assert "&lt;img src=x onerror=alert(1)&gt;" in panel.details.value
    assert "<img" not in panel.details.value
    panel.filter.value = "alpha"
    assert [value for _, value in panel.rows.options] == ["alpha"]
    panel.filter.value = ""
    panel.grouped.value = False
    panel.sort.value = "path"
    paths = [label.split()[2] for label, _ in panel.rows.options]
    assert paths == sorted(paths)
    assert bytes(panel.chart.value).startswith(b"\x89PNG")  # the bar chart was drawn
    assert "simulated" in panel.device_bar.value


def test_line_magic_panel_and_census(shell: Any) -> None:
    shell.run(f"big = torch.ones({MiB})")
    shown = shell.run("%gpumem panel")
    assert shown.success
    text = shell.run("%gpumem census").captured.stdout
    assert "4.00 MiB  big" in text


def rows_by_value(panel: MemoryPanel) -> dict[str, str]:
    return {value: label for label, value in panel.rows.options}


def test_ungrouped_row_acts_on_exactly_its_path(shell: Any) -> None:
    """Defect: selecting `model.bias` in the ungrouped view and clicking del deleted `model`."""
    shell.run("model = torch.nn.Linear(1024, 1)\nt = torch.ones(1024)")  # weight 4096 B, bias 4 B -> 512 B
    panel = panel_for(shell)
    panel.grouped.value = False
    rows = rows_by_value(panel)
    assert set(rows) == {"model.weight", "model.bias", "t"}
    # every row carries the path it shows
    assert all(label.split()[2] == value for value, label in rows.items())
    before = shell.allocated()
    panel.rows.value = ("model.bias",)
    assert [panel.delete.disabled, panel.detach.disabled, panel.free_grads.disabled, panel.to_host.disabled] == [
        True
    ] * 4
    assert "part of `model`" in panel.delete.tooltip
    panel.delete.click()  # invoked anyway
    assert panel.last_result is None
    assert "model" in shell.ns
    assert shell.ns["model"].bias is not None
    assert shell.allocated() == before
    assert panel.result.value == (
        "<span style='color:#92400e;font-size:12px'>del did nothing: `model.bias` is part of `model`: "
        "select the group to act on the variable</span>"
    )
    # a mixed selection is refused as a whole: `t` is not deleted either
    panel.rows.value = ("t", "model.weight")
    assert panel.delete.disabled
    panel.delete.click()
    assert "t" in shell.ns
    assert shell.allocated() == before
    # a top-level tensor row is the variable itself
    panel.rows.value = ("t",)
    assert not panel.delete.disabled
    assert panel.free_grads.disabled
    panel.delete.click()
    assert panel.last_result is not None
    assert panel.last_result.targets == ["t"]
    assert panel.last_result.freed_bytes == 4096
    assert "t" not in shell.ns
    assert "model" in shell.ns


def test_gradient_row_frees_that_one_gradient(shell: Any) -> None:
    shell.run("model = torch.nn.Linear(1024, 1)\nmodel(torch.ones(1024)).sum().backward()")
    panel = panel_for(shell)
    panel.grouped.value = False
    assert {"model.weight.grad", "model.bias.grad"} <= set(rows_by_value(panel))
    panel.rows.value = ("model.weight.grad",)
    assert not panel.free_grads.disabled
    assert panel.delete.disabled
    before = shell.allocated()
    panel.free_grads.click()
    result = panel.last_result
    assert result is not None
    assert result.targets == ["model.weight.grad"]
    assert result.freed_bytes == 4096
    assert before - shell.allocated() == 4096
    assert shell.ns["model"].weight.grad is None
    assert shell.ns["model"].bias.grad is not None  # not selected, not touched
    assert "free gradients of model.weight.grad: freed 4.00 KiB" in panel.result.value


def test_group_rows_offer_only_what_applies(shell: Any) -> None:
    n = shell.run("torch.ones(1024)").execution_count  # (its ExecutionResult would hold the tensor too)
    shell.run(
        "model = torch.nn.Linear(1024, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)\n"
        "model(torch.ones(1024)).sum().backward()\n"
        "opt.step()\n"  # momentum buffers: `opt` holds tensors of its own
        "pairs = (torch.ones(1024), torch.ones(1024))"
    )
    panel = panel_for(shell)

    def offered(value: str) -> list[str]:
        panel.rows.value = (value,)
        buttons = {"del": panel.delete, "detach": panel.detach, "grads": panel.free_grads, "cpu": panel.to_host}
        return [name for name, button in buttons.items() if not button.disabled]

    assert offered("model") == ["del", "grads", "cpu"]
    assert offered("opt") == ["del", "grads"]
    assert offered(f"Out[{n}]") == ["del"]
    assert offered("pairs") == ["del"]  # a tuple cannot be detached in place
    shell.run("def f():\n    held = torch.ones(1024)\n    raise ValueError('boom')\nf()")
    panel.update()
    assert offered("<traceback>") == ["del"]  # del clears the traceback
    panel.grouped.value = False
    assert offered("<traceback> f().held") == []
    assert offered("pairs[0]") == []
    panel.grouped.value = True
    panel.rows.value = ()
    assert panel.delete.disabled
    panel.delete.click()
    assert "del did nothing: select a row first" in panel.result.value
    panel.rows.value = (f"Out[{n}]",)
    panel.delete.click()  # forgets Out[n] and the `_` aliases
    assert panel.last_result is not None
    assert panel.last_result.freed_bytes == 4096
    assert n not in shell.ns["Out"]


def test_rebound_name_is_left_alone(shell: Any) -> None:
    """Defect: a panel drawn before `x` was rebound deleted what `x` holds now."""
    shell.run("x = torch.ones(1024)\nxs = [torch.ones(1024)]")
    panel = panel_for(shell)
    shell.run("x = torch.ones(2048)")  # rebound after the panel was drawn
    before = shell.allocated()
    panel.rows.value = ("x",)
    panel.delete.click()
    assert panel.last_result is None
    assert shell.ns["x"].numel() == 2048
    assert shell.allocated() == before
    assert panel.result.value == (
        "<span style='color:#92400e;font-size:12px'>`x` changed since the panel was drawn and nothing was done;"
        " the panel is refreshed</span>"
    )
    assert rows_by_value(panel)["x"].split()[:3] == ["8.00", "KiB", "x"]  # the refreshed panel shows the new `x`
    # what the refreshed panel shows can be deleted
    panel.rows.value = ("x",)
    panel.delete.click()
    assert panel.last_result is not None
    assert panel.last_result.freed_bytes == 8192
    # a list cannot be weakly referenced: its identity is kept by id and type
    shell.run("xs = [torch.ones(1024)]")
    panel.rows.value = ("xs",)
    panel.detach.click()
    assert panel.last_result is None
    assert "`xs` changed since the panel was drawn" in panel.result.value
    # a name deleted since the panel was drawn
    shell.run("del xs")
    panel.rows.value = ("xs",)
    panel.delete.click()
    assert panel.last_result is None
    assert "`xs` changed since the panel was drawn and nothing was done" in panel.result.value
    assert "xs" not in rows_by_value(panel)


def test_names_with_dollars_are_drawn_as_text(shell: Any) -> None:
    """Defect: a name with `$...$` crashed the chart (matplotlib parsed it as mathtext)."""
    shell.run("globals()['cost$a$'] = torch.ones(1024)\nglobals()['loss$_$1'] = torch.ones(2048)")
    panel = panel_for(shell)
    assert bytes(panel.chart.value).startswith(b"\x89PNG")
    assert panel.chart_status.value == ""
    rows = rows_by_value(panel)
    assert rows["loss$_$1"].split()[:3] == ["8.00", "KiB", "loss$_$1"]
    assert rows["cost$a$"].split()[:3] == ["4.00", "KiB", "cost$a$"]
    from oomnb.notebook.panel import _chart_figure

    figure = _chart_figure([("loss$_$1", 8192), ("cost$a$", 4096)])
    labels = figure.axes[0].get_yticklabels()
    # literal text: no mathtext, no TeX, "$" kept as typed
    assert [(t.get_text(), t.get_parse_math(), t.get_usetex()) for t in labels] == [
        ("cost$a$", False, False),
        ("loss$_$1", False, False),
    ]


def test_chart_failure_does_not_break_the_panel(shell: Any, monkeypatch: Any) -> None:
    import oomnb.notebook.panel as panel_module

    def broken(sizes: list[tuple[str, int]]) -> Any:
        raise RuntimeError("no usable font\nsecond line")

    monkeypatch.setattr(panel_module, "_chart_figure", broken)
    shell.run("t = torch.ones(1024)")
    panel = panel_for(shell)
    assert panel.chart.layout.display == "none"
    assert panel.chart_status.value == (
        "<span style='color:#92400e;font-size:12px'>chart not drawn: RuntimeError: no usable font</span>"
    )
    panel.rows.value = ("t",)
    panel.delete.click()  # the panel still works
    assert panel.last_result is not None
    assert panel.last_result.freed_bytes == 4096


def test_del_model_names_the_optimizer_that_still_holds_it(shell: Any) -> None:
    """Defect: with `opt` still holding the parameters, `del model` did not say who holds them."""
    shell.run(
        "model = torch.nn.Linear(1024, 1)\n"  # weight 4096 B, bias -> 512 B
        "opt = torch.optim.AdamW(model.parameters())\n"
        "model(torch.ones(1024)).sum().backward()\n"
        "opt.step()"
    )
    panel = panel_for(shell)
    panel.rows.value = ("model",)
    panel.delete.click()
    result = panel.last_result
    assert result is not None
    assert "model" not in shell.ns
    assert result.freed_bytes == 0
    assert result.still_held_by == [
        "opt.param_groups[0]['params'][0]",
        "opt.param_groups[0]['params'][0].grad",
        "opt.param_groups[0]['params'][1]",
        "opt.param_groups[0]['params'][1].grad",
    ]
    assert "freed 0 B; still held by opt.param_groups[0][&#x27;params&#x27;][0]" in panel.result.value
    # the refreshed panel shows the parameters under `opt`
    panel.rows.value = ("opt",)
    by_path = {r.path: r for r in panel.census.records if r.root == "opt"}
    assert by_path["opt.param_groups[0]['params'][0]"].holder == "optimizer_param"
    assert by_path["opt.param_groups[0]['params'][0]"].nbytes == 4096
    assert by_path["opt.param_groups[0]['params'][1].grad"].nbytes == 512


def test_counts_are_singular_or_plural(shell: Any) -> None:
    shell.run("t = torch.ones(1024)")
    panel = panel_for(shell)
    assert rows_by_value(panel)["t"].strip() == "4.00 KiB  t  (1 tensor: variable)"
    assert "1 storage reachable" in panel.summary.value
    shell.run("model = torch.nn.Linear(1024, 1)")
    panel.update()
    assert rows_by_value(panel)["model"].strip() == "4.50 KiB  model  (2 tensors: parameter)"
    assert "3 storages reachable" in panel.summary.value


def test_device_bar_is_drawn_only_against_a_limit(shell: Any) -> None:
    """With no limit there is nothing to fill: the panel says so instead of drawing a full bar."""
    shell.run('%config GpuMem.limit = ""')
    shell.run(f"held = torch.ones({MiB})")
    panel = panel_for(shell)
    assert "no limit" in panel.device_bar.value and "width:" not in panel.device_bar.value
    shell.run('%config GpuMem.limit = "64MiB"')
    panel = panel_for(shell)
    allocated = shell.allocated()
    assert "capacity 64.00 MiB" in panel.device_bar.value
    assert f"width:{100.0 * allocated / (64 * MiB):.2f}%" in panel.device_bar.value
    shell.run('%config GpuMem.limit = ""')
