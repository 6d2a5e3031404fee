"""`oomnb profile`: whole notebooks in a real kernel, every cell measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from oomnb.cli.profile import ProfileError, profile
from oomnb.model.report import MIME_TYPE

NOTEBOOKS = Path(__file__).resolve().parent.parent / "example_notebooks"


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oomnb", "profile", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def saved_reports(path: Path) -> dict[int, dict]:  # type: ignore[type-arg]
    nb = nbformat.read(path, as_version=4)
    found = {}
    for index, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), 1):
        for output in cell.get("outputs", []):
            if MIME_TYPE in output.get("data", {}):
                found[index] = output["data"][MIME_TYPE]
    return found


def test_peaks_equal_the_reports_saved_in_the_notebook(tmp_path: Path) -> None:
    path = NOTEBOOKS / "02_catching_an_oom.ipynb"
    result = profile(str(path), limit="256MiB")
    saved = saved_reports(path)
    assert saved, "the example notebook keeps its executed outputs"
    by_cell = {row.index: row.report for row in result.rows if row.report is not None}
    for index, report in saved.items():
        assert by_cell[index].peak_bytes == report["peak_bytes"]
        assert by_cell[index].delta_bytes == report["delta_bytes"]
        assert (by_cell[index].oom is None) == (report["oom"] is None)
    # cells without the magic were measured too (auto mode)
    assert len(by_cell) == len(result.rows)


def test_cli_table_json_output_and_fail_over(tmp_path: Path) -> None:
    path = NOTEBOOKS / "01_quickstart.ipynb"
    out_json, out_nb = tmp_path / "reports.json", tmp_path / "executed.ipynb"
    ok = cli(str(path), "--limit", "T4", "--json", str(out_json), "--output", str(out_nb))
    assert ok.returncode == 0, ok.stderr
    assert "activations = torch.ones(1024, 1024)" in ok.stdout
    assert "+4.00 MiB" in ok.stdout
    reports = json.loads(out_json.read_text())
    assert all(r["report"]["schema_version"] == 1 for r in reports)
    executed = nbformat.read(out_nb, as_version=4)
    assert "oomnb-profile-setup" not in json.dumps(executed.cells[0].metadata)
    peak = max(r["report"]["peak_bytes"] for r in reports)
    over = cli(str(path), "--fail-over", str(peak - 1))
    assert over.returncode == 3
    assert "peak over the budget" in over.stderr
    assert cli(str(path), "--fail-over", str(peak)).returncode == 0


def test_a_dying_kernel_is_reported_not_hung(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("import os\nos._exit(1)")]
    )
    path = tmp_path / "dies.ipynb"
    nbformat.write(nb, path)
    run = cli(str(path), "--timeout", "60", timeout=120)
    assert run.returncode == 4
    assert run.stderr.strip().splitlines()[-1].startswith("oomnb profile: the kernel died while running code cell 2")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.ipynb", "no such notebook"),
        (lambda p: (p / "notes.ipynb", (p / "notes.ipynb").write_text("not json"))[0], "is not a Jupyter notebook"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    run = cli(str(path))
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert message in run.stderr
    with pytest.raises(ProfileError, match=message):
        profile(str(path))


def test_bad_limit_is_one_line() -> None:
    run = cli(str(NOTEBOOKS / "01_quickstart.ipynb"), "--limit", "K80")
    assert run.returncode == 2
    assert "unknown card 'K80'" in run.stderr
