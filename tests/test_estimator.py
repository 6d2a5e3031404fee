"""Dry runs on fake tensors against the simulated device's real figures."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from oomnb.analysis.estimator import DryRunError, dry_run, find_max_batch, what_ifs
from oomnb.backends.simulated import SimulatedDevice

from .models import classification_step, workloads

#: Built per module, not at import: tensors made at collection would sit on the
#: simulated device under every later test of the run.
WORKLOAD_NAMES = ("mlp", "cnn", "transformer encoder", "lstm", "gpt")


@pytest.fixture(scope="module")
def suite() -> Any:
    built = workloads()
    assert tuple(built) == WORKLOAD_NAMES
    yield built
    built.clear()


def real_peak(model: torch.nn.Module, step: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """Peak and start of one real step on the simulated device, on copies."""
    model = copy.deepcopy(model)
    inputs = tuple(t.clone() for t in inputs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device = SimulatedDevice()
    device.start(scan=False)  # counts only these copies, registered below
    try:
        for t in (*model.parameters(), *model.buffers(), *inputs):
            device.register(t)
        start = device.allocated
        device.reset_peak()
        step(model, opt, *inputs)
        return device.peak, start
    finally:
        device.stop()


LSTM_GAP = pytest.mark.xfail(
    strict=True,
    reason="on the CPU a real LSTM runs oneDNN's fused mkldnn_rnn_layer (with a workspace); on fake tensors "
    "PyTorch takes the unfused path, so the peaks differ (about 39% here)",
)


@pytest.mark.parametrize("name", [pytest.param(n, marks=LSTM_GAP) if n == "lstm" else n for n in WORKLOAD_NAMES])
def test_dry_run_peak_within_5_percent_of_real(name: str, suite: Any) -> None:
    model, step, inputs = suite[name]
    real, start = real_peak(model, step, inputs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = dry_run(step, model, opt, *inputs)
    assert run.start_bytes == start
    assert abs(run.peak_bytes - real) <= 0.05 * real, (name, run.peak_bytes, real)


def test_users_objects_are_unchanged(suite: Any) -> None:
    model, step, inputs = suite["mlp"]
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    classification_step(model, opt, *inputs)  # real state and real grads exist
    model(inputs[0]).sum().backward()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    state = copy.deepcopy(opt.state_dict())
    dry_run(step, model, opt, *inputs, batch_size=256)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key])
        assert value.device.type == "cpu"
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]
    after = opt.state_dict()
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)


def test_batch_size_changes_activations_linearly(suite: Any) -> None:
    model, step, inputs = suite["mlp"]
    opt = torch.optim.AdamW(model.parameters())
    small = dry_run(step, model, opt, *inputs, batch_size=32)
    large = dry_run(step, model, opt, *inputs, batch_size=64)
    double = dry_run(step, model, opt, *inputs, batch_size=128)
    assert small.batch_size == 32
    assert (double.peak_bytes - large.peak_bytes) == pytest.approx(2 * (large.peak_bytes - small.peak_bytes), rel=0.02)


def test_find_max_batch_is_verified_and_never_above_the_budget(suite: Any) -> None:
    model, step, inputs = suite["mlp"]
    opt = torch.optim.AdamW(model.parameters())
    capacity = 24 * 1024**2
    fit = find_max_batch(step, model, opt, *inputs, capacity_bytes=capacity, margin=0.05)
    assert fit.max_batch > 64
    assert fit.verified_peak_bytes <= capacity * 0.95
    above = dry_run(step, model, opt, *inputs, batch_size=fit.max_batch + 1)
    assert above.peak_bytes > capacity * 0.95
    assert fit.fit_error < 0.02
    assert fit.accumulation_steps() == 1
    # ...and the real step at that batch fits the same capacity on the simulated device
    x = torch.randn(fit.max_batch, 256)
    y = torch.randint(0, 10, (fit.max_batch,))
    real, _ = real_peak(model, step, (x, y))
    assert real <= capacity * 0.95


def test_what_ifs_bf16_and_checkpointing_save_memory(suite: Any) -> None:
    model, step, inputs = suite["gpt"]
    opt = torch.optim.AdamW(model.parameters())
    results = what_ifs(step, model, opt, *inputs)
    base = results["as is"]
    bf16 = results["bf16 autocast"]
    ckpt = results["gradient checkpointing"]
    assert not isinstance(base, str) and not isinstance(bf16, str) and not isinstance(ckpt, str)
    assert bf16.peak_bytes < base.peak_bytes
    assert ckpt.peak_bytes < base.peak_bytes
    assert isinstance(results["no_grad"], str)  # backward cannot run under no_grad


def test_logging_item_does_not_stop_a_dry_run(suite: Any) -> None:
    model, step, inputs = suite["mlp"]
    opt = torch.optim.AdamW(model.parameters())

    def logged(*args: Any) -> None:
        step(*args)
        print(f"loss {float(torch.ones(1).sum()):.3f}")  # real tensors answer as usual

    def with_item(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.item())

    plain = dry_run(step, model, opt, *inputs)
    run = dry_run(with_item, model, opt, *inputs)
    assert run.notes == ["values read with .item() were taken as 1 in the dry run"]
    assert run.peak_bytes == plain.peak_bytes
    assert dry_run(logged, model, opt, *inputs).peak_bytes == plain.peak_bytes
    assert torch.ones(1).item() == 1.0


def test_data_dependent_step_says_why_in_one_line() -> None:
    def step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out[out > 0].sum()  # the shape depends on the values

    model = torch.nn.Linear(4, 4)
    with pytest.raises(DryRunError, match=r"^the step reads tensor values") as info:
        dry_run(step, model, torch.randn(2, 4))
    assert "\n" not in str(info.value)


def test_cell_dry_run_copies_models_held_by_other_objects() -> None:
    from oomnb.analysis.estimator import dry_run_cell

    class Trainer:
        def __init__(self) -> None:
            self.model = torch.nn.Linear(256, 256)

    trainer = Trainer()
    code = compile("trainer.model(torch.randn(batch_size, 256)).sum().backward()", "<cell>", "exec")
    run = dry_run_cell(code, {"torch": torch, "trainer": trainer, "batch_size": 64})
    assert trainer.model.weight.grad is None  # the real model was not run
    assert run.gradients_bytes == 256 * 256 * 4 + 1024


def test_cuda_cell_dry_runs_with_cuda_read_as_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a child forked from a kernel that started CUDA, no CUDA call may happen: a cell written for
    CUDA is dry-run with every cuda device read as the host (forced here, on a machine without CUDA)."""
    from oomnb.analysis import hostcuda
    from oomnb.analysis.estimator import dry_run_cell

    monkeypatch.setattr(hostcuda, "force", True)
    ns: dict = {"torch": torch, "nn": torch.nn}
    exec("model = nn.Linear(1024, 1024)\nx_host = torch.ones(256, 1024)", ns)
    weights = ns["model"].weight
    cell = (
        "model = model.cuda()\n"
        "xb = x_host.to('cuda')\n"  # a host tensor moved to the card: a new 1 MiB copy there
        "y = model(torch.ones(256, 1024, device='cuda:0'))\n"  # 1 MiB input, 1 MiB output
        "torch.cuda.synchronize()\n"
        "with torch.autocast('cuda', dtype=torch.bfloat16):\n"
        "    z = model(xb)\n"
    )
    run = dry_run_cell(compile(cell, "<cell>", "exec"), ns, overrides={})
    MiB = 2**20
    # Left: xb 1 MiB, the input 1 MiB (y's graph keeps it), y 1 MiB, z 0.5 MiB and xb's bf16 cast
    # 0.5 MiB (z's graph keeps it). At the peak, autocast's bf16 weight (2 MiB) and bias (2 KiB) too.
    assert run.end_bytes - run.start_bytes == 4 * MiB
    assert run.peak_bytes - run.start_bytes == 6 * MiB + 2048
    assert ns["model"].weight is not weights and weights.device.type == "cpu"  # the namespace's copies are fake
    assert torch.autocast is not None and torch.Tensor.to is torch.Tensor.to  # patches undone
    assert torch.autocast.__name__ == "autocast"
