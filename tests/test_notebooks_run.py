"""Every example notebook runs top to bottom, as a reader runs it, and is saved with its figures.

Each notebook is executed the way ``jupyter nbconvert --to notebook --execute``
executes it: nbclient's ``NotebookClient`` with the notebook's own kernel, in
the notebook's folder, stopping at the first cell that raises unless the cell
is tagged ``raises-exception`` (which nbclient, nbconvert and JupyterLab's Run
All honour), here with a per-cell timeout.  Then:

- no cell raised except those tagged ``raises-exception``, and each of those
  did raise (an error that is promised but absent is a failure too);
- a cell marked for nbval with ``NBVAL_RAISES_EXCEPTION`` is tagged
  ``raises-exception`` too (nbval reads either; nbconvert and Run All read
  only the tag);
- a notebook whose markdown promises a figure (a "figure", "picture", "plot"
  or "chart") shows at least one ``image/png`` output;
- the committed file is what a reader sees: it was saved from a fresh
  top-to-bottom run (every code cell executed, counts 1, 2, 3, ...), and it
  holds an ``image/png`` output in every cell where the run produced one.

The kernel runs with ``MPLBACKEND=Agg``, as ``make notebooks`` and a headless
CI run it: a notebook must still show its figures inline then (``%matplotlib
inline``; ipykernel only picks the inline backend when MPLBACKEND is unset).

To re-save the notebooks: ``make notebooks-save``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "example_notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: Seconds a single cell may take (the slowest, 04's batch search, takes about 30 s on 2 CPU cores).
CELL_TIMEOUT = 600
RAISES_TAG = "raises-exception"
NBVAL_RAISES = "NBVAL_RAISES_EXCEPTION"
#: Words by which a notebook's markdown promises an image ("figures", plural, means numbers).
FIGURE_WORDS = re.compile(r"\b(figure|picture|plot|chart)\b", re.IGNORECASE)


def _read(path: Path) -> Any:
    return nbformat.read(path, as_version=4)


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _promises_figure(nb: Any) -> bool:
    return any(cell.cell_type == "markdown" and FIGURE_WORDS.search(cell.source) for cell in nb.cells)


def _png_cells(nb: Any) -> set[int]:
    """Indices of the code cells with an ``image/png`` output."""
    return {
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and any("image/png" in output.get("data", {}) for output in cell.outputs)
    }


def _errors(cell: Any) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for o in cell.get("outputs", []) if o.output_type == "error"]


def _first_line(cell: Any) -> str:
    return (cell.source.strip().splitlines() or [""])[0][:80]


def test_there_are_notebooks_and_figure_promises_are_found() -> None:
    """The figure check looks at the notebooks it should (cheap: no kernel)."""
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    promising = {path.name for path in NOTEBOOKS if _promises_figure(_read(path))}
    # 03 promises the panel's chart, 04 a picture of the batch search.
    assert {"03_leaks.ipynb", "04_will_it_fit.ipynb"} <= promising


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(
    path: Path, monkeypatch: pytest.MonkeyPatch, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = _read(path)
    # The kernel inherits the environment: headless, as in CI and `make notebooks`.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _read(path)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell not tagged {RAISES_TAG!r} raised:\n{error}", pytrace=False)
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    with capsys.disabled():
        print(f"\n{path.name}: executed in {seconds:.1f} s", end="")

    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"cell {index} ({_first_line(cell)!r})"
        tagged = RAISES_TAG in _tags(cell)
        errors = _errors(cell)
        if tagged and not errors:
            problems.append(f"{where} is tagged {RAISES_TAG!r} but raised nothing")
        if not tagged and errors:
            problems.append(f"{where} raised {errors} without the {RAISES_TAG!r} tag")
        if not tagged and (NBVAL_RAISES in cell.source or "nbval-raises-exception" in _tags(cell)):
            problems.append(f"{where} is marked {NBVAL_RAISES} for nbval but not tagged {RAISES_TAG!r}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)

    if _promises_figure(nb):
        assert _png_cells(nb), (
            f"{path.name}: the markdown promises a figure but no cell showed an image/png output "
            "(with MPLBACKEND=Agg a figure needs `%matplotlib inline`)"
        )

    # The committed file: saved from a fresh top-to-bottom run, with the figures a run shows.
    code = [cell for cell in saved.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not saved from a fresh top-to-bottom run (execution counts {counts}): `make notebooks-save`"
    )
    missing = _png_cells(nb) - _png_cells(saved)
    assert not missing, (
        f"{path.name}: cells {sorted(missing)} show a figure when run but the saved notebook lacks it: "
        "`make notebooks-save`"
    )
