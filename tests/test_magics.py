"""%%gpumem and %gpumem in a real InteractiveShell on the simulated device."""

from __future__ import annotations

import html
import json
import sys
from typing import Any

import jsonschema
import pytest

import oomnb
from oomnb.model.report import MIME_TYPE, load_schema

MiB = 1024**2


def outputs(result: Any) -> list[dict[str, Any]]:
    return [o.data for o in result.captured.outputs]


def report_bundles(result: Any) -> list[dict[str, Any]]:
    return [data for data in outputs(result) if MIME_TYPE in data]


def test_cell_delta_and_peak_are_exact(shell: Any) -> None:
    result = shell.run("%%gpumem\nx = torch.randn(1024)\ntmp = torch.randn(2048)\ndel tmp")
    assert result.success
    report = oomnb.last_report()
    assert report is not None
    assert report.delta_bytes == 4096
    assert report.peak_bytes - report.baseline_bytes == 4096 + 8192
    assert report.device.kind == "simulated"
    assert report.cell == result.execution_count
    assert report.source == "x = torch.randn(1024)"
    bundle = report_bundles(result)
    assert len(bundle) == 1
    assert {"text/plain", "text/html", MIME_TYPE} <= set(bundle[0])


def test_last_expression_becomes_out(shell: Any) -> None:
    result = shell.run("%%gpumem\n21 * 2")
    assert result.result == 42
    assert shell.ns["Out"][result.execution_count] == 42


def test_report_json_matches_schema(shell: Any) -> None:
    shell.run("batch_size = 32")
    result = shell.run("%%gpumem --limit 4GiB --batch-var batch_size\nx = torch.zeros(batch_size, 1024)")
    data = report_bundles(result)[0][MIME_TYPE]
    jsonschema.validate(data, load_schema())
    assert data["schema_version"] == 1
    assert data["batch_var"] == {"name": "batch_size", "value": 32}
    assert data["delta_bytes"] == 32 * 1024 * 4
    assert data["device"]["capacity_bytes"] == 4 * 1024**3
    json.dumps(data)  # plain JSON


def test_oom_is_caught_and_recovered_to_baseline(shell: Any) -> None:
    baseline = shell.allocated()
    result = shell.run(
        f"%%gpumem --limit {baseline + 64 * MiB}\n"
        "def forward(n):\n"
        "    acts = []\n"
        "    for _ in range(40):\n"
        "        acts.append(torch.ones(n))\n"
        "    return acts\n"
        "partial = torch.ones(1024)\n"
        "forward(1024 * 1024)"
    )
    assert result.success  # the kernel carries on: no error reached IPython
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert report.oom.requested_bytes == 4 * MiB
    assert report.oom.capacity_bytes == baseline + 64 * MiB
    assert report.oom.free_bytes is not None and report.oom.free_bytes < 4 * MiB
    assert report.oom.over_bytes == 4 * MiB - report.oom.free_bytes
    assert report.end_bytes == baseline
    assert shell.allocated() == baseline
    assert report.recovered_bytes >= 60 * MiB  # the activations held by forward's frame
    assert report.released_names == ["partial"]
    assert "partial" not in shell.ns and "forward" in shell.ns
    assert not hasattr(sys, "last_traceback")
    assert "OUT OF MEMORY" in report_bundles(result)[0]["text/plain"]


def test_rebound_loss_with_graph_is_released(shell: Any) -> None:
    shell.run("lin = torch.nn.Linear(512, 512)\nloss = None\nstep = 0")
    baseline = shell.allocated()
    # 48 MiB above what the allocator holds: the forward fits (the 12 MiB input,
    # output and relu, and a small segment for the sum), the 40 MiB tensor does not.
    shell.run(
        f"%%gpumem --limit {shell.reserved() + 48 * MiB}\n"
        "step += 1\n"
        "loss = lin(torch.randn(6144, 512)).relu().sum()\n"
        "more = torch.empty(10 * 1024 * 1024)"
    )
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert report.oom.requested_bytes == 40 * MiB
    assert "loss" in report.released_names and "step" not in report.released_names
    assert shell.ns["step"] == 1
    assert shell.allocated() == baseline


def test_fifty_oom_cycles_do_not_grow(shell: Any) -> None:
    shell.run("keep = torch.ones(1024)")
    start = shell.allocated()
    limit = start + 16 * MiB
    for _ in range(50):
        shell.run(f"%%gpumem --limit {limit} --quiet\nx = torch.ones(1024 * 1024)\ny = torch.ones(8 * 1024 * 1024)")
        assert oomnb.last_report().oom is not None  # type: ignore[union-attr]
    assert shell.allocated() == start


def test_no_catch_shows_report_then_raises(shell: Any) -> None:
    result = shell.run("%%gpumem --limit 1MiB --no-catch\ntorch.empty(1024 * 1024)")
    assert isinstance(result.error_in_exec, __import__("torch").OutOfMemoryError)
    assert report_bundles(result)
    assert oomnb.last_report().oom is not None  # type: ignore[union-attr]


def test_quiet_records_without_display(shell: Any) -> None:
    result = shell.run("%%gpumem --quiet\nx = torch.ones(1)")
    assert report_bundles(result) == []
    assert oomnb.last_report().delta_bytes == 512  # type: ignore[union-attr]


def test_non_oom_error_looks_as_without_the_magic(shell: Any) -> None:
    plain = shell.run("def f():\n    return 1 / 0\nf()")
    magic = shell.run("%%gpumem\ndef f():\n    return 1 / 0\nf()")
    assert isinstance(magic.error_in_exec, ZeroDivisionError)
    plain_text = plain.captured.stdout
    magic_text = magic.captured.stdout
    assert "run_cell_magic" not in magic_text and "magics.py" not in magic_text
    # same frames, same code; only the line numbers move by the %%gpumem line
    assert magic_text.count("Cell In[") == plain_text.count("Cell In[") == 2
    assert "ZeroDivisionError: division by zero" in magic_text.replace("\x1b[0m", "")
    assert sys.last_type is ZeroDivisionError  # %debug still works


def test_keyboard_interrupt_propagates(shell: Any) -> None:
    result = shell.run("%%gpumem\nraise KeyboardInterrupt")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)


def test_syntax_error_is_reported_normally(shell: Any) -> None:
    result = shell.run("%%gpumem\nx = (\n")
    assert "SyntaxError" in result.captured.stdout
    assert oomnb.last_report() is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--limt 3", "unrecognized arguments: --limt"),
        ("--limit 4XB", "unknown unit 'XB'"),
        ("--limit K80", "unknown card 'K80'"),
        ("--device tpu", "unknown device 'tpu'"),
        ("--batch-var 1x", "not a variable name"),
    ],
)
def test_bad_options_are_one_line_usage_errors(shell: Any, line: str, message: str) -> None:
    shell.ns.pop("ran", None)
    result = shell.run(f"%%gpumem {line}\nran = True")
    assert "ran" not in shell.ns  # the cell did not run
    text = result.captured.stdout + result.captured.stderr
    assert "UsageError" in text and message in text
    assert "Traceback" not in text


def test_snapshot_is_cuda_only(shell: Any) -> None:
    result = shell.run("%%gpumem --snapshot /tmp/oomnb-snap.pickle\nx = torch.ones(4)")
    assert "CUDA allocator" in result.captured.stderr
    assert shell.ns["x"].sum().item() == 4


def test_line_magic_status_reset_limit(shell: Any) -> None:
    status = shell.run("%gpumem")
    assert "simulated GPU (simulated on the CPU): allocated" in outputs(status)[0]["text/plain"]
    shell.run("%gpumem limit T4")
    assert oomnb.status()["capacity_bytes"] == oomnb.CARDS["T4"].capacity_bytes
    shell.run("%gpumem limit off")
    assert oomnb.status()["capacity_bytes"] is None
    shell.run("big = torch.ones(1024 * 1024)\ndel big")
    shell.run("%gpumem reset")
    assert oomnb.status()["peak_bytes"] == oomnb.status()["allocated_bytes"]
    bad = shell.run("%gpumem frobnicate")
    assert "unknown %gpumem command" in bad.captured.stdout + bad.captured.stderr


def test_config_limit_applies_to_every_cell(shell: Any) -> None:
    shell.run('%config GpuMem.limit = "2MiB"')
    result = shell.run("x = torch.ones(1024 * 1024)")  # no magic: a plain cell
    assert isinstance(result.error_in_exec, __import__("torch").OutOfMemoryError)
    shell.run('%config GpuMem.limit = ""')
    assert shell.run("x = torch.ones(1024 * 1024)").success


def test_auto_mode_logs_every_cell(shell: Any) -> None:
    shell.run("%gpumem auto on")
    result = shell.run("a = torch.ones(1024)")
    # One line of text, and the whole report as JSON (marked compact) so the sidebar shows it.
    (shown,) = result.captured.outputs
    assert "delta +4.00 KiB" in shown.data["text/plain"] and "\n" not in shown.data["text/plain"]
    assert shown.data[MIME_TYPE]["delta_bytes"] == 4096
    assert shown.metadata == {MIME_TYPE: {"compact": True}}
    jsonschema.validate(shown.data[MIME_TYPE], load_schema())
    report = oomnb.last_report()
    assert report is not None and report.delta_bytes == 4096
    shell.run('%config GpuMem.limit = "1MiB"')
    oom = shell.run("b = torch.ones(1024 * 1024)")
    (shown,) = report_bundles(oom)
    assert "OUT OF MEMORY" in shown["text/plain"]
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert report.story() in shown["text/plain"] and html.escape(report.story()) in shown["text/html"]
    assert shown[MIME_TYPE]["oom"]["needs_bytes"] == report.oom.needs_bytes
    assert not hasattr(sys, "last_traceback")  # recovery dropped what IPython kept
    shell.run('%config GpuMem.limit = ""')
    shell.run("%gpumem auto off")
    assert not shell.run("c = 1").captured.outputs


def test_oom_story_is_one_line_told_alike_everywhere(shell: Any) -> None:
    """needs (a dry run of the whole cell), has (95% of the device), short by: once, in text and HTML."""
    # Tensors of 12 and 32 MiB: each its own segment of exactly its size, so
    # reserved grows by what is allocated (smaller ones would share 20 MiB segments).
    start = shell.reserved()
    capacity = start + 40 * MiB
    result = shell.run(f"%%gpumem --limit {capacity}\nx = torch.ones(3 * 2**20)\ny = torch.ones(8 * 2**20)")
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    oom = report.oom
    assert (oom.needs_bytes, oom.has_bytes, oom.needs_at_least) == (start + 44 * MiB, int(capacity * 0.95), False)
    short = start + 44 * MiB - int(capacity * 0.95)
    story = (
        f"needs {oomnb.format_bytes(start + 44 * MiB)}, has {oomnb.format_bytes(int(capacity * 0.95))} "
        f"usable of {oomnb.format_bytes(capacity)}, short by {oomnb.format_bytes(short)}"
    )
    assert report.story() == story
    (shown,) = report_bundles(result)
    text, page = shown["text/plain"], shown["text/html"]
    assert f"OUT OF MEMORY (OutOfMemoryError allocating 32.00 MiB): {story}" in text
    # One shortfall and one "free" figure (what is free now), not the error's own.
    assert text.count("short by") == 1 and "over by" not in text and text.count("free") == 1
    assert "rolled back: x" in text and "CUDA out of memory" not in text
    assert html.escape(story) in page and page.count("short by") == 1 and "OutOfMemoryError" in page
    assert "rolled back: x" in page
    message = "<details><summary style='cursor:pointer'>error message</summary>"
    assert message + "<pre" in page and "CUDA out of memory. Tried to allocate 32.00 MiB" in page.split(message)[1]
    assert shown[MIME_TYPE]["oom"]["needs_bytes"] == start + 44 * MiB


def test_oom_story_without_a_dry_run_is_a_lower_bound(shell: Any) -> None:
    start = shell.reserved()
    capacity = start + 32 * MiB
    # .item() reads data, which fake tensors answer with 1: the dry run cannot be trusted.
    cell = "x = torch.ones(3 * 2**20)\nv = int(x.sum().item())\ny = torch.ones(v, 2)"
    shell.run(f"%%gpumem --limit {capacity}\n{cell}")
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert any("less than the 36.00 MiB the cell reached before it failed" in n for n in report.notes), report.notes
    needs, has = start + 12 * MiB + 24 * MiB, int(capacity * 0.95)
    assert (report.oom.needs_bytes, report.oom.has_bytes, report.oom.needs_at_least) == (needs, has, True)
    assert report.story() == (
        f"needs at least {oomnb.format_bytes(needs)}, has {oomnb.format_bytes(has)} usable of "
        f"{oomnb.format_bytes(capacity)}, short by at least {oomnb.format_bytes(needs - has)}"
    )


def test_load_twice_unload_load_again(shell: Any) -> None:
    ip = shell.ip
    ip.run_line_magic("gpumem", "auto on")
    hooks = (len(ip.events.callbacks["pre_run_cell"]), len(ip.events.callbacks["post_run_cell"]))
    ip.run_line_magic("load_ext", "oomnb")  # already loaded: a no-op
    assert (len(ip.events.callbacks["pre_run_cell"]), len(ip.events.callbacks["post_run_cell"])) == hooks
    ip.run_line_magic("unload_ext", "oomnb")
    assert (len(ip.events.callbacks["pre_run_cell"]), len(ip.events.callbacks["post_run_cell"])) == (
        hooks[0] - 1,
        hooks[1] - 1,
    )
    assert "gpumem" not in ip.magics_manager.magics["cell"]
    ip.run_line_magic("load_ext", "oomnb")
    assert shell.run("%%gpumem\nx = torch.ones(1024)").success
    assert oomnb.last_report().delta_bytes == 4096  # type: ignore[union-attr]


def test_html_escapes_user_strings(shell: Any) -> None:
    shell.run("name = '<img src=x onerror=alert(1)>'")
    result = shell.run("%%gpumem --batch-var name\nx = 1")
    html = report_bundles(result)[0]["text/html"]
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_oom_inside_backward_drops_the_partial_gradients(shell: Any) -> None:
    shell.run(
        "from torch import nn\n"
        "model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))"
    )
    baseline = shell.allocated()
    # the forward fits; backward writes the last layer's gradients, then runs out
    shell.run(f"%%gpumem --limit {baseline + 64 * MiB}\nloss = model(torch.randn(4096, 512)).sum()\nloss.backward()")
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    # the gradients backward wrote before failing belong to no complete step
    assert "gradients of 2 parameters" in report.released_names
    assert all(p.grad is None for p in shell.ns["model"].parameters())
    assert shell.allocated() == baseline


def test_alloc_conf_and_allocator_commands(shell: Any) -> None:
    from oomnb.backends.simulated import device

    try:
        shown = shell.run("%gpumem alloc-conf expandable_segments:True,max_split_size_mb:64").captured.stdout
        assert "PYTORCH_CUDA_ALLOC_CONF is expandable_segments:True,max_split_size_mb:64" in shown
        assert device.alloc.conf.expandable_segments and device.alloc.conf.max_split_size == 64 * MiB
        bad = shell.run("%gpumem alloc-conf max_split_size_mb:8")
        assert "max_split_size_mb must be above 20, not 8" in str(bad.error_in_exec)
        assert device.alloc.conf.max_split_size == 64 * MiB  # a bad setting changes nothing
        assert "models the caching allocator" in shell.run("%gpumem allocator caching").captured.stdout
        assert device.caching
    finally:
        shell.run("%gpumem alloc-conf default")
        shell.run("%gpumem allocator exact")
    assert not device.caching and device.alloc.conf.to_text() == ""
