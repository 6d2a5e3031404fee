"""The guarantee, defect by defect: nothing the user had before a cell is changed or lost by oomnb.

Each test is one reported defect, with the cell that showed it, run in a real
InteractiveShell on the simulated device with real out-of-memory errors.
"""

from __future__ import annotations

import gc
import io
import os
import resource
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import oomnb
from oomnb.analysis.isolation import run_isolated

MiB = 1024**2

TRAINING = """
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
calls = 0
seen = []

def train_step(bs):
    global calls
    calls += 1
    x = torch.randn(bs, 256)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    seen.append(loss.item())
    with open("train.log", "a") as log:
        log.write(f"step {calls}\\n")
    torch.save(model.state_dict(), "ckpt.pt")
"""


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    with oomnb.untracked():
        return [p.detach().clone() for p in model.parameters()]


def adam_steps(opt: torch.optim.Optimizer) -> list[float]:
    return [float(s["step"]) for s in opt.state.values()]


@pytest.fixture
def workdir(tmp_path: Path) -> Any:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


def test_advice_never_trains_the_real_model(shell: Any, workdir: Path) -> None:
    """Defect 1: advice re-ran `train_step(bs)` for real (Adam's step count +3, weights changed, 13 log lines)."""
    shell.run(TRAINING)
    shell.run("train_step(8)")  # one real step: state, log line, checkpoint
    before_w = weights(shell.ns["model"])
    before_steps = adam_steps(shell.ns["opt"])
    ckpt = (workdir / "ckpt.pt").read_bytes()
    baseline = shell.allocated()
    result = shell.run(f"%%gpumem --limit {baseline + 24 * MiB} --batch-var bs\nbs = 65536\ntrain_step(bs)")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert report.suggestions, "advice ran (isolated) and found something"
    # the failed cell ran once, up to its OOM in the forward pass
    assert shell.ns["calls"] == 2
    assert shell.ns["seen"] == pytest.approx(shell.ns["seen"][:1]) and len(shell.ns["seen"]) == 1
    assert adam_steps(shell.ns["opt"]) == before_steps
    assert all(torch.equal(a, b) for a, b in zip(before_w, weights(shell.ns["model"]), strict=True))
    assert (workdir / "train.log").read_text() == "step 1\n"
    assert (workdir / "ckpt.pt").read_bytes() == ckpt
    assert shell.allocated() <= report.baseline_bytes


def test_dry_run_leaves_the_real_optimizer_alone(shell: Any, workdir: Path) -> None:
    """Defect 2: `--dry-run` put fake tensors into the real optimizer's state; saving it then failed."""
    shell.run(TRAINING)
    result = shell.run("%%gpumem --dry-run --limit 1GiB\ntrain_step(64)")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.dry_run
    assert report.peak_bytes > report.baseline_bytes
    opt = shell.ns["opt"]
    assert len(opt.state) == 0 and shell.ns["calls"] == 0 and shell.ns["seen"] == []
    assert all(p.grad is None for p in shell.ns["model"].parameters())
    torch.save(opt.state_dict(), io.BytesIO())  # fails with fake tensors in the state
    assert not (workdir / "train.log").exists() and not (workdir / "ckpt.pt").exists()


REBINDS = {
    "wrapper": (
        "class Wrapper(torch.nn.Module):\n    def __init__(self, m):\n        super().__init__()\n"
        "        self.m = m\nmodel = torch.nn.Linear(256, 256)",
        "model = Wrapper(model)",
        "model",
    ),
    "data_parallel": ("model = torch.nn.Linear(256, 256)", "model = torch.nn.DataParallel(model)", "model"),
    "view": ("x = torch.randn(64, 1024)", "x = x.view(-1)", "x"),
    "reshape": ("x = torch.randn(64, 1024)", "x = x.reshape(-1)", "x"),
    "unsqueeze": ("x = torch.randn(64, 1024)", "x = x.unsqueeze(0)", "x"),
    "detach": ("x = torch.randn(64, 1024, requires_grad=True) * 2", "x = x.detach()", "x"),
    "from_numpy": (
        "import numpy as np\narr = np.ones((64, 1024), dtype=np.float32)",
        "arr = torch.from_numpy(arr)",
        "arr",
    ),
    "swap": ("a = torch.randn(64, 1024)\nb = torch.randn(32, 1024)", "a, b = b, a", "a"),
    "dict_rebuild": ("data = {'x': torch.randn(64, 1024)}", "data = dict(data, k=torch.zeros(4))", "data"),
    "global_in_function": (
        "model = torch.nn.Linear(256, 256)\ndef wrap():\n    global model\n    model = torch.nn.Sequential(model)",
        "wrap()",
        "model",
    ),
}


def _old_bytes(shell: Any, name: str) -> list[torch.Tensor]:
    value = shell.ns[name]
    if isinstance(value, torch.nn.Module):
        return list(value.parameters())
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, torch.Tensor)]
    if isinstance(value, torch.Tensor):
        return [value]
    return [torch.from_numpy(value)]


@pytest.mark.parametrize("case", sorted(REBINDS))
def test_rollback_never_deletes_what_existed_before(shell: Any, case: str) -> None:
    """Defect 3: rebinding a name to a wrapper, view or conversion of the old value, then an OOM, lost the data."""
    setup, rebind, name = REBINDS[case]
    shell.run(setup)
    old = _old_bytes(shell, name if case != "swap" else "a")
    with oomnb.untracked():
        expected = [t.detach().clone() for t in old]
    baseline = shell.allocated()
    result = shell.run(f"%%gpumem --limit {baseline + 8 * MiB}\n{rebind}\nboom = torch.empty(16 * 1024 * 1024)")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert "boom" not in shell.ns
    if case == "dict_rebuild":
        # the new dict holds the old tensor and the cell's new one: kept, and said
        assert shell.allocated() == baseline + 512
        assert any("kept `data`" in note for note in report.notes)
    elif case == "from_numpy":
        # the array's memory is a torch storage now, which the simulated device counts
        assert shell.allocated() <= baseline + 64 * 1024 * 4
        assert any("kept `arr`" in note for note in report.notes)
    else:
        assert shell.allocated() <= baseline
    # every tensor the user had is still reachable, byte for byte
    reachable = {t.untyped_storage().data_ptr() for v in shell.ns.values() for t in _tensors(v)}
    for tensor, copy in zip(old, expected, strict=True):
        assert tensor.untyped_storage().data_ptr() in reachable
        assert torch.equal(tensor, copy)


def _tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.Module):
        return [*value.parameters(), *value.buffers()]
    if type(value).__name__ == "ndarray":
        return [torch.from_numpy(value)]
    if depth < 3 and isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v, depth + 1)]
    if depth < 3 and isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v, depth + 1)]
    return []


def test_old_with_new_model_keeps_the_old_and_restores_the_name(shell: Any) -> None:
    """`old = model; model = New()` then an OOM: `old` still holds the model, and `model` is bound to it again."""
    shell.run("model = torch.nn.Linear(256, 256)")
    original = shell.ns["model"]
    baseline = shell.allocated()
    shell.run(
        f"%%gpumem --limit {baseline + 8 * MiB}\nold = model\nmodel = torch.nn.Linear(512, 512)\n"
        "boom = torch.empty(16 * 1024 * 1024)"
    )
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert shell.ns["old"] is original and shell.ns["model"] is original
    assert "model" in report.released_names
    assert any("bound `model` again" in note for note in report.notes)
    assert shell.allocated() <= baseline


def test_a_new_tensor_reusing_a_freed_id_is_still_rolled_back(shell: Any) -> None:
    """Rollback compared id()s: a new tensor that took a freed object's id stayed."""
    shell.run("x = torch.ones(1024)")
    baseline = shell.allocated()
    # the old x dies, its id is free; the new x (an output holding its graph)
    # may well take it
    shell.run(
        f"%%gpumem --limit {baseline + 8 * MiB}\nx = None\nx = torch.ones(1024, requires_grad=True) * 2\n"
        "boom = torch.empty(16 * 1024 * 1024)"
    )
    report = oomnb.last_report()
    assert report is not None and "x" in report.released_names
    assert "x" not in shell.ns
    assert shell.allocated() == baseline - 4096


COPIES = {
    "index": ("X = torch.randn(2000, 256)", "perm = torch.randperm(X.shape[0])\nX = X[perm]"),
    "clone": ("X = torch.randn(2000, 256)", "X = X.clone()"),
    "float": ("X = torch.randn(2000, 256).half()", "X = X.float()"),
    "scale": ("X = torch.randn(2000, 256)", "X = X * 2"),
    "cat": ("X = torch.randn(1000, 256)", "X = torch.cat([X, torch.randn(100, 256)])"),
    "deepcopy": ("import copy\nX = torch.nn.Linear(256, 256)", "X = copy.deepcopy(X)"),
    "dict": ("X = {'w': torch.randn(1000, 256)}", "X = {k: v.clone() for k, v in X.items()}"),
}


@pytest.mark.usefixtures("exact_allocator")  # limits a few MiB over what is allocated
@pytest.mark.parametrize("case", sorted(COPIES))
def test_a_copy_that_replaced_the_users_data_is_kept(shell: Any, case: str) -> None:
    """The cell replaced `X` with a copy and the original is gone: deleting the copy would lose the data."""
    setup, change = COPIES[case]
    shell.run(setup)
    baseline = shell.allocated()
    result = shell.run(f"%%gpumem --limit {baseline + 4 * MiB}\n{change}\nboom = torch.empty(16 * 1024 * 1024)")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert "X" in shell.ns and "X" not in report.released_names
    assert any("kept `X`" in note and "only copy" in note for note in report.notes)
    assert "boom" not in shell.ns


GRAD_MODEL = (
    "from torch import nn\ntorch.manual_seed(0)\n"
    "model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))\n"
)


def test_oom_in_backward_keeps_gradients_from_earlier_cells(shell: Any) -> None:
    """Defect 4: an OOM inside backward() wiped gradients accumulated in earlier cells."""
    shell.run(GRAD_MODEL + "model(torch.randn(8, 512)).sum().backward()")
    params = list(shell.ns["model"].parameters())
    assert all(p.grad is not None for p in params)
    grads = [p.grad for p in params]
    baseline = shell.allocated()
    shell.run(f"%%gpumem --limit {baseline + 64 * MiB}\nloss = model(torch.randn(4096, 512)).sum()\nloss.backward()")
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    # the same gradient tensors, none dropped
    assert [p.grad for p in params] == grads
    changed = [n for n in report.notes if "added to the existing gradients" in n]
    assert len(changed) <= 1
    assert "loss" in report.released_names
    assert shell.allocated() <= baseline


def test_oom_in_backward_drops_gradients_the_cell_created(shell: Any) -> None:
    shell.run(GRAD_MODEL)
    baseline = shell.allocated()
    shell.run(f"%%gpumem --limit {baseline + 64 * MiB}\nloss = model(torch.randn(4096, 512)).sum()\nloss.backward()")
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert all(p.grad is None for p in shell.ns["model"].parameters())
    assert shell.allocated() == baseline


def test_oom_in_optimizer_step_gives_the_memory_back(shell: Any) -> None:
    """Defect 5: an OOM inside opt.step() left the gradients and half the new Adam state allocated."""
    shell.run(
        "from torch import nn\n"
        "model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])\n"
        "opt = torch.optim.Adam(model.parameters())"
    )
    params = 4 * (1024 * 1024 + 1024) * 4
    baseline = shell.allocated()
    # forward and backward fit (params + grads + small activations); Adam's
    # two moments per parameter do not
    result = shell.run(
        f"%%gpumem --limit {baseline + params + params // 2}\n"
        "loss = model(torch.randn(16, 1024)).sum()\nloss.backward()\nopt.step()"
    )
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert len(shell.ns["opt"].state) == 0
    assert all(p.grad is None for p in shell.ns["model"].parameters())
    assert shell.allocated() == baseline
    assert report.end_bytes == baseline


def test_batch_var_whose_repr_raises_keeps_the_recovery(shell: Any) -> None:
    """Defect 7: a --batch-var whose repr() raised lost the report, the rollback and the memory."""
    shell.run("class Bad:\n    def __repr__(self):\n        raise ValueError('no')\nbad = Bad()")
    baseline = shell.allocated()
    result = shell.run(f"%%gpumem --limit {baseline + 8 * MiB} --batch-var bad\nx = torch.empty(16 * 1024 * 1024)")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert report.batch_var is not None and report.batch_var["name"] == "bad"
    assert "Bad" in str(report.batch_var["value"])
    assert shell.allocated() == baseline


def test_a_huge_batch_var_is_stored_bounded(shell: Any) -> None:
    shell.run("big = 'x' * (16 * 1024 * 1024)")
    shell.run("%%gpumem --batch-var big --quiet\ny = 1")
    report = oomnb.last_report()
    assert report is not None and report.batch_var is not None
    assert len(str(report.batch_var["value"])) <= 200


def test_missing_batch_var_is_one_line(shell: Any) -> None:
    shell.ns.pop("ran", None)
    result = shell.run("%%gpumem --batch-var nope\nran = True")
    text = result.captured.stdout + result.captured.stderr
    assert "UsageError" in text and "no variable 'nope'" in text and "Traceback" not in text
    assert "ran" not in shell.ns
    # set in the cell itself: fine
    assert shell.run("%%gpumem --batch-var bs\nbs = 4\nran = True").success
    assert shell.ns["ran"] is True


@pytest.mark.parametrize("value", ["1e400", "nan", "inf", "-4GiB", "0", "0GiB"])
def test_limit_out_of_range_is_one_line(shell: Any, value: str) -> None:
    shell.ns.pop("ran", None)
    result = shell.run(f"%%gpumem --limit {value}\nran = True")
    text = result.captured.stdout + result.captured.stderr
    assert "UsageError" in text and "Traceback" not in text
    assert "ran" not in shell.ns


def test_advice_that_never_finishes_is_stopped_by_its_budget(shell: Any) -> None:
    """A cell whose dry run never ends (a generate loop) must not hang the kernel."""
    shell.run("%config GpuMem.advice_budget = 1.5")
    shell.run("def generate():\n    while True:\n        pass")
    baseline = shell.allocated()
    result = shell.run(f"%%gpumem --limit {baseline + 8 * MiB}\nx = torch.empty(16 * 1024 * 1024)\ngenerate()")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert any("time budget" in note for note in report.notes)
    assert report.duration_s < 5
    shell.run("%config GpuMem.advice_budget = 10.0")


def test_fifty_oom_cycles_keep_memory_and_rss_flat(shell: Any) -> None:
    shell.run("keep = torch.ones(1024)\nbs = 'y' * (4 * 1024 * 1024)")
    gc.collect()
    start = shell.allocated()
    limit = start + 16 * MiB
    rss: list[int] = []
    for cycle in range(50):
        shell.run(
            f"%%gpumem --limit {limit} --quiet --batch-var bs\n"
            "x = torch.ones(1024 * 1024)\ny = torch.ones(8 * 1024 * 1024)"
        )
        assert oomnb.last_report().oom is not None  # type: ignore[union-attr]
        assert shell.allocated() == start
        if cycle in (10, 49):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # max RSS in KiB: no growth beyond noise between cycle 10 and 50
    assert rss[1] - rss[0] < 64 * 1024


@pytest.mark.usefixtures("exact_allocator")  # limits a few MiB over what is allocated
def test_fifty_oom_cycles_in_auto_mode(shell: Any) -> None:
    shell.run("keep = torch.ones(1024)")
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        sys.__dict__.pop(name, None)
    gc.collect()
    shell.run(f'%config GpuMem.limit = "{shell.allocated() + 16 * MiB}"')
    shell.run("%gpumem auto on")
    cell = "x = torch.ones(1024 * 1024)\ny = torch.ones(8 * 1024 * 1024)"
    try:
        # The first recovery's full collection may free what earlier tests in
        # this process left behind: count from after it.
        shell.run(cell)
        start = shell.allocated()
        for _ in range(50):
            shell.run(cell)
            report = oomnb.last_report()
            assert report is not None and report.oom is not None
            assert sorted(report.released_names) == ["x"]
            assert report.end_bytes == report.baseline_bytes
            assert shell.allocated() == start
    finally:
        shell.run("%gpumem auto off")
        shell.run('%config GpuMem.limit = ""')


def test_isolated_child_cannot_write_files_or_change_the_parent(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("mine")
    state = {"n": 0}

    def effects() -> str:
        state["n"] += 1
        target.write_text("theirs")  # into memory: the step goes on
        os.remove(target)  # nothing happens
        torch.save({"w": torch.ones(4)}, str(target))  # into memory too
        fd = os.open(str(tmp_path / "new.bin"), os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"x")
        os.mkfifo(str(tmp_path / "fifo"))
        model = torch.jit.script(torch.nn.Linear(2, 2))
        torch.jit.save(model, str(tmp_path / "scripted.pt"))
        writer = torch._C.PyTorchFileWriter(str(tmp_path / "raw.pt"))
        writer.write_record("data", b"abc", 3)
        writer.write_end_of_file()
        shared = torch.from_file(str(target), True, 4, dtype=torch.uint8)
        shared.fill_(65)
        try:
            __import__("subprocess").run(["touch", str(tmp_path / "made")])
        except PermissionError as exc:
            return str(exc)
        return "ran a process"

    result = run_isolated(effects, budget_s=10)
    assert result.ok and result.value == "subprocess.Popen is refused in a dry run"
    assert target.read_text() == "mine" and state["n"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_isolated_child_writes_through_inherited_files_go_nowhere(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    with path.open("a") as log:

        def write() -> str:
            log.write("from the child\n")
            log.flush()
            return "done"

        result = run_isolated(write, budget_s=10)
    assert result.value == "done"
    assert path.read_text() == ""


def test_stopping_the_advice_keeps_the_report_and_the_recovery(shell: Any, monkeypatch: Any) -> None:
    """Pressing stop while the advice runs printed a KeyboardInterrupt from oomnb and lost the report."""
    from oomnb.notebook import magics

    def interrupted(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(magics, "advise_cell", interrupted)
    baseline = shell.allocated()
    result = shell.run(f"%%gpumem --limit {baseline + 8 * MiB}\nx = torch.empty(16 * 1024 * 1024)")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert "advice interrupted: the suggestions are what was found before" in report.notes
    assert shell.allocated() == baseline


def test_a_dry_run_that_cannot_run_is_a_report_not_an_error(shell: Any) -> None:
    shell.run("model = torch.nn.Linear(4, 4)")
    result = shell.run("%%gpumem --dry-run\nout = model(torch.randn(8, 4))\nout[out > 0].sum()")
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.dry_run
    assert len(report.notes) == 1 and report.notes[0].startswith("the dry run could not run the cell (")
    assert "out" not in shell.ns


@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0, 1e400])
def test_advice_budget_out_of_range_is_refused(shell: Any, value: float) -> None:
    from traitlets import TraitError

    magics = shell.ip.find_magic("gpumem").__self__
    with pytest.raises(TraitError, match="advice_budget must be a number of seconds above 0 and at most 3600"):
        magics.advice_budget = value
    assert magics.advice_budget == 10.0


@pytest.mark.usefixtures("exact_allocator")  # limits a few MiB over what is allocated
def test_loop_variables_are_temporaries_not_the_users_only_copy(shell: Any) -> None:
    """`for x, y in loader` rebinds x and y every pass: after an OOM they go, and memory is back at the baseline."""
    shell.run(
        "def loader(n):\n    for _ in range(2):\n        yield torch.randn(n, 256), torch.randn(n, 256)\n"
        "for x, y in loader(16):\n    pass"
    )
    baseline = shell.allocated()
    shell.run(
        f"%%gpumem --limit {baseline + 8 * MiB}\nfor x, y in loader(2048):\n    boom = torch.empty(16 * 1024 * 1024)"
    )
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert {"x", "y"} <= set(report.released_names)
    assert not any("kept `x`" in note for note in report.notes)
    assert shell.allocated() <= baseline
