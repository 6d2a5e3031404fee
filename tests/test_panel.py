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
    panel.free_grads.click()
    assert "choose a module or an optimizer" in panel.result.value


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
