"""The guarantee, tested on a corpus of real notebook cells (issue 9).

*Nothing that existed before a ``%%gpumem`` cell is lost; the cell runs once.*

Every scenario of :mod:`tests.guarantee_cells` runs in a real IPython shell
with oomnb loaded, on the simulated device, in three modes:

``oom``
    under ``%%gpumem --limit X`` where X is the memory in use before the cell
    plus the scenario's headroom: the cell really runs out of memory (at the
    line the scenario names), the error is caught and advice runs.
``dry_run``
    under ``%%gpumem --dry-run --limit X``: the cell is not run, so nothing
    may change at all, and no file either.
``ok``
    under ``%%gpumem`` with no limit: the cell succeeds.

What the cell's single real execution does is taken from a reference run of
the same setup and the same cell as a plain cell (no magic; for ``oom`` with
the same capacity set by ``%gpumem limit``), in the same process, from the
same seeds.  Both runs are fingerprinted before and after
(:mod:`tests.fingerprint`: every tensor's bytes, parameters and gradients,
optimizer state, containers, plain values, files) and compared:

* ``ok``: the run under the magic changes exactly what the plain run changes.
* ``oom``: nothing reachable before is lost unless the plain run lost it too
  (the cell's own ``del`` or rebinding); whatever changed is changed exactly as
  the plain run changed it, or not at all; plain values (counters, lists of
  numbers) and files are exactly as the plain run left them; gradients that
  were ``None`` are ``None`` again and optimizer state the failed cell created
  is gone; memory is back to the cell's baseline unless the scenario declares
  memory legitimately kept in an object that existed before, which the report
  must then name.
* ``dry_run``: nothing changed.

The scenario's own counts (``Effects``: counters, appends, log lines, files
written, lines printed) are checked for both runs, so the corpus is checked
too: the plain run must do what the scenario says, and run out at ``oom_at``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell

import oomnb
from oomnb.backends.simulated import device as simulated_device

from . import fingerprint as fp
from .conftest import Shell
from .guarantee_cells import SCENARIOS, Effects, Scenario

MiB = 1024**2
MODES = ("oom", "dry_run", "ok")
_CELL_FILE = re.compile(r"^<ipython-input-\d+-")


# -- running cells ------------------------------------------------------------------------
def _clear_last_error() -> None:
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)


def _allocated() -> int:
    return int(oomnb.status()["allocated_bytes"])


def _settle() -> int:
    """Allocated bytes once what the last cell dropped is collected and the cache emptied.

    The young generations are enough (tracebacks are released by hand, and
    modules and tensors do not form cycles); a full collection would cost a
    tenth of a second per call with torch's and FakeTensor's objects around.
    Repacking the live tensors on a fresh allocator makes the reference run
    and the run under the magic start from the same segments, whatever
    earlier tests left split.
    """
    gc.collect(1)
    simulated_device.repack()
    return _allocated()


@contextlib.contextmanager
def _in_folder(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _fresh_namespace(shell: Any) -> None:
    """What ``%reset -f`` does, without its full garbage collection (a third of a second with torch)."""
    ip = shell.ip
    ns = ip.user_ns
    hidden = ip.user_ns_hidden
    for name in list(ns):
        if name not in hidden or re.fullmatch(r"_\d+", name):
            del ns[name]
            hidden.pop(name, None)
    ns["_oh"].clear()
    hook = ip.displayhook
    hook._, hook.__, hook.___ = "", "", ""
    ns.update({"_": "", "__": "", "___": ""})
    _clear_last_error()
    ip.run_cell("import torch", store_history=False)


def _prepare(shell: Any, scenario: Scenario) -> None:
    """A fresh namespace, seeded, with the scenario's setup cells run as plain cells."""
    _fresh_namespace(shell)
    torch.manual_seed(0)
    np.random.seed(0)
    for number, cell in enumerate(scenario.setup):
        result = shell.run(cell)
        if not result.success:
            raise AssertionError(
                f"{scenario.name}: setup cell {number} failed: {result.error_in_exec or result.error_before_exec!r}\n"
                f"{result.captured.stdout[-3000:]}"
            )


def _cell_frame_line(exc: BaseException) -> str:
    """The source line of the innermost frame that belongs to a notebook cell."""
    import linecache

    found = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if _CELL_FILE.match(code.co_filename):
            found = linecache.getline(code.co_filename, tb.tb_lineno).strip()
        tb = tb.tb_next
    return found


def _eval(shell: Any, expression: str) -> Any:
    try:
        return eval(expression, shell.ns)
    except Exception:
        return None


@dataclass
class Observed:
    """Counts of a scenario's side effects, read before and after the cell."""

    counters: dict[str, Any]
    lengths: dict[str, Any]
    lines: dict[str, int]
    files: dict[str, str]


def _observe(shell: Any, scenario: Scenario, folder: Path) -> Observed:
    counters = {e for effects in (scenario.oom, scenario.ok) for e in effects.counters}
    appends = {e for effects in (scenario.oom, scenario.ok) for e in effects.appends}
    logs = {e for effects in (scenario.oom, scenario.ok) for e in effects.lines}
    lengths = {}
    for expression in appends:
        value = _eval(shell, expression)
        lengths[expression] = len(value) if isinstance(value, list) else None
    lines = {}
    for name in logs:
        path = folder / name
        lines[name] = len(path.read_text().splitlines()) if path.exists() else 0
    return Observed(
        counters={e: _eval(shell, e) for e in counters},
        lengths=lengths,
        lines=lines,
        files=fp.files_of(folder),
    )


def _effects(scenario: Scenario, before: Observed, after: Observed, stdout: str) -> Effects:
    def delta(a: Any, b: Any) -> Any:
        return b - a if isinstance(a, int) and isinstance(b, int) else f"{a!r} -> {b!r}"

    written = tuple(
        sorted(
            name
            for name, desc in after.files.items()
            if before.files.get(name) != desc and name not in after.lines  # log files: counted by their lines
        )
    )
    prints = sum(1 for line in stdout.splitlines() if line.startswith(scenario.says)) if scenario.says else 0
    return Effects(
        counters={e: delta(before.counters[e], after.counters[e]) for e in before.counters},
        appends={e: delta(before.lengths[e], after.lengths[e]) for e in before.lengths},
        lines={e: delta(before.lines[e], after.lines[e]) for e in before.lines},
        writes=written,
        prints=prints,
    )


def _declared(scenario: Scenario, effects: Effects) -> Effects:
    """``effects`` with every key the scenario tracks (0 where this outcome does not touch it)."""
    keys = [(e.counters, e.appends, e.lines) for e in (scenario.oom, scenario.ok)]
    return Effects(
        counters={k: effects.counters.get(k, 0) for c, _, _ in keys for k in c},
        appends={k: effects.appends.get(k, 0) for _, a, _ in keys for k in a},
        lines={k: effects.lines.get(k, 0) for _, _, lines in keys for k in lines},
        writes=tuple(sorted(effects.writes)),
        prints=effects.prints,
    )


@dataclass
class Outcome:
    """One execution of the scenario's cell, as plain data."""

    before: dict[str, str]
    diff: fp.Diff
    effects: Effects
    stdout: str
    error: BaseException | None = None
    oom_line: str = ""
    requested: int | None = None
    report: dict[str, Any] | None = None
    baseline: int = 0
    allocated_after: int = 0
    notes: list[str] = field(default_factory=list)


def _execute(shell: Any, scenario: Scenario, folder: Path, source: str, *, limit_mib: float | None) -> Outcome:
    """Set up, fingerprint, run ``source`` (a plain cell or a ``%%gpumem`` cell), fingerprint again."""
    with _in_folder(folder):
        _settle()
        _prepare(shell, scenario)
        baseline = _settle()
        # The capacity is what the allocator may reserve: the headroom is over reserved memory.
        limit = simulated_device.reserved + int(limit_mib * MiB) if limit_mib is not None else None
        source = source.replace("{LIMIT}", str(limit))
        before = fp.capture(shell.ns, folder)
        seen = _observe(shell, scenario, folder)
        plain = not source.startswith("%%gpumem")
        if plain and limit is not None:
            shell.run(f"%gpumem limit {limit}")
        oomnb_report_before = oomnb.last_report()
        try:
            result = shell.run(source)
            allocated_after = _allocated()
        finally:
            if plain and limit is not None:
                shell.run("%gpumem limit off")
        error = result.error_in_exec
        oom_line = _cell_frame_line(error) if error is not None else ""
        requested = None
        if isinstance(error, torch.OutOfMemoryError) and simulated_device.last_oom is not None:
            requested = simulated_device.last_oom[0]
        report = oomnb.last_report()
        report_dict = report.to_dict() if report is not None and report is not oomnb_report_before else None
        after = fp.capture(shell.ns, folder)
        difference = fp.diff(before, after)
        outcome = Outcome(
            before={**before.paths, **{f"file:{name}": desc for name, desc in before.files.items()}},
            diff=difference,
            effects=_effects(scenario, seen, _observe(shell, scenario, folder), result.captured.stdout),
            stdout=result.captured.stdout,
            error=error,
            oom_line=oom_line,
            requested=requested,
            report=report_dict,
            baseline=baseline,
        )
        del before, after, report, result
        _clear_last_error()
        _release(error)
        outcome.allocated_after = allocated_after
        return outcome


def _release(exc: BaseException | None) -> None:
    """Drop the frames an exception's traceback keeps (and its chained exceptions')."""
    import traceback

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _magic_line(scenario: Scenario, *options: str) -> str:
    parts = ["%%gpumem", *options]
    if scenario.batch_var:
        parts += ["--batch-var", scenario.batch_var]
    return " ".join(parts)


def _reference(shell: Any, scenario: Scenario, folder: Path, mode: str) -> Outcome:
    """The plain run: what the cell's single real execution does (and a check of the corpus)."""
    limit = scenario.headroom_mib if mode == "oom" else None
    ref = _execute(shell, scenario, folder, scenario.cell, limit_mib=limit)
    problems = []
    if mode == "oom":
        if not isinstance(ref.error, torch.OutOfMemoryError):
            problems.append(f"the plain cell did not run out of memory: {ref.error!r}")
        elif scenario.oom_at not in ref.oom_line:
            problems.append(f"the plain cell ran out at {ref.oom_line!r}, not at {scenario.oom_at!r}")
        expected = scenario.oom
    else:
        if ref.error is not None:
            problems.append(f"the plain cell failed: {ref.error!r}\n{ref.stdout[-2000:]}")
        expected = scenario.ok
    if _declared(scenario, ref.effects) != _declared(scenario, expected):
        problems.append(
            f"the plain cell's effects {_declared(scenario, ref.effects)} differ from the scenario's "
            f"{_declared(scenario, expected)}"
        )
    if problems:
        pytest.fail(f"corpus: {scenario.name} ({mode}): " + "; ".join(problems), pytrace=False)
    return ref


# -- comparing ----------------------------------------------------------------------------
def _after(before: dict[str, str], diff: fp.Diff, key: str) -> str | None:
    if key in diff.lost:
        return None
    if key in diff.changed:
        return diff.changed[key][1]
    if key in diff.added:
        return diff.added[key]
    return before.get(key)


def _root(path: str) -> str:
    return re.split(r"[.\[{]", path, maxsplit=1)[0]


_PLAIN_KINDS = ("value:", "list:", "dict:", "tuple:", "set:", "frozenset:")
_STATE_ENTRY = re.compile(r"\.state\[[^\]]+\]$")
_NONE = "value:NoneType:None"


def _plain_roots(before: dict[str, str], diff: fp.Diff) -> set[str]:
    """Top-level names whose whole value (after the run) is plain data: numbers, strings, lists of them."""
    paths = {k for k in before if not k.startswith(("@", "file:"))} | {
        k for k in diff.all_keys() if not k.startswith(("@", "file:"))
    }
    kinds: dict[str, bool] = {}
    for key in paths:
        desc = _after(before, diff, key)
        if desc is None:
            continue
        root = _root(key)
        kinds[root] = kinds.get(root, True) and desc.startswith(_PLAIN_KINDS)
    return {root for root, plain in kinds.items() if plain}


def _oom_problems(scenario: Scenario, ref: Outcome, run: Outcome) -> list[str]:
    """What the run under ``%%gpumem`` did that the cell's single real execution did not."""
    problems: list[str] = []
    before = run.before
    d_ref, d_run = ref.diff, run.diff
    # Items (storages, modules, optimizers, objects): nothing lost, nothing changed but by the cell.
    for key, was in sorted(d_run.lost.items()):
        if key.startswith("@") and key not in d_ref.lost:
            problems.append(f"lost {key[1:]} ({was})")
    for key, (_, now) in sorted(d_run.changed.items()):
        if key.startswith("@"):
            want = d_ref.changed.get(key, (None, None))[1]
            if now != want:
                problems.append(f"changed {key[1:]}: {now} (the real run left {want or 'it unchanged'})")
    # Files: exactly as the real execution left them.
    files = {k for k in d_ref.all_keys() | d_run.all_keys() if k.startswith("file:")}
    for key in sorted(files):
        want, now = _after(before, d_ref, key), _after(before, d_run, key)
        if want != now:
            problems.append(f"{key}: {now} (the real run left {want}; before: {before.get(key)})")
    # Paths.
    plain_ref = _plain_roots(before, d_ref)
    keys = {k for k in d_ref.all_keys() | d_run.all_keys() if not k.startswith(("@", "file:"))}
    run_roots = {_root(k) for k in before if not k.startswith("file:") and _after(before, d_run, k) is not None}
    run_roots |= {_root(k) for k in d_run.added if not k.startswith("file:")}
    for key in sorted(keys):
        was, want, now = before.get(key), _after(before, d_ref, key), _after(before, d_run, key)
        if key.endswith(".grad") and was in (None, _NONE):
            # No gradient before (or the parameter was reached by another path): None again.
            if now not in (None, _NONE):
                problems.append(f"{key}: the failed cell's gradient was kept ({now}); it was None before")
            continue
        if _STATE_ENTRY.search(key) and was is None:
            if scenario.steps_completed:
                if now != want:
                    problems.append(f"{key}: {now} (the real run's completed steps left {want})")
            elif now is not None:
                problems.append(f"{key}: optimizer state created by the failed cell was kept ({now})")
            continue
        if now == want:
            continue
        root = _root(key)
        if root in plain_ref and want is not None:
            if root not in run_roots:
                problems.append(f"{root}: a plain value the cell left ({want}) was removed")
            else:
                problems.append(f"{key}: {now} (the real run left {want}; before: {was})")
            continue
        if (now or "").startswith("alias:") or (want or "").startswith("alias:"):
            continue  # which path meets an object first: identity is checked by the items
        if now is None:
            if was is not None and root in run_roots and want is not None:
                problems.append(f"{key}: lost ({was})")
            continue
        if now != was:
            problems.append(f"{key}: {now} (the real run left {want}; before: {was})")
    return problems


def _report_text(report: dict[str, Any] | None) -> str:
    if report is None:
        return ""
    data = {k: v for k, v in report.items() if k != "source"}
    return json.dumps(data)


# -- the test -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gshell() -> Iterator[Shell]:
    """The ``shell`` fixture of conftest, loaded once for the module (each test starts a fresh namespace).

    Everything alive when the module starts (torch, IPython, pytest) is moved
    out of the garbage collector's reach with ``gc.freeze()``: a full
    collection then takes milliseconds instead of a third of a second, for the
    tests and for oomnb's own recovery alike.
    """
    ip = InteractiveShell.instance()
    ip.reset(new_session=False)
    ip.run_line_magic("colors", "nocolor")
    ip.run_line_magic("load_ext", "oomnb")
    gc.collect()
    gc.freeze()
    try:
        yield Shell(ip)
    finally:
        gc.unfreeze()
        ip.run_line_magic("unload_ext", "oomnb")
        ip.reset(new_session=False)
        _clear_last_error()


#: The ``oom`` mode's headrooms (a few MiB over what the setup holds) put each
#: OOM at the line its scenario names when allocations are counted exactly.
#: With the cache modelled a request under 10 MiB takes a whole 20 MiB
#: segment, and whether a setup's small tensors fit an earlier test's split
#: segment moves the OOM to another line: ``oom`` runs on the exact model,
#: ``ok`` and ``dry_run`` on both.  (The cache's own OOMs, rolled back, are in
#: ``tests/test_fragmentation.py``.)
RUNS = [(mode, model) for mode in MODES for model in (("exact",) if mode == "oom" else ("caching", "exact"))]


@pytest.fixture
def allocator_model(request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.param
    before = simulated_device.caching
    simulated_device.caching = name == "caching"
    try:
        yield name
    finally:
        simulated_device.caching = before


@pytest.mark.parametrize(("mode", "allocator_model"), RUNS, indirect=["allocator_model"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_guarantee(gshell: Shell, tmp_path: Path, scenario: Scenario, mode: str, allocator_model: str) -> None:
    shell = gshell
    problems: list[str] = []
    if mode == "dry_run":
        run = _execute(
            shell,
            scenario,
            tmp_path / "run",
            _magic_line(scenario, "--dry-run", "--limit", "{LIMIT}") + "\n" + scenario.cell,
            limit_mib=scenario.headroom_mib,
        )
        if run.error is not None:
            name = type(run.error).__name__
            if name == "UsageError":
                run.notes.append(f"dry run refused: {run.error}")
            else:
                problems.append(f"the dry run raised {name}: {str(run.error)[:300]}")
        elif run.report is None or not run.report.get("dry_run"):
            problems.append("no dry-run report")
        if run.diff:
            problems.append("the dry run changed the notebook's state:\n" + run.diff.describe())
        if _declared(scenario, run.effects) != _declared(scenario, Effects()):
            problems.append(f"the dry run had effects: {_declared(scenario, run.effects)}")
        if run.allocated_after > run.baseline:
            problems.append(f"the dry run left {run.allocated_after - run.baseline} bytes allocated")
        assert not problems, f"{scenario.name} (dry run):\n" + "\n".join(problems)
        return

    ref = _reference(shell, scenario, tmp_path / "ref", mode)
    if mode == "ok":
        source = _magic_line(scenario) + "\n" + scenario.cell
        run = _execute(shell, scenario, tmp_path / "run", source, limit_mib=None)
    else:
        source = _magic_line(scenario, "--limit", "{LIMIT}") + "\n" + scenario.cell
        run = _execute(shell, scenario, tmp_path / "run", source, limit_mib=scenario.headroom_mib)
    if run.before != ref.before:
        pytest.fail(f"corpus: {scenario.name}: the setup is not deterministic", pytrace=False)

    if run.error is not None:
        problems.append(f"the cell under %%gpumem raised {type(run.error).__name__}: {str(run.error)[:300]}")
    effects, declared = _declared(scenario, run.effects), _declared(scenario, ref.effects)
    if effects != declared:
        problems.append(f"side effects {effects}; the real run's: {declared}")

    if mode == "ok":
        if run.report is None or run.report.get("oom") is not None:
            problems.append("no report, or the report says the cell ran out of memory")
        if run.diff != ref.diff:
            problems.append("the state differs from the plain run's:\n" + _diff_of_diffs(ref.diff, run.diff))
        assert not problems, f"{scenario.name} (ok):\n" + "\n".join(problems)
        return

    report = run.report
    if report is None or not report.get("oom"):
        problems.append("no report of an out-of-memory error")
    else:
        requested = report["oom"].get("requested_bytes")
        if requested != ref.requested:
            problems.append(f"the cell ran out elsewhere: requested {requested} bytes, the plain run {ref.requested}")
        baseline = report.get("baseline_bytes", run.baseline)
        text = _report_text(report)
        if scenario.steps_completed and "completed steps created" not in text:
            problems.append("the report does not say that the completed steps' optimizer state was kept")
        if not scenario.grows and not scenario.steps_completed and run.allocated_after > baseline:
            problems.append(
                f"after the caught OOM {run.allocated_after - baseline} bytes more than the baseline stay allocated"
            )
        problems += [
            f"the report does not say that {name} kept new memory"
            for name in scenario.grows
            if f"`{name}`" not in text and json.dumps(name) not in text  # named the way the report names things
        ]
    problems += _oom_problems(scenario, ref, run)
    assert not problems, f"{scenario.name} (oom):\n" + "\n".join(problems)


def _diff_of_diffs(ref: fp.Diff, run: fp.Diff) -> str:
    lines = []
    for key in sorted(ref.all_keys() | run.all_keys()):
        a = ref.lost.get(key) or ref.changed.get(key) or ref.added.get(key)
        b = run.lost.get(key) or run.changed.get(key) or run.added.get(key)
        if a != b:
            lines.append(f"{key}: real run {a}; under %%gpumem {b}")
    return "\n".join(lines[:40])


# -- the harness itself ---------------------------------------------------------------------
def test_fingerprint_follows_data_not_names(gshell: Shell, tmp_path: Path) -> None:
    """A view, a wrapper or a swap keeps what it reaches; a rebinding to new data loses the old."""
    ns: dict[str, Any] = {"x": torch.arange(12.0), "y": torch.ones(3), "lin": torch.nn.Linear(2, 2), "n": 1}
    before = fp.capture(ns, tmp_path)
    ns["x"] = ns["x"].view(3, 4)
    ns["lin"] = torch.nn.Sequential(ns["lin"])
    ns["y"] = torch.zeros(3)
    ns["n"] += 1
    (tmp_path / "log.txt").write_text("one line\n")
    diff = fp.diff(before, fp.capture(ns, tmp_path))
    assert set(diff.lost) == {"@y", "lin.weight", "lin.bias", "lin.weight.grad", "lin.bias.grad"} | {
        f"lin.{k}" for k in ("in_features", "out_features")
    }
    assert diff.changed["x"][1].startswith("tensor:float32 (3, 4)")
    assert diff.changed["n"] == ("value:int:1", "value:int:2")
    assert "file:log.txt" in diff.added and "@x" not in diff.lost and "@lin" not in diff.lost


def test_fingerprint_is_invisible_to_the_device(gshell: Shell) -> None:
    """Reading bytes runs no torch op: nothing is counted, registered or allocated, even at the limit."""
    import numpy as np

    a = np.ones((256, 256), dtype=np.float32)
    ns: dict[str, Any] = {"t": torch.from_numpy(a), "loop": []}
    ns["loop"].append(ns["loop"])  # a cycle
    ns["deep"] = [[[[[[[[torch.ones(2)]]]]]]]]
    start = _settle()
    gshell.run(f"%gpumem limit {start}")
    try:
        first = fp.capture(ns)
        second = fp.capture(ns)
    finally:
        gshell.run("%gpumem limit off")
    assert _allocated() == start
    assert first.paths == second.paths and not fp.diff(first, second)
    assert first.paths["loop[0]"] == "alias:loop"
    assert any(desc.startswith("deep:") for desc in first.paths.values())
