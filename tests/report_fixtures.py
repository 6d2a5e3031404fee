"""Real reports, saved as the fixtures both sides of the report contract are tested on.

``python -m tests.report_fixtures`` runs a few cells in a real InteractiveShell
on the simulated device (an OOM with a dry run, one without, a cell that
fits, auto mode, a CUDA-shaped error with no figures) and writes
``tests/fixtures/reports.json``: each report's JSON with the story and
headline the Python renderings tell.  ``tests/test_report_fixtures.py``
checks the Python side against the file; ``labextension/test/model.test.ts``
checks the TypeScript side against the same file and the same JSON Schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "reports.json"

#: Byte counts whose formatting both sides must agree on (ties round to even).
BYTE_CASES = [0, 1, 512, 1023, 1024, 1536, 4096, 1179648, 1184645, 3 * 2**20, -3 * 2**20, 2**30 - 1, 15 * 2**30, 2**40]


def _cells() -> list[tuple[str, str, str]]:
    """(name, set-up, cell) for each fixture report."""
    model = (
        "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512))\n"
        "opt = torch.optim.AdamW(model.parameters())"
    )
    return [
        ("fits", "import torch", "%%gpumem --limit 64MiB\nx = torch.ones(1024)"),
        (
            "oom_measured",
            model,
            "%%gpumem --limit 96MiB\nbatch_size = 8192\nloss = model(torch.randn(batch_size, 512)).pow(2).mean()\n"
            "loss.backward(); opt.step()",
        ),
        (
            "oom_lower_bound",
            "import torch",
            "%%gpumem --limit 32MiB\nx = torch.ones(3 * 2**20)\nv = int(x.sum().item())\ny = torch.ones(v, 2)",
        ),
        ("no_limit", "import torch", "%%gpumem\ny = torch.ones(3, 1024)"),
    ]


def generate() -> dict[str, Any]:
    from IPython.core.interactiveshell import InteractiveShell

    import oomnb
    from oomnb.model.units import format_bytes

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "oomnb")
    reports = []
    from oomnb.backends.simulated import device

    for name, setup, cell in _cells():
        ip.run_line_magic("reset", "-f")
        device.empty_cache()  # each from an empty cache, not the last one's segments
        ip.run_cell(setup)
        ip.run_cell(cell, store_history=True)
        report = oomnb.last_report()
        assert report is not None, name
        reports.append(
            {"name": name, "report": report.to_dict(), "story": report.story(), "headline": report.headline()}
        )
        ip.run_line_magic("gpumem", "reset")
    # A report from before the story was told (or a frontend that only has
    # the error's figures): the story falls back to those.
    from oomnb.model.report import Report

    older = Report.from_dict(reports[1]["report"])
    assert older.oom is not None
    older.oom.needs_bytes = older.oom.has_bytes = None
    reports.append(
        {
            "name": "oom_error_figures_only",
            "report": older.to_dict(),
            "story": older.story(),
            "headline": older.headline(),
        }
    )
    return {"reports": reports, "format_bytes": [[n, format_bytes(n)] for n in BYTE_CASES]}


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURES.read_text(encoding="utf-8"))
    return data


if __name__ == "__main__":
    FIXTURES.write_text(json.dumps(generate(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURES}")
